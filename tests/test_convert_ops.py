"""Unit tests of the converter's ops, dtype casts and streaming writers (against independent computations)."""
import os
import pickle

import numpy as np
import pytest

from convert import writers
from convert.ops import OpError, Rule, cast, chain, drop, keep, regroup, reshape, split, transpose
from convert.writers import IOThread, PdparamsShard, SafetensorsShard, cast_words, emit

from test_convert_support import same_words

RNG = np.random.default_rng(1)


def words(shape, dtype=np.uint16):
    if np.dtype(dtype).kind == "f":
        return RNG.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


# --------------------------------------------------------------------------------------------------- ops
def run(op, a, dtype="bfloat16"):
    outs = op.apply(a, dtype)
    assert [tuple(o.shape) for o, _ in outs] == [tuple(s) for s in op.shapes(a.shape)]
    return [o for o, _ in outs]


def test_keep_transpose_reshape():
    a = words((5, 7))
    assert same_words(run(keep(), a)[0], a)
    (t,) = run(transpose(), a)
    assert t.shape == (7, 5) and all(t[j, i] == a[i, j] for i in range(5) for j in range(7))
    (r,) = run(reshape([-1]), words((1, 1, 9)))
    assert r.shape == (9,)
    with pytest.raises(OpError, match="2-D"):
        transpose().shapes((3,))
    with pytest.raises(OpError, match="cannot reshape"):
        reshape([4]).shapes((1, 1, 9))


def test_split_axes_and_rest():
    a = words((10, 6))
    p = run(split([3, -1, 2]), a)
    assert [x.shape[0] for x in p] == [3, 5, 2]
    assert same_words(np.concatenate(p), a)
    q = run(split([2, 4], axis=1), a)
    assert same_words(q[0], a[:, :2]) and same_words(q[1], a[:, 2:])
    with pytest.raises(OpError, match="sum to 9"):
        split([4, 5]).shapes((10, 6))


def test_regroup_matches_explicit_loop():
    groups, sizes, cols = 3, [4, 2, 2], 5
    a = words((groups * sum(sizes), cols))
    outs = run(regroup(groups, sizes), a)
    starts = np.cumsum([0] + sizes)
    for i, out in enumerate(outs):
        rows = [g * sum(sizes) + r for g in range(groups) for r in range(starts[i], starts[i + 1])]
        assert same_words(out, a[rows])
    # along axis 1 too
    b = words((3, groups * sum(sizes)))
    outs = run(regroup(groups, sizes, axis=1), b)
    for i, out in enumerate(outs):
        cols_i = [g * sum(sizes) + r for g in range(groups) for r in range(starts[i], starts[i + 1])]
        assert same_words(out, b[:, cols_i])
    with pytest.raises(OpError, match="needs 24"):
        regroup(3, [4, 2, 2]).shapes((25, 5))


def test_chain_applies_after_multi_output_to_every_output():
    a = words((8, 3))
    outs = run(chain(split([5, 3]), transpose()), a)
    assert same_words(outs[0], a[:5].T) and same_words(outs[1], a[5:].T)
    assert chain(split([5, 3]), transpose()).shapes((8, 3)) == [(3, 5), (3, 3)]
    assert drop("unused").shapes((8, 3)) == [] and drop("unused").apply(a, "bfloat16") == []
    c = chain(transpose(), cast("float32"))
    assert c.out_dtypes("bfloat16") == ["float32"]
    ((got, dt),) = c.apply(a, "bfloat16")
    assert dt == "float32" and same_words(got, cast_words(np.ascontiguousarray(a.T), "bfloat16", "float32"))
    with pytest.raises(OpError, match="reason"):
        drop("")


def test_rule_targets_and_groups():
    r = Rule(r"h\.(\d+)\.(?P<kind>w|b)", ("x.{1}.{kind}", "y.{1}"), split([1, 1]))
    m = r.match("h.12.w")
    assert r.target_names(m) == ["x.12.w", "y.12"]
    assert r.match("h.12.wx") is None          # full match only
    with pytest.raises(OpError, match="group"):
        Rule(r"a\.(\d+)", "b.{2}").target_names(Rule(r"a\.(\d+)", "b.{2}").match("a.1"))
    with pytest.raises(OpError, match="no targets"):
        Rule("x", "y", drop("why"))


