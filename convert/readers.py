"""Lazy, per-tensor readers for upstream torch checkpoints.

* safetensors: the header is parsed here (8-byte length + JSON) and the data is memory-mapped; a tensor is a numpy view
  of the mapping (bfloat16 as raw uint16 words: bit-exact, no torch needed).
* torch ``.bin`` (zip format): ``torch.load(weights_only=True, mmap=True)``; torch is imported only here and only for
  ``.bin``. bfloat16 storages are viewed as 16-bit words, never converted.

Memory stays bounded: mapped pages count towards RSS only while they stay mapped, so after a tensor (or a block of it)
has been written the engine calls ``release`` and the pages are dropped (MADV_DONTNEED on our read-only mappings; the
data stays in the page cache). ``open_source(folder)`` finds the weight files, reads every header, and checks an index
file against what the files really hold (a published index can be wrong about which file holds a tensor).
"""
from __future__ import annotations

import glob
import json
import mmap
import os
import pickle
import struct
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .ops import STORAGE

PAGE = mmap.PAGESIZE
MAX_HEADER = 100 * 1024 * 1024   # safetensors' own limit

ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
ST_CODES = {v: k for k, v in ST_DTYPES.items()}


class ConvertError(Exception):
    """A conversion problem with a message meant for the user (it names the file / key at fault)."""


@dataclass
class TensorInfo:
    key: str
    dtype: str            # logical dtype name (see convert.ops.STORAGE)
    shape: tuple
    file: str             # path of the file that really holds it
    offset: int = 0       # position in that file, for sequential reading

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * STORAGE[self.dtype].itemsize


# --------------------------------------------------------------------------------------------------- page release
_libc = None


def _madvise(addr: int, length: int, advice: int) -> None:
    """madvise on raw addresses (Linux); silently a no-op where unavailable."""
    global _libc
    if length <= 0 or not sys.platform.startswith("linux"):
        return
    if _libc is None:
        import ctypes
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.madvise(addr, length, advice)


MADV_WILLNEED = getattr(mmap, "MADV_WILLNEED", 3)
MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)


