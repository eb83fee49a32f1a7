"""End-to-end converter tests with a tiny test-only family (see test_convert_support.py): every reader x writer x
dtype, sharding, the index, extra files, the config tag, dry-run, the loader, and `python -m convert`."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import test_convert_support as S
from convert.cli import main as convert_main
from paddlevl.checkpoint import CheckpointError, load_model, load_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = S.tiny_config()


@pytest.fixture(scope="module", autouse=True)
def family():
    return S.register()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{(format, dtype, shards): (folder, words)}: the same tiny model written every upstream way."""
    base = tmp_path_factory.mktemp("src")
    out = {}
    for fmt in ("safetensors", "bin"):
        for dtype in ("bfloat16", "float32"):
            for shards in (1, 3):
                words = S.make_words(CFG, dtype, seed=len(out))
                folder = str(base / f"{fmt}_{dtype}_{shards}")
                out[(fmt, dtype, shards)] = (S.write_checkpoint(folder, CFG, words, dtype, fmt, shards), words)
    return out


def convert(src, dst, *args):
    return convert_main([src, dst, "--no-progress", *args])


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("out_fmt", ["pdparams", "safetensors"])
def test_bit_exact_every_reader_and_writer(sources, tmp_path, fmt, dtype, shards, out_fmt):
    src, words = sources[(fmt, dtype, shards)]
    dst = str(tmp_path / "out")
    assert convert(src, dst, "--format", out_fmt) == 0
    expected = S.expected_paddle(CFG, words)
    state = load_state(dst)
    assert set(state) == set(expected)
    for k, v in expected.items():
        assert S.same_words(state[k], v), k                 # NaN payloads and all: nothing was rounded
    single = "model_state.pdparams" if out_fmt == "pdparams" else "model.safetensors"
    assert os.path.isfile(os.path.join(dst, single))
    tag = json.load(open(os.path.join(dst, "config.json")))["paddlevl"]
    assert tag["family"] == S.FAMILY and tag["weight_layout"] == out_fmt and tag["dtype"] == dtype
    assert tag["source"]["format"] == fmt and tag["weights"] == single


def test_paddle_load_reads_our_shards(sources, tmp_path):
    import paddle
    src, words = sources[("bin", "bfloat16", 3)]
    dst = str(tmp_path / "out")
    assert convert(src, dst, "--max-shard-size", "3KB") == 0
    index = json.load(open(os.path.join(dst, "model_state.pdparams.index.json")))
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 1 and files == [f"model_state-{k:05d}-of-{n:05d}.pdparams" for k in range(1, n + 1)]
    assert sorted(f for f in os.listdir(dst) if f.endswith(".pdparams")) == files
    expected = S.expected_paddle(CFG, words)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in expected.values())
    seen = {}
    for fn in files:
        assert os.path.getsize(os.path.join(dst, fn)) < 3000 + 2000   # shard limit + pickle opcodes
        for k, t in paddle.load(os.path.join(dst, fn)).items():
            assert index["weight_map"][k] == fn
            assert str(t.dtype) == "paddle.bfloat16"
            seen[k] = t
    assert set(seen) == set(expected)
    for k, t in seen.items():   # paddle's own bf16 -> fp32 against ours on the expected words
        got = t.astype("float32").numpy()
        want = S.bf16_words_to_f32(expected[k])
        assert np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(got[~np.isnan(got)],
                                                                              want[~np.isnan(want)]), k