# --------------------------------------------------------------------------------------------------- casts
def test_bf16_casts_match_torch():
    torch = pytest.importorskip("torch")
    w = words((4096,))                                  # every kind of bit pattern, NaNs included
    ref = torch.from_numpy(w.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert same_words(cast_words(w, "bfloat16", "float32"), ref)
    f = np.concatenate([RNG.standard_normal(5000).astype(np.float32) * 10.0 ** RNG.integers(-40, 38, 5000),
                        np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-45], np.float32)]).astype(np.float32)
    got = cast_words(f, "float32", "bfloat16")
    ref = torch.from_numpy(f).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert same_words(got, ref)                          # round-to-nearest-even like torch
    nan = np.array([np.nan, -np.nan], np.float32)
    back = cast_words(cast_words(nan, "float32", "bfloat16"), "bfloat16", "float32")
    assert np.isnan(back).all()
    h = cast_words(w, "bfloat16", "float16")
    ref16 = torch.from_numpy(w.view(np.int16)).view(torch.bfloat16).float().half().numpy()
    nan = np.isnan(ref16)
    assert (np.isnan(h) == nan).all() and same_words(h[~nan], ref16[~nan])   # NaN payloads: library-defined


# --------------------------------------------------------------------------------------------------- writers
@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 256 bytes, so even tiny arrays take the multi-block (scatter) paths."""
    monkeypatch.setattr(writers, "BLOCK", 256)
    monkeypatch.setattr(writers, "TILE", 4)


def write_raw(tmp_path, arr, din, dout, base=0):
    path = str(tmp_path / "raw.bin")
    io = IOThread()
    out = writers.OutFile(path)
    released = []
    try:
        n = emit(io, out, base, arr, din, dout, source=type("Src", (), {"release": lambda self, v: released.append(v.size)})())
        io.flush()
    finally:
        out.close()
        io.close()
    with open(path, "rb") as f:
        return n, f.read()[base:], released


@pytest.mark.parametrize("blocks", [False, True])
def test_emit_paths(tmp_path, request, blocks):
    if blocks:
        request.getfixturevalue("small_blocks")
    base = words((37, 29))
    views = {"contiguous": base, "transposed": base.T, "column slice": base[:, 3:17],
             "transposed slice": base[5:30].T, "split then transpose": base[:, 2:20].T,
             "3-d strided": base[:36].reshape(4, 9, 29)[:, ::2, 1:]}
    for name, v in views.items():
        n, raw, released = write_raw(tmp_path, v, "bfloat16", "bfloat16")
        assert n == v.size * 2 and raw == np.ascontiguousarray(v).tobytes(), name
        assert sum(released) >= v.size, name            # every source block is offered for release
        n, raw, _ = write_raw(tmp_path, v, "bfloat16", "float32")
        assert raw == cast_words(np.ascontiguousarray(v), "bfloat16", "float32").tobytes(), name


def test_pdparams_shard_is_what_pickle_and_paddle_read(tmp_path, small_blocks):
    import paddle
    arrays = {"bf16.weight": (words((33, 21)).T, "bfloat16"), "fp32": (words((6,), np.float32), "float32"),
              "fp16": (words((2, 3, 4), np.float16), "float16"), "ids": (words((300,), np.int64), "int64"),
              "scalar": (np.array(7, np.int32), "int32"), "empty": (np.zeros((0, 5), np.float32), "float32"),
              "mask": (np.array([True, False, True]), "bool"), "名字.unicode": (words((3,), np.float32), "float32"),
              "big_dims": (words((1, 70000), np.uint8), "uint8")}
    path = str(tmp_path / "model_state.pdparams")
    io = IOThread()
    try:
        shard = PdparamsShard(path, io, [])
        for k, (a, d) in arrays.items():
            shard.add(k, a, d, d, a.shape)
        shard.close()
    finally:
        io.close()
    with open(path, "rb") as f:
        got = pickle.load(f)
    assert list(got) == list(arrays)
    for k, (a, d) in arrays.items():
        assert got[k].flags.c_contiguous and same_words(got[k], a), k
    loaded = paddle.load(path)
    assert str(loaded["bf16.weight"].dtype) == "paddle.bfloat16"
    np.testing.assert_array_equal(loaded["bf16.weight"].astype("float32").numpy(),
                                  cast_words(np.ascontiguousarray(arrays["bf16.weight"][0]), "bfloat16", "float32"))
    assert same_words(paddle.load(path, return_numpy=True)["fp16"], arrays["fp16"][0])
    assert loaded["ids"].dtype == paddle.int64 and list(loaded["empty"].shape) == [0, 5]


def test_safetensors_shard_reads_back(tmp_path, small_blocks):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file
    a, b = words((19, 11)), words((4, 5), np.float32)
    entries = [("a", (11, 19), "bfloat16"), ("b", (4, 5), "float32")]
    path = str(tmp_path / "model.safetensors")
    io = IOThread()
    try:
        shard = SafetensorsShard(path, io, entries)
        shard.add("a", a.T, "bfloat16", "bfloat16", (11, 19))
        shard.add("b", b, "float32", "float32", (4, 5))
        shard.close()
    finally:
        io.close()
    got = load_file(path)
    assert got["a"].dtype == torch.bfloat16
    assert same_words(got["a"].view(torch.int16).numpy(), a.T) and same_words(got["b"].numpy(), b)


def test_pack_shards_greedy():
    assert writers.pack_shards([3, 3, 3, 9, 1], 6) == [[0, 1], [2], [3], [4]]
    assert writers.pack_shards([], 6) == [[]]
    assert writers.shard_names("pdparams", 1) == ["model_state.pdparams"]
    assert writers.shard_names("safetensors", 2) == ["model-00001-of-00002.safetensors",
                                                     "model-00002-of-00002.safetensors"]


def test_pdparams_reader_maps_paddle_save_files_and_refuses_code(tmp_path):
    import paddle
    from convert.readers import ConvertError, PdparamsFile
    a = words((300, 70))                                     # > 64 KB: stored outside pickle frames
    state = {"w": paddle.to_tensor(a.view(np.uint16)), "b": paddle.to_tensor(np.arange(5, dtype=np.float32)),
             "i": paddle.to_tensor(np.array([3, 4], np.int64))}
    path = str(tmp_path / "saved.pdparams")
    paddle.save(state, path)
    r = PdparamsFile(path)
    try:
        assert {k: i.dtype for k, i in r.infos.items()} == {"w": "bfloat16", "b": "float32", "i": "int64"}
        assert same_words(r.get("w"), a) and same_words(r.get("b"), np.arange(5, dtype=np.float32))
        assert r.get("i").tolist() == [3, 4]
    finally:
        r.close()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo PWNED",))
    bad = str(tmp_path / "evil.pdparams")
    with open(bad, "wb") as f:
        pickle.dump({"w": np.zeros(2, np.float32), "x": Evil()}, f, protocol=4)
    with pytest.raises(ConvertError, match="refused: the pickle asks for (posix|os).system"):
        PdparamsFile(bad)
    with open(bad, "wb") as f:
        f.write(open(path, "rb").read()[:200])
    with pytest.raises(ConvertError, match="truncated or corrupt"):
        PdparamsFile(bad)



@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.int64, np.uint8])
def test_transpose_into_every_path(dtype):
    from convert.writers import transpose_into
    for shape in [(7, 5), (300, 1024), (1031, 2052), (2050, 1030), (4099, 520)]:   # small, wide, odd, multi-thread
        a = words(shape, dtype)
        for v in (a, a[:, 4:], a[3:-2], a[:, 1:]):
            out = np.empty(v.shape[::-1], dtype)
            transpose_into(out, v)
            assert np.array_equal(out, v.T), (shape, v.strides)


def test_direct_io_layout_is_aligned_and_exact(tmp_path, monkeypatch):
    """Large tensors get block-aligned data written with O_DIRECT; the files still read back exactly."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file
    from convert.readers import PdparamsFile, SafetensorsFile
    monkeypatch.setattr(writers, "DIRECT_MIN", 4096)
    probe = writers.OutFile(str(tmp_path / "probe"))
    has_direct = probe.dfd is not None
    probe.close()
    if not has_direct:
        pytest.skip("this filesystem refuses O_DIRECT (everything goes through the page cache)")
    arrays = [("small", words((3, 5)), "bfloat16"), ("big.T", words((1536, 1030)).T, "bfloat16"),
              ("odd", words((4099,)), "bfloat16"), ("big.f32", words((700, 600), np.float32), "float32"),
              ("cast", words((1200, 900)), "bfloat16")]          # bf16 -> f32: not from the pool, page cache
    for fmt, shard_cls, name in (("pdparams", PdparamsShard, "s.pdparams"),
                                 ("safetensors", SafetensorsShard, "s.safetensors")):
        path = str(tmp_path / name)
        io = IOThread()
        entries = [(k, a.shape, "float32" if k == "cast" else d) for k, a, d in arrays]
        try:
            shard = shard_cls(path, io, entries)
            for k, a, d in arrays:
                shard.add(k, a, d, "float32" if k == "cast" else d, a.shape)
            shard.close()
        finally:
            io.close()
        r = PdparamsFile(path) if fmt == "pdparams" else SafetensorsFile(path)
        try:
            for k, a, d in arrays:
                want = cast_words(np.ascontiguousarray(a), d, "float32") if k == "cast" else a
                assert same_words(r.get(k), want), (fmt, k)
                if r.infos[k].nbytes >= 4096 and (fmt == "pdparams" or r.infos[k].nbytes % 4096 == 0):
                    assert r.infos[k].offset % writers.ALIGN == 0, (fmt, k)
        finally:
            r.close()
        if fmt == "pdparams":
            import paddle
            assert same_words(pickle.load(open(path, "rb"))["big.T"], arrays[1][1])
            assert same_words(paddle.load(path, return_numpy=True)["odd"], arrays[2][1])
        else:
            got = load_file(path)
            assert same_words(got["big.T"].view(torch.int16).numpy(), arrays[1][1])