class _Mapped:
    """Shared logic: the address range [lo, hi) of a read-only file mapping whose pages we may drop."""

    lo = hi = 0

    def release(self, arr: Optional[np.ndarray] = None) -> None:
        """Drop the mapped pages under ``arr`` (or the whole mapping) from our RSS. Pages outside our mapping (an array
        that an op copied into anonymous memory) are never touched: DONTNEED would zero those."""
        if not self.hi:
            return
        if arr is None:
            a, b = self.lo, self.hi
        else:
            if arr.size == 0:
                return
            a, b = _byte_bounds(arr)
            a, b = max(a, self.lo), min(b, self.hi)
        a = -(-a // PAGE) * PAGE          # pages entirely inside the range only
        b = b // PAGE * PAGE
        if b > a:
            _madvise(a, b - a, MADV_DONTNEED)

    file_base = None   # address of file offset 0 in our mapping, when known
    _fd = None

    def file_range(self, arr: np.ndarray):
        """(fd, file offset) of a C-contiguous view of this file's mapping, else None."""
        if self.file_base is None or not self.hi or not arr.flags.c_contiguous or arr.size == 0:
            return None
        a, b = _byte_bounds(arr)
        if a < self.lo or b > self.hi:
            return None
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd, a - self.file_base

    def _close_fd(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def prefetch(self, arr: np.ndarray) -> None:
        if self.hi and arr.size:
            a, b = _byte_bounds(arr)
            a, b = max(a, self.lo) // PAGE * PAGE, min(b, self.hi)
            if b > a:
                _madvise(a, b - a, MADV_WILLNEED)


def _byte_bounds(arr: np.ndarray):
    try:
        from numpy.lib.array_utils import byte_bounds
    except ImportError:  # numpy < 2
        byte_bounds = np.byte_bounds
    return byte_bounds(arr)


# --------------------------------------------------------------------------------------------------- safetensors
class SafetensorsFile(_Mapped):
    def __init__(self, path: str):
        self.path = path
        self.infos = {}
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConvertError(f"{path}: not a safetensors file (only {size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise ConvertError(f"{path}: corrupt or truncated safetensors file: header claims {n} bytes, "
                                   f"file has {size}")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except (UnicodeDecodeError, ValueError) as e:
            raise ConvertError(f"{path}: corrupt safetensors header ({e})") from None
        self.data_start = 8 + n
        data_len = size - self.data_start
        header.pop("__metadata__", None)
        for key, ent in header.items():
            try:
                code, shape, (b, e) = ent["dtype"], tuple(int(s) for s in ent["shape"]), ent["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ConvertError(f"{path}: corrupt safetensors header entry for {key!r}: {ent!r}") from None
            if code not in ST_DTYPES:
                raise ConvertError(f"{path}: tensor {key!r} has dtype {code}, which the converter does not support "
                                   f"(supported: {', '.join(ST_DTYPES)})")
            info = TensorInfo(key, ST_DTYPES[code], shape, path, self.data_start + int(b))
            if any(s < 0 for s in shape) or int(e) - int(b) != info.nbytes or int(b) < 0:
                raise ConvertError(f"{path}: corrupt safetensors header: tensor {key!r} shape {list(shape)} {code} "
                                   f"needs {info.nbytes} bytes but data_offsets are [{b}, {e}]")
            if int(e) > data_len:
                raise ConvertError(f"{path}: truncated: tensor {key!r} ends at byte {self.data_start + int(e)} "
                                   f"but the file has only {size} bytes")
            self.infos[key] = info
        self._mm = None
        self._buf = None

    def _map(self):
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(self.path) else None
            if self._mm is not None:
                self._buf = np.frombuffer(self._mm, dtype=np.uint8)
                self.lo = self.file_base = self._buf.ctypes.data
                self.hi = self.lo + self._buf.size
        return self._buf

    def get(self, key: str) -> np.ndarray:
        info = self.infos[key]
        if info.nbytes == 0:
            return np.empty(info.shape, STORAGE[info.dtype])
        buf = self._map()
        raw = buf[info.offset:info.offset + info.nbytes]
        return raw.view(STORAGE[info.dtype]).reshape(info.shape)

    def close(self):
        self.release()
        self._buf = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:   # a view is still alive somewhere; the mapping goes with it
                pass
            self._mm = None
        self.lo = self.hi = 0
        self.file_base = None
        self._close_fd()


# --------------------------------------------------------------------------------------------------- torch .bin
TORCH_DTYPES = {"torch.bfloat16": "bfloat16", "torch.float16": "float16", "torch.float32": "float32",
                "torch.float64": "float64", "torch.int64": "int64", "torch.int32": "int32", "torch.int16": "int16",
                "torch.int8": "int8", "torch.uint8": "uint8", "torch.bool": "bool"}


class TorchBinFile(_Mapped):
    def __init__(self, path: str):
        self.path = path
        try:
            import torch
        except ImportError:
            raise ConvertError(f"{path}: reading torch .bin checkpoints needs torch (pip install torch); "
                               f"safetensors checkpoints do not") from None
        self._torch = torch
        sd = self._load(path)
        if not isinstance(sd, dict):
            raise ConvertError(f"{path}: expected a dict of tensors (a state_dict), got {type(sd).__name__}")
        self._sd = {}
        self.infos = {}
        lo, hi = None, None
        for key, t in sd.items():
            if not isinstance(t, torch.Tensor):
                raise ConvertError(f"{path}: entry {key!r} is a {type(t).__name__}, not a tensor")
            dt = TORCH_DTYPES.get(str(t.dtype))
            if dt is None:
                raise ConvertError(f"{path}: tensor {key!r} has dtype {t.dtype}, which the converter does not support")
            st = t.untyped_storage()
            ptr, n = st.data_ptr(), st.nbytes()
            if n:
                lo = ptr if lo is None else min(lo, ptr)
                hi = ptr + n if hi is None else max(hi, ptr + n)
            self._sd[key] = t
            self.infos[key] = TensorInfo(key, dt, tuple(t.shape), path, ptr + t.storage_offset() * t.element_size())
        if self._mmapped and lo is not None:
            self.lo, self.hi = lo, hi
            self.file_base = self._find_base()

    def _find_base(self):
        """Address where torch mapped file offset 0 (from /proc/self/maps), checked against the file's bytes; None
        where it cannot be found (then bytes are copied through memory instead of file to file)."""
        try:
            st = os.stat(self.path)
            with open("/proc/self/maps") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) < 5 or parts[4] != str(st.st_ino) or int(parts[2], 16) != 0:
                        continue
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    if start <= self.lo and self.hi <= end:
                        break
                else:
                    return None
            key = min((k for k in self._sd if self.infos[k].nbytes), key=lambda k: self.infos[k].offset)
            probe = self.get(key).reshape(-1)[:64].tobytes()
            with open(self.path, "rb") as f:
                f.seek(self.infos[key].offset - start)
                return start if f.read(len(probe)) == probe else None
        except (OSError, ValueError):
            return None

    def _load(self, path):
        """torch.load(weights_only=True, mmap=True); every failure becomes one message naming the file."""
        import pickle
        torch = self._torch
        self._mmapped = True
        try:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap can only be used" not in str(e):
                    raise
            self._mmapped = False   # not a zip archive: a legacy (pre-1.6) checkpoint, or not a checkpoint at all
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
            if "weights only" not in str(e).lower() and "GLOBAL" not in detail:
                raise ConvertError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {detail}"
                                   ) from None
            raise ConvertError(f"{path}: refused: this .bin's pickle asks for more than plain tensors ({detail}); "
                               f"loading it could run code, so it is not loaded (torch.load weights_only=True)"
                               ) from None
        except Exception as e:   # noqa: BLE001 - torch raises many types; the user gets one line naming the file
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConvertError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): "
                               f"{type(e).__name__}: {msg}") from None

    def get(self, key: str) -> np.ndarray:
        torch = self._torch
        t = self._sd[key]
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16)
        return t.numpy()

    def close(self):
        self.release()
        self._sd = {}
        self.lo = self.hi = 0
        self.file_base = None
        self._close_fd()