def test_safetensors_output_is_standard(sources, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file
    src, words = sources[("safetensors", "bfloat16", 1)]
    dst = str(tmp_path / "out")
    assert convert(src, dst, "--format", "safetensors", "--max-shard-size", "4KB") == 0
    index = json.load(open(os.path.join(dst, "model.safetensors.index.json")))
    expected = S.expected_paddle(CFG, words)
    got = {}
    for fn in sorted(set(index["weight_map"].values())):
        assert fn.startswith("model-") and fn.endswith(".safetensors")
        got.update(load_file(os.path.join(dst, fn)))
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == torch.bfloat16 and S.same_words(got[k].view(torch.int16).numpy(), v), k


@pytest.mark.parametrize("out_dtype", ["float32", "float16", "bfloat16"])
def test_dtype_option(sources, tmp_path, out_dtype):
    torch = pytest.importorskip("torch")
    for src_dtype in ("bfloat16", "float32"):
        src, words = sources[("safetensors", src_dtype, 1)]
        dst = str(tmp_path / f"{src_dtype}_{out_dtype}")
        assert convert(src, dst, "--dtype", out_dtype) == 0
        state = load_state(dst)
        tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[out_dtype]
        for k, v in S.expected_paddle(CFG, words).items():
            ref = S.to_torch(v, src_dtype).to(tdt)                        # torch's own conversion
            ref = ref.view(torch.int16).numpy() if out_dtype == "bfloat16" else ref.numpy()
            got = state[k]
            assert got.dtype.itemsize == ref.dtype.itemsize, k
            as_f = (lambda a: S.bf16_words_to_f32(a.view(np.uint16))) if out_dtype == "bfloat16" else (lambda a: a)
            g, r = as_f(got), as_f(ref)
            nan = np.isnan(r.astype(np.float32))
            assert (np.isnan(g.astype(np.float32)) == nan).all() and S.same_words(g[~nan], r[~nan]), k
        tag = json.load(open(os.path.join(dst, "config.json")))["paddlevl"]
        assert tag["dtype"] == out_dtype


def test_load_model_strict_and_dtype(sources, tmp_path):
    import paddle
    src, words = sources[("bin", "float32", 1)]
    dst = str(tmp_path / "out")
    assert convert(src, dst) == 0
    model = load_model(dst)
    assert not model.training
    expected = S.expected_paddle(CFG, words)
    sd = model.state_dict()
    assert set(sd) == set(expected)
    for k, v in expected.items():
        assert S.same_words(sd[k].numpy(), v), k
    # the converted Linear computes x @ W_torch.T + b, as upstream torch does
    x = np.random.default_rng(0).standard_normal((3, CFG["hidden_size"])).astype(np.float32)
    w = words["model.layers.0.attn.qkv.weight"]
    b = words["model.layers.0.attn.qkv.bias"]
    nq = CFG["hidden_size"] // CFG["num_key_value_heads"]
    d = CFG["hidden_size"] // CFG["num_attention_heads"]
    q_rows = np.concatenate([np.arange(g * (nq + 2 * d), g * (nq + 2 * d) + nq)
                             for g in range(CFG["num_key_value_heads"])])
    got = model.layers[0].q_proj(paddle.to_tensor(x)).numpy()
    np.testing.assert_allclose(got, x @ w[q_rows].T + b[q_rows], rtol=1e-5, atol=1e-5)
    # compute dtype option
    m16 = load_model(dst, dtype="bfloat16")
    assert str(m16.lm_head.weight.dtype) == "paddle.bfloat16"
    # strict: a folder missing a weight is refused with the name
    state = load_state(dst)
    state.pop("norm.bias")
    import pickle
    with open(os.path.join(dst, "model_state.pdparams"), "wb") as f:
        pickle.dump(state, f, protocol=4)
    with pytest.raises(CheckpointError, match="norm.bias"):
        load_model(dst)


def test_loader_refuses_unconverted_folder(sources):
    src, _ = sources[("bin", "float32", 1)]
    with pytest.raises(CheckpointError, match="paddlevl convert"):
        load_model(src)


def test_extra_files_and_config_tag(sources, tmp_path):
    src, _ = sources[("safetensors", "bfloat16", 3)]
    dst = str(tmp_path / "out")
    assert convert(src, dst) == 0
    files = sorted(os.path.relpath(os.path.join(r, f), dst) for r, _, fs in os.walk(dst) for f in fs)
    assert files == ["config.json", "generation_config.json", "model_state.pdparams", "tokenizer.json",
                     "vision/config.json"]                              # README.md: not a family extra file
    cfg = json.load(open(os.path.join(dst, "config.json")))
    assert {k: v for k, v in cfg.items() if k != "paddlevl"} == CFG   # upstream config untouched
    assert not any(p.startswith("out.partial") for p in os.listdir(tmp_path))


def test_dry_run_prints_plan_and_writes_nothing(sources, tmp_path, capsys):
    src, _ = sources[("bin", "bfloat16", 3)]
    dst = str(tmp_path / "out")
    assert convert(src, dst, "--dry-run") == 0
    out = capsys.readouterr().out
    assert not os.path.exists(dst) and os.listdir(tmp_path) == []
    assert "model.layers.1.attn.qkv.weight [32, 16] bfloat16 -> layers.1.k_proj.weight [16, 8] bfloat16" in out
    assert "regroup(2, [8, 4, 4], axis=0) -> transpose" in out
    assert "model.rotary_emb.inv_freq [2] bfloat16  DROP: recomputed from the config at load time" in out
    assert "shard model_state.pdparams: 27 tensors" in out


def test_wrong_index_is_reported_and_files_are_trusted(sources, tmp_path, capsys):
    import shutil
    src0, words = sources[("safetensors", "bfloat16", 3)]
    src = str(tmp_path / "src")
    shutil.copytree(src0, src)
    ip = os.path.join(src, "model.safetensors.index.json")
    index = json.load(open(ip))
    keys = sorted(index["weight_map"])   # re-assign like a split over sorted names (the POINTS-1.5 release)
    files = sorted(set(index["weight_map"].values()))
    index["weight_map"] = {k: files[i * len(files) // len(keys)] for i, k in enumerate(keys)}
    json.dump(index, open(ip, "w"))
    dst = str(tmp_path / "out")
    assert convert(src, dst) == 0
    err = capsys.readouterr().err
    assert "model.safetensors.index.json is wrong about" in err and "using what the files hold" in err
    state = load_state(dst)
    assert all(S.same_words(state[k], v) for k, v in S.expected_paddle(CFG, words).items())


def test_overwrite(sources, tmp_path):
    src, _ = sources[("safetensors", "float32", 1)]
    dst = str(tmp_path / "out")
    os.makedirs(dst)
    open(os.path.join(dst, "stale.txt"), "w").close()
    assert convert(src, dst) == 1 and os.listdir(dst) == ["stale.txt"]
    assert convert(src, dst, "--overwrite") == 0
    assert "stale.txt" not in os.listdir(dst) and sorted(os.listdir(tmp_path)) == ["out"]


def test_python_m_convert(sources, tmp_path):
    src, words = sources[("bin", "bfloat16", 1)]
    dst = str(tmp_path / "out")
    code = ("import sys, runpy; sys.path.insert(0, sys.argv.pop(1)); import test_convert_support as S; "
            "S.register(); sys.argv[0] = 'convert'; runpy.run_module('convert', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "tests"), src, dst, "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    assert "wrote 27 tensors" in r.stderr
    assert all(S.same_words(load_state(dst)[k], v) for k, v in S.expected_paddle(CFG, words).items())


def test_api_convert_returns_summary(sources, tmp_path):
    from convert.engine import convert as api
    src, _ = sources[("safetensors", "bfloat16", 1)]
    res = api(src, str(tmp_path / "out"), progress=False)
    assert res["tensors"] == 27 and res["shards"] == 1 and res["bytes"] == sum(
        v.nbytes for v in S.expected_paddle(CFG, S.make_words(CFG)).values())


MEASURE = """
import sys
sys.path.insert(0, sys.argv.pop(1))
import test_convert_support as S
S.register()
from convert.cli import main
code = main(sys.argv[1:])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print("VMHWM", int(hwm) * 1024)
sys.exit(code)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_memory_stays_bounded(tmp_path):
    """One block at a time: the converter's peak memory above a dry run (same imports, same model build, no data)
    stays within a few blocks, far below the checkpoint, even for tensors larger than a block (scattered path)."""
    cfg = S.tiny_config(vocab=50000, hidden=1024, heads=8, kv_heads=4, ffn=2816, layers=2)
    words = S.make_words(cfg, "bfloat16", seed=3)
    total = sum(w.nbytes for w in words.values())
    src = S.write_checkpoint(str(tmp_path / "src"), cfg, words, "bfloat16", "safetensors", 2, extras=False)
    del words
    block = 16 << 20
    env = dict(os.environ, PYTHONPATH=ROOT, PADDLEVL_CONVERT_BLOCK=str(block))

    def peak(*args):
        r = subprocess.run([sys.executable, "-c", MEASURE, os.path.join(ROOT, "tests"), src, *args, "--no-progress"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return int(r.stdout.split("VMHWM")[1])

    base = peak(str(tmp_path / "plan"), "--dry-run")
    used = peak(str(tmp_path / "out")) - base
    assert total > 200e6
    assert used < 8 * block, f"converter used {used / 1e6:.0f} MB above the dry run for a {total / 1e6:.0f} MB checkpoint"
    state = load_state(str(tmp_path / "out"))
    exp = S.expected_paddle(cfg, S.make_words(cfg, "bfloat16", seed=3))
    assert all(S.same_words(state[k], v) for k, v in exp.items())
