"""Streaming writers: PaddleNLP ``.pdparams`` shards (a pickle of {name: numpy array}, written opcode by opcode) and
safetensors shards, plus the helpers that turn an op's output (often a strided view of a memory-mapped source) into
file bytes block by block.

Nothing here ever holds a shard in memory: a tensor's bytes go to the file in blocks of at most ``BLOCK`` bytes through
a background thread (``os.pwrite`` releases the GIL, so the transposes of the next block overlap the writes).
A transposed view is written by reading the source sequentially in row blocks and scattering each transposed block
to its place in the file, so even a 1 GB vocabulary matrix needs only ``BLOCK``-sized buffers.

Large tensors' data are placed at block-aligned file offsets (pickle padding opcodes / safetensors ordering) and
written from page-aligned buffers with O_DIRECT: straight to the disk, without the kernel copying them into the page
cache (that copy would cost as much CPU as the transposes). Everything else goes through the page cache; the two
never share a file block. Where O_DIRECT is refused (tmpfs, ...) everything goes through the page cache.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import queue
import struct
import threading

import numpy as np

from .ops import FLOAT_DTYPES, STORAGE

# bytes of output materialised at a time (every per-layer matrix of a 7B model fits one); tests make it small
BLOCK = int(os.environ.get("PADDLEVL_CONVERT_BLOCK", 160 << 20))
TILE = 256                # transpose tile edge (elements)
PENDING = 256 << 20       # bytes queued for the writer thread before the producer waits
POOL = 2                  # reused output buffers of BLOCK bytes: one being filled while the other is written
ALIGN = max(4096, mmap.PAGESIZE)   # O_DIRECT granularity (file offsets, lengths, buffer addresses)
DIRECT_MIN = 1 << 20      # tensors at least this large get block-aligned data, written with O_DIRECT
DIRECT = os.environ.get("PADDLEVL_CONVERT_DIRECT", "1") != "0"   # 0: never O_DIRECT (page cache only)


# --------------------------------------------------------------------------------------------------- dtype casts
def bf16_to_f32(words: np.ndarray) -> np.ndarray:
    return (words.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, NaN stays NaN (quiet)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        r[nan] = ((u[nan] >> 16) | np.uint32(0x40)).astype(np.uint16)
    return r


def cast_words(a: np.ndarray, din: str, dout: str) -> np.ndarray:
    """Raw storage words of dtype ``din`` -> raw words of ``dout`` (bfloat16 = uint16 words)."""
    if din == dout:
        return a
    if din not in FLOAT_DTYPES or dout not in FLOAT_DTYPES:
        return a.astype(STORAGE[dout])
    f = bf16_to_f32(a) if din == "bfloat16" else a
    if dout == "bfloat16":
        return f32_to_bf16(f)
    with np.errstate(over="ignore", invalid="ignore"):   # out of float16 range -> inf, as every library does
        return f.astype(STORAGE[dout])


def out_dtype(din: str, requested: str) -> str:
    """--dtype keep|float32|bfloat16|float16 applies to floating tensors only."""
    if requested in (None, "keep") or din not in FLOAT_DTYPES:
        return din
    return requested


# --------------------------------------------------------------------------------------------------- transposes
_workers = None
_local = threading.local()


def _pool():
    global _workers
    if _workers is None:
        from concurrent.futures import ThreadPoolExecutor
        _workers = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="convert-transpose")
    return _workers


def _tiles(dst, src, c0, c1):
    """dst[c0:c1] = src[:, c0:c1].T, tile by tile (numpy's strided copy of a whole transposed view is 3-5x slower)."""
    n = src.shape[0]
    for c in range(c0, c1, TILE):
        ce = min(c1, c + TILE)
        for r in range(0, n, TILE):
            dst[c:ce, r:r + TILE] = src[r:r + TILE, c:ce].T


def _tiles_wide(dst, src, g0, g1, k):
    """The same for 2- or 4-byte words, moving k words at once: transpose src viewed as uint64 (k words per element)
    into a small buffer, then de-interleave its rows into k output rows each (both passes cache-friendly); about
    1.7x faster than moving the words one by one."""
    n = src.shape[0]
    wide = src.view(np.uint64)                                  # [n, m / k]
    out = dst.reshape(dst.shape[0] // k, k, n)                  # row g*k + j of dst = out[g, j]
    group = 64
    tmp = getattr(_local, "tmp", None)
    if tmp is None or tmp.size < group * n:
        tmp = _local.tmp = np.empty(group * n, np.uint64)
    for g in range(g0, g1, group):
        ge = min(g1, g + group)
        t = tmp[:(ge - g) * n].reshape(ge - g, n)
        for r in range(0, n, TILE):
            t[:, r:r + TILE] = wide[r:r + TILE, g:ge].T
        out[g:ge] = t.view(src.dtype).reshape(ge - g, n, k).transpose(0, 2, 1)


def transpose_into(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[:] = src.T for 2-D arrays (dst C-contiguous), in cache-sized tiles, on all cores for large blocks."""
    n, m = src.shape
    if n * m <= TILE * TILE * 4:
        dst[...] = src.T
        return
    k = 8 // src.itemsize if src.itemsize in (2, 4) else 0
    wide = k and m % k == 0 and src.strides[1] == src.itemsize and src.strides[0] % 8 == 0 and dst.flags.c_contiguous
    units = m // k if wide else m                               # columns of src, in k-word groups when wide
    nw = _pool()._max_workers if n * m * src.itemsize >= (8 << 20) else 1
    step = -(-units // nw)                                      # equal shares (the loops take partial chunks)
    parts = [(c, min(units, c + step)) for c in range(0, units, step)]
    fn = (lambda c0, c1: _tiles_wide(dst, src, c0, c1, k)) if wide else (lambda c0, c1: _tiles(dst, src, c0, c1))
    if len(parts) == 1:
        fn(*parts[0])
        return
    for f in [_pool().submit(fn, c0, c1) for c0, c1 in parts]:
        f.result()


def transposed(src: np.ndarray) -> np.ndarray:
    out = np.empty((src.shape[1], src.shape[0]), src.dtype)
    transpose_into(out, src)
    return out


# --------------------------------------------------------------------------------------------------- output files
class OutFile:
    """An output file: a page-cache fd, plus an O_DIRECT fd where the filesystem allows one."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.dfd = None
        if DIRECT and hasattr(os, "O_DIRECT"):
            try:
                self.dfd = os.open(path, os.O_WRONLY | os.O_DIRECT)
            except OSError:
                self.dfd = None

    def write(self, off: int, buf, direct: bool = False) -> None:
        """pwrite ``buf`` at ``off``; its block-aligned part with O_DIRECT when ``direct`` (``buf`` must then start at
        an ALIGN-aligned address, i.e. at the start of a pool buffer)."""
        mv = memoryview(buf).cast("B")
        if direct and self.dfd is not None and off % ALIGN == 0 and len(mv) >= ALIGN:
            n = len(mv) // ALIGN * ALIGN
            try:
                _pwrite_all(self.dfd, mv[:n], off)
                mv, off = mv[n:], off + n
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                os.close(self.dfd)          # refused after all (alignment rules of this device): page cache only
                self.dfd = None
        if len(mv):
            _pwrite_all(self.fd, mv, off)

    def close(self):
        for fd in (self.fd, self.dfd):
            if fd is not None:
                os.close(fd)
        self.fd = self.dfd = None


def _aligned_buffer(n: int) -> np.ndarray:
    """n bytes at a page-aligned address (anonymous mmap), for O_DIRECT."""
    return np.frombuffer(mmap.mmap(-1, n), dtype=np.uint8)


# --------------------------------------------------------------------------------------------------- I/O thread
class IOThread:
    """Background I/O: one thread does the pwrite jobs in order (and the page releases that must follow them), a
    second one the file-to-file copies, so a 1 GB embedding copied by the kernel never stalls the transposes."""

    def __init__(self, progress=None):
        self.q, self.cq = queue.Queue(), queue.Queue()
        self.progress = progress
        self.pending = 0
        self.cv = threading.Condition()
        self.error = None
        self.free, self.made = [], 0
        self.threads = [threading.Thread(target=self._run, args=(q,), name=name, daemon=True)
                        for q, name in ((self.q, "convert-writer"), (self.cq, "convert-copier"))]
        for t in self.threads:
            t.start()

    def _run(self, q):
        while True:
            job = q.get()
            if job is None:
                return
            kind, a, b, size = job[:4]
            try:
                if self.error is None:
                    if kind == "write":
                        direct = job[4] is not None   # a pool buffer: page-aligned start
                        for off, buf in a:            # a: [(file offset, buffer)], b: OutFile
                            b.write(off, buf, direct)
                    elif kind == "copy":
                        _copy_range(*a)
                    else:
                        a()
                    if self.progress is not None and size:
                        self.progress(size)
            except BaseException as e:  # noqa: BLE001 - re-raised in the producer thread
                self.error = e
            finally:
                with self.cv:
                    if kind == "write":
                        self.pending -= size
                        if job[4] is not None:
                            self.free.append(job[4])   # the output buffer can be filled again
                    self.cv.notify_all()

    def _check(self):
        if self.error is not None:
            raise self.error

    def write(self, out, pieces, size, buffer=None):
        """Queue writes of [(offset, array)] to OutFile ``out``; ``buffer`` (the token from ``take``, when the single
        piece is that pool buffer from its start) returns to the pool once written, and allows O_DIRECT."""
        self._check()
        with self.cv:
            while self.pending > 0 and self.pending + size > PENDING:
                self.cv.wait()
            self.pending += size
        self.q.put(("write", pieces, out, size, buffer))

    def copy(self, fd_in, off_in, out, off_out, n):
        """Queue a file-to-file copy of n bytes into OutFile ``out`` (in the kernel; it holds no memory of ours)."""
        self._check()
        self.cq.put(("copy", (fd_in, off_in, out.fd, off_out, n), None, n, None))

    def call(self, fn):
        """Run fn on the writer thread after the writes queued so far."""
        self._check()
        self.q.put(("call", fn, None, 0, None))

    def take(self, shape, dtype):
        """An output array from the pool of reused buffers (no fresh pages to zero and fault in for every
        block); larger requests get their own memory. Returns (array, token for write(buffer=...))."""
        dtype = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if n > BLOCK:
            return np.empty(shape, dtype), None
        with self.cv:
            while not self.free and self.made >= POOL:
                self._check()
                self.cv.wait()
            if self.free:
                buf = self.free.pop()
            else:
                buf = _aligned_buffer(BLOCK)
                self.made += 1
        return buf[:n].view(dtype).reshape(shape), buf

    def give(self, token):
        """Return an unused buffer from ``take``."""
        if token is not None:
            with self.cv:
                self.free.append(token)
                self.cv.notify_all()

    def flush(self):
        """Wait until every queued job is done (re-raises an I/O error)."""
        events = []
        for q in (self.q, self.cq):
            done = threading.Event()
            q.put(("call", done.set, None, 0, None))
            events.append(done)
        for e in events:
            e.wait()
        self._check()

    def close(self):
        for q in (self.q, self.cq):
            q.put(None)
        for t in self.threads:
            t.join()


def _copy_range(fd_in, off_in, fd_out, off_out, n):
    """copy_file_range (falls back to sendfile, then to pread/pwrite, where the kernel or filesystem says no)."""
    end = off_in + n
    while off_in < end:
        want = min(end - off_in, 1 << 30)
        try:
            k = os.copy_file_range(fd_in, fd_out, want, off_in, off_out)
        except (OSError, AttributeError):
            k = 0
        if k <= 0:
            data = os.pread(fd_in, min(want, 64 << 20), off_in)
            if not data:
                raise OSError(f"unexpected end of file while copying at offset {off_in}")
            _pwrite_all(fd_out, data, off_out)
            k = len(data)
        off_in += k
        off_out += k


def _pwrite_all(fd, buf, off):
    mv = memoryview(buf).cast("B")
    while len(mv):
        n = os.pwrite(fd, mv, off)
        mv = mv[n:]
        off += n


# --------------------------------------------------------------------------------------------------- emitting a tensor
def emit(io: IOThread, fd, base: int, arr: np.ndarray, din: str, dout: str, source=None) -> int:
    """Write ``arr`` (raw words of ``din``; any strides) as C-order ``dout`` words at offset ``base`` of OutFile ``fd``.
    ``source`` (the reader ``arr`` comes from, optional): ``source.release(view)`` is queued after the bytes of each
    source block are written (drops mapped pages), and ``source.file_range(view)`` -> (fd, offset) lets unchanged
    contiguous bytes go file to file inside the kernel (copy_file_range: no trip through this process).
    Returns the number of bytes written."""
    osz = STORAGE[dout].itemsize
    total = arr.size * osz
    if total == 0:
        return 0
    if arr.ndim == 0:
        arr = arr.reshape(1)
    release = getattr(source, "release", None)

    def put(pieces, size, src_view, buffer=None, direct=True):
        io.write(fd, pieces, size, buffer if direct else None)
        if buffer is not None and not direct:
            io.call(lambda b=buffer: io.give(b))
        if release is not None and src_view is not None:
            io.call(lambda v=src_view: release(v))

    def transposed_block(src):
        out, token = io.take((src.shape[1], src.shape[0]), src.dtype)
        transpose_into(out, src)
        return cast_block(out, token)

    def cast_block(out, token):
        if din == dout:
            return out, token
        if token is not None and STORAGE[dout].itemsize <= STORAGE[din].itemsize:
            res = cast_words(out, din, dout)                    # narrowing: the result fits the same buffer
            dst = token[:res.nbytes].view(res.dtype).reshape(res.shape)
            np.copyto(dst, res)
            return dst, token
        io.give(token)
        return cast_words(out, din, dout), None

    if arr.flags.c_contiguous:
        flat = arr.reshape(-1)
        where = source.file_range(flat) if din == dout and hasattr(source, "file_range") else None
        if where is not None:
            io.copy(where[0], where[1], fd, base, total)
            return total
        step = max(1, BLOCK // max(osz, arr.itemsize))
        for i in range(0, flat.size, step):
            piece = flat[i:i + step]
            out = cast_words(piece, din, dout)
            put([(base + i * osz, out)], out.nbytes, piece)
        return total

    if arr.ndim == 2 and arr.strides[0] < arr.strides[1]:
        # a transposed view: out = s.T, where s walks the source row by row
        s = arr.T
        n, m = s.shape
        rows = max(1, BLOCK // max(1, m * max(osz, s.itemsize)))
        if rows >= n:
            out, token = transposed_block(s)
            put([(base, out)], out.nbytes, s, token)
            return total
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            blk = s[r0:r1]
            t, token = transposed_block(blk)                    # [m, r1-r0]: row j = out[j, r0:r1]
            pieces = [(base + (j * n + r0) * osz, t[j]) for j in range(m)]
            put(pieces, t.nbytes, blk, token, direct=False)
        return total

    # anything else (column slices, regrouped views...): materialise along axis 0
    row = int(np.prod(arr.shape[1:], dtype=np.int64))
    rows = max(1, BLOCK // max(1, row * max(osz, arr.itemsize)))
    for r0 in range(0, arr.shape[0], rows):
        blk = arr[r0:r0 + rows]
        out, token = io.take(blk.shape, blk.dtype)
        np.copyto(out, blk)
        out, token = cast_block(out, token)
        put([(base + r0 * row * osz, out)], out.nbytes, blk, token)
    return total


# --------------------------------------------------------------------------------------------------- pickle opcodes
def _p_int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if -(1 << 31) <= v < (1 << 31):
        return b"J" + struct.pack("<i", v)
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _p_obj(v) -> bytes:
    if v is None:
        return b"N"
    if v is True:
        return b"\x88"
    if v is False:
        return b"\x89"
    if isinstance(v, int):
        return _p_int(v)
    if isinstance(v, str):
        raw = v.encode("utf-8")
        return b"X" + struct.pack("<I", len(raw)) + raw
    if isinstance(v, bytes):
        return b"B" + struct.pack("<I", len(v)) + v
    if isinstance(v, tuple):
        return b"(" + b"".join(_p_obj(x) for x in v) + b"t"
    raise TypeError(f"cannot pickle {type(v).__name__} here")


def _p_global(obj) -> bytes:
    return b"c" + obj.__module__.encode() + b"\n" + obj.__name__.encode() + b"\n"


_RECON, _RECON_ARGS, _ = np.empty(0, np.float32).__reduce__()   # what np.ndarray pickles as, on this numpy


def _p_dtype(dt: np.dtype) -> bytes:
    fn, args, state = dt.__reduce__()
    return _p_global(fn) + _p_obj(args) + b"R" + _p_obj(state) + b"b"


def pickle_array_head(name: str, shape, dt: np.dtype, nbytes: int, pos: int = 0, align: int = 0) -> bytes:
    """Opcodes of ``name: ndarray`` up to (and including) the data length; the raw C-order data follows.
    With ``align``, a padding string (pushed and popped: no effect on the result) makes the data start at a multiple
    of ``align`` in the file, given that this head starts at file offset ``pos``."""
    head = (_p_obj(name) + _p_global(_RECON) + _p_global(_RECON_ARGS[0]) + _p_obj(_RECON_ARGS[1])
            + _p_obj(_RECON_ARGS[2]) + b"\x87R"                      # _reconstruct(ndarray, (0,), b'b')
            + b"(" + _p_int(1) + _p_obj(tuple(int(s) for s in shape)) + _p_dtype(dt) + b"\x89")
    op = b"B" + struct.pack("<I", nbytes) if nbytes < (1 << 32) else b"\x8e" + struct.pack("<Q", nbytes)
    if align:
        k = -(pos + len(head) + 6 + len(op)) % align
        head += b"X" + struct.pack("<I", k) + b" " * k + b"0"          # BINUNICODE padding, POP
    return head + op


PICKLE_ARRAY_TAIL = b"tbs"     # close the state tuple, BUILD, SETITEM
PICKLE_START = b"\x80\x04}"    # PROTO 4, EMPTY_DICT
PICKLE_END = b"."


# --------------------------------------------------------------------------------------------------- shard writers
class PdparamsShard:
    """model_state[-0000k-of-0000n].pdparams: what paddle.save writes for a dict of arrays (bf16 as uint16), plus
    padding strings that put every large tensor's data at a block-aligned offset (for O_DIRECT)."""

    def __init__(self, path: str, io: IOThread, entries):
        self.path, self.io = path, io
        self.out = OutFile(path)
        self.pos = 0
        self._raw(PICKLE_START)

    def _raw(self, b: bytes):
        self.io.write(self.out, [(self.pos, b)], 0)
        self.pos += len(b)

    def add(self, name, arr, din, dout, shape, source=None):
        nbytes = int(np.prod(shape, dtype=np.int64)) * STORAGE[dout].itemsize
        align = ALIGN if nbytes >= DIRECT_MIN and self.out.dfd is not None else 0
        self._raw(pickle_array_head(name, shape, STORAGE[dout], nbytes, self.pos, align))
        n = emit(self.io, self.out, self.pos, arr, din, dout, source)
        assert n == nbytes, (name, n, nbytes)
        self.pos += nbytes
        self._raw(PICKLE_ARRAY_TAIL)

    def close(self):
        self._raw(PICKLE_END)
        self.io.flush()
        os.ftruncate(self.out.fd, self.pos)
        self.out.close()


class SafetensorsShard:
    """model[-0000k-of-0000n].safetensors; the header is known up front from the plan. Tensors whose size is a
    multiple of the block size come first, so they all start block-aligned (for O_DIRECT); safetensors allows any
    order and a space-padded header, not gaps."""

    def __init__(self, path: str, io: IOThread, entries):
        from .readers import ST_CODES
        self.path, self.io = path, io
        self.out = OutFile(path)
        sized = [(name, shape, dtype, int(np.prod(shape, dtype=np.int64)) * STORAGE[dtype].itemsize)
                 for name, shape, dtype in entries]
        big = [e for e in sized if e[3] >= DIRECT_MIN and e[3] % ALIGN == 0]
        rest = [e for e in sized if not (e[3] >= DIRECT_MIN and e[3] % ALIGN == 0)]
        header, off, self.expect = {"__metadata__": {"format": "np"}}, 0, {}
        for name, shape, dtype, n in big + rest:
            header[name] = {"dtype": ST_CODES[dtype], "shape": [int(s) for s in shape], "data_offsets": [off, off + n]}
            self.expect[name] = off
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % ALIGN)
        self.data_start = 8 + len(raw)
        self.size = self.data_start + off
        io.write(self.out, [(0, struct.pack("<Q", len(raw)) + raw)], 0)

    def add(self, name, arr, din, dout, shape, source=None):
        emit(self.io, self.out, self.data_start + self.expect[name], arr, din, dout, source)

    def close(self):
        self.io.flush()
        os.ftruncate(self.out.fd, self.size)
        self.out.close()


FORMATS = {
    "pdparams": dict(shard=PdparamsShard, single="model_state.pdparams", index="model_state.pdparams.index.json",
                     pattern="model_state-{k:05d}-of-{n:05d}.pdparams"),
    "safetensors": dict(shard=SafetensorsShard, single="model.safetensors", index="model.safetensors.index.json",
                        pattern="model-{k:05d}-of-{n:05d}.safetensors"),
}


def shard_names(fmt: str, n: int):
    spec = FORMATS[fmt]
    return [spec["single"]] if n == 1 else [spec["pattern"].format(k=k, n=n) for k in range(1, n + 1)]


def pack_shards(sizes, max_bytes: int):
    """Greedy split in order (the transformers / PaddleNLP rule): -> list of index lists."""
    groups, cur, size = [], [], 0
    for i, b in enumerate(sizes):
        if cur and size + b > max_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += b
    if cur or not groups:
        groups.append(cur)
    return groups