# --------------------------------------------------------------------------------------------------- .pdparams
class _Data:
    """Where a pickled bytes object's payload lies in the file (it is never read by the unpickler)."""
    __slots__ = ("offset", "length")

    def __init__(self, offset, length):
        self.offset, self.length = offset, length


class _ArrayStub:
    """Stands in for numpy's _reconstruct(ndarray, ...) result; BUILD hands it the ndarray state."""
    __slots__ = ("state",)

    def __init__(self, *args):
        self.state = None

    def __setstate__(self, state):
        self.state = state


class _PdparamsUnpickler(pickle._Unpickler):
    """Reads a .pdparams (a pickle of {name: ndarray}) without reading the arrays: large byte strings become file
    offsets. Only numpy's array/dtype reconstruction is allowed; any other global is refused (no code runs)."""

    dispatch = dict(pickle._Unpickler.dispatch)
    SAFE = {("numpy", "dtype"): np.dtype, ("collections", "OrderedDict"): dict}
    STUB = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray")}

    def __init__(self, f, path):
        super().__init__(f)
        self._f, self._path = f, path

    def find_class(self, module, name):
        if (module, name) in self.STUB:
            return _ArrayStub
        if (module, name) in self.SAFE:
            return self.SAFE[(module, name)]
        raise ConvertError(f"{self._path}: refused: the pickle asks for {module}.{name}; a .pdparams holds only "
                           f"arrays (loading it could run code)")

    def _bytes(self, n):
        fr = self._unframer.current_frame
        if fr is not None and fr.tell() < len(fr.getbuffer()):   # inside a protocol-4 frame: small, read it
            self.append(self.read(n))
            return
        pos = self._f.tell()
        self._f.seek(n, 1)
        self.append(_Data(pos, n))

    def load_binbytes(self):
        (n,) = struct.unpack("<I", self.read(4))
        self._bytes(n)

    def load_binbytes8(self):
        (n,) = struct.unpack("<Q", self.read(8))
        self._bytes(n)

    dispatch[pickle.BINBYTES[0]] = load_binbytes
    dispatch[pickle.BINBYTES8[0]] = load_binbytes8


class PdparamsFile(_Mapped):
    """A .pdparams shard (ours or paddle.save's dict of arrays), memory-mapped; uint16 arrays are bfloat16."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                obj = _PdparamsUnpickler(f, path).load()
        except ConvertError:
            raise
        except Exception as e:  # noqa: BLE001 - truncated / not a pickle
            raise ConvertError(f"{path}: not a readable .pdparams (truncated or corrupt?): "
                               f"{type(e).__name__}: {e}") from None
        if not isinstance(obj, dict):
            raise ConvertError(f"{path}: expected a dict of arrays, got {type(obj).__name__}")
        self.infos, self._small, self._order = {}, {}, {}
        for key, v in obj.items():
            if isinstance(v, dict) and key == "StructuredToParameterName@@":   # paddle.save's name table
                continue
            try:
                _, shape, dt, fortran, data = v.state
                shape, dt = tuple(int(x) for x in shape), np.dtype(dt)
            except (AttributeError, TypeError, ValueError):
                raise ConvertError(f"{path}: entry {key!r} is not a plain array") from None
            name = "bfloat16" if dt == np.uint16 else dt.name
            if name not in STORAGE or not (dt.isnative or dt.itemsize == 1):
                raise ConvertError(f"{path}: entry {key!r} has dtype {dt}, which is not supported")
            info = TensorInfo(key, name, shape, path, data.offset if isinstance(data, _Data) else 0)
            n = data.length if isinstance(data, _Data) else len(data)
            if n != info.nbytes or (isinstance(data, _Data) and data.offset + n > size):
                raise ConvertError(f"{path}: entry {key!r} {list(shape)} {name} needs {info.nbytes} bytes, "
                                   f"the file has {n if not isinstance(data, _Data) else size - data.offset}")
            if not isinstance(data, _Data):
                self._small[key] = bytes(data)
            self._order[key] = bool(fortran)
            self.infos[key] = info
        self._mm = self._buf = None

    _map = SafetensorsFile._map

    def get(self, key: str) -> np.ndarray:
        info = self.infos[key]
        dt = STORAGE[info.dtype]
        if key in self._small or info.nbytes == 0:
            raw = np.frombuffer(self._small.get(key, b""), dtype=dt)
        else:
            raw = self._map()[info.offset:info.offset + info.nbytes].view(dt)
        return raw.reshape(info.shape, order="F" if self._order[key] else "C")

    close = SafetensorsFile.close


def open_file(path: str):
    if path.endswith(".safetensors"):
        return SafetensorsFile(path)
    if path.endswith(".pdparams"):
        return PdparamsFile(path)
    return TorchBinFile(path)


# --------------------------------------------------------------------------------------------------- a folder
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class Source:
    folder: str
    config: dict
    format: str                                   # "safetensors" | "bin"
    files: list                                   # paths, in reading order
    tensors: dict                                 # key -> TensorInfo (in file, offset order)
    index_file: Optional[str] = None
    notes: list = field(default_factory=list)     # warnings for the user (e.g. a wrong index)
    readers: dict = field(default_factory=dict)   # path -> open reader (headers parsed, nothing read yet)

    def keys(self):
        return list(self.tensors)

    def reader(self, key: str):
        return self.readers[self.tensors[key].file]

    def close(self):
        for r in self.readers.values():
            r.close()
        self.readers = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _weight_files(folder):
    """-> (index path or None, [weight files])"""
    for idx in INDEX_FILES:
        p = os.path.join(folder, idx)
        if os.path.exists(p):
            try:
                with open(p, encoding="utf-8") as f:
                    index = json.load(f)
                wm = index["weight_map"]
                if not isinstance(wm, dict):
                    raise TypeError("weight_map is not an object")
            except (ValueError, KeyError, TypeError) as e:
                raise ConvertError(f"{p}: corrupt index ({type(e).__name__}: {e})") from None
            names = sorted(set(wm.values()))
            missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
            if missing:
                raise ConvertError(f"{p} names shard file(s) that do not exist in {folder}: {', '.join(missing)}")
            return p, wm, [os.path.join(folder, n) for n in names]
    for pat in ("model.safetensors", "*.safetensors", "pytorch_model.bin", "pytorch_model*.bin", "*.bin"):
        hits = sorted(glob.glob(os.path.join(glob.escape(folder), pat)))
        if hits:
            return None, None, hits
    raise ConvertError(f"{folder}: no weights found (looked for {', '.join(INDEX_FILES)}, *.safetensors, "
                       f"pytorch_model*.bin)")


def _names(keys, n=8):
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" ... and {len(keys) - n} more" if len(keys) > n else "")


def open_source(folder: str) -> Source:
    """Read config.json and every weight file's header; check the index against the files."""
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise ConvertError(f"{folder}: not a folder")
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConvertError(f"{folder}: no config.json (the converter needs the upstream config to pick the model)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as e:
        raise ConvertError(f"{cfg_path}: not valid JSON ({e})") from None
    index_path, wm, paths = _weight_files(folder)
    fmt = "safetensors" if paths[0].endswith(".safetensors") else "bin"
    tensors, where, notes, readers = {}, {}, [], {}
    try:
        for p in paths:
            r = readers[p] = open_file(p)
            for k, info in sorted(r.infos.items(), key=lambda kv: kv[1].offset):
                if k in where:
                    raise ConvertError(f"tensor {k!r} is in two files: {where[k]} and {p}")
                where[k] = p
                tensors[k] = info
    except BaseException:
        for r in readers.values():
            r.close()
        raise
    src = Source(folder, config, fmt, paths, tensors, index_path, notes, readers)
    if wm is not None:
        iname = os.path.basename(index_path)
        missing = [k for k in wm if k not in where]
        if missing:
            src.close()
            raise ConvertError(f"{index_path} lists {len(missing)} tensor(s) that none of its files holds: "
                               f"{_names(missing)}")
        moved = [k for k, fn in wm.items() if os.path.basename(where[k]) != fn]
        if moved:
            k = moved[0]
            notes.append(f"{iname} is wrong about {len(moved)} of {len(wm)} tensors' files (e.g. {k}: index says "
                         f"{wm[k]}, it is in {os.path.basename(where[k])}); using what the files hold")
        extra = [k for k in where if k not in wm]
        if extra:
            notes.append(f"{iname} does not list {len(extra)} tensor(s) found in its files: {_names(extra)}")
    return src
