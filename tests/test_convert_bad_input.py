"""Bad input: each case is a non-zero exit, one clear message naming the file / key, and nothing written."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

import test_convert_support as S
from convert.cli import main as convert_main
from paddlevl.checkpoint import load_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = S.tiny_config()


@pytest.fixture(scope="module", autouse=True)
def family():
    return S.register()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    base = tmp_path_factory.mktemp("pristine")
    words = S.make_words(CFG, "bfloat16")
    return {(fmt, shards): S.write_checkpoint(str(base / f"{fmt}{shards}"), CFG, words, "bfloat16", fmt, shards)
            for fmt in ("safetensors", "bin") for shards in (1, 2)}


@pytest.fixture
def src(pristine, tmp_path):
    """A fresh copy to damage: src(fmt, shards) -> folder."""
    def make(fmt="safetensors", shards=1):
        folder = str(tmp_path / "src")
        shutil.copytree(pristine[(fmt, shards)], folder)
        return folder
    return make


def refused(src, tmp_path, capsys, *args):
    """Run the converter, expect exit 1, nothing written next to DST; returns the error text."""
    dst = str(tmp_path / "out")
    before = set(os.listdir(tmp_path))
    code = convert_main([src, dst, "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 1, err
    assert not os.path.exists(dst)
    assert set(os.listdir(tmp_path)) == before - {"out"}, "something was left next to DST"
    assert err.startswith("paddlevl convert: error: "), err
    return err


def weight_file(folder):
    return next(os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith((".safetensors", ".bin")))


def test_truncated_safetensors_header(src, tmp_path, capsys):
    s = src()
    path = weight_file(s)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:100])               # header length says more than is there
    err = refused(s, tmp_path, capsys)
    assert path in err and "truncated" in err
    open(path, "wb").write(data[:5])
    assert "no header" in refused(s, tmp_path, capsys)


def test_corrupt_safetensors_header(src, tmp_path, capsys):
    s = src()
    path = weight_file(s)
    data = bytearray(open(path, "rb").read())
    data[8:12] = b"\xff\xfe{["
    open(path, "wb").write(bytes(data))
    err = refused(s, tmp_path, capsys)
    assert path in err and "corrupt safetensors header" in err


def test_truncated_safetensors_data(src, tmp_path, capsys):
    s = src()
    path = weight_file(s)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-64])
    err = refused(s, tmp_path, capsys)
    assert path in err and "truncated: tensor" in err


def test_truncated_bin(src, tmp_path, capsys):
    s = src("bin")
    path = weight_file(s)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    err = refused(s, tmp_path, capsys)
    assert path in err and "not a readable torch checkpoint" in err


class _Evil:
    """Unpickling this runs code (creates a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bin_whose_pickle_would_run_code_is_refused(src, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    s = src("bin")
    path = weight_file(s)
    marker = str(tmp_path / "PWNED")
    sd = torch.load(path, weights_only=True)
    sd["model.evil"] = _Evil(marker)
    torch.save(sd, path)
    err = refused(s, tmp_path, capsys)
    assert path in err and "refused" in err and "could run code" in err
    assert not os.path.exists(marker)


def test_index_naming_a_missing_shard(src, tmp_path, capsys):
    s = src("bin", 2)
    os.remove(os.path.join(s, "pytorch_model-00002-of-00002.bin"))
    err = refused(s, tmp_path, capsys)
    assert "pytorch_model.bin.index.json" in err and "pytorch_model-00002-of-00002.bin" in err


def test_index_listing_a_tensor_no_file_holds(src, tmp_path, capsys):
    s = src("safetensors", 2)
    ip = os.path.join(s, "model.safetensors.index.json")
    index = json.load(open(ip))
    index["weight_map"]["model.layers.9.attn.qkv.weight"] = "model-00001-of-00002.safetensors"
    json.dump(index, open(ip, "w"))
    err = refused(s, tmp_path, capsys)
    assert "model.safetensors.index.json" in err and "model.layers.9.attn.qkv.weight" in err


def _rewrite(folder, change):
    """Rewrite a single-file safetensors checkpoint after change(dict of torch tensors)."""
    from safetensors.torch import load_file, save_file
    path = os.path.join(folder, "model.safetensors")
    sd = load_file(path)
    change(sd)
    save_file(sd, path)


def test_unexpected_key(src, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    s = src()
    _rewrite(s, lambda sd: sd.__setitem__("model.layers.0.attn.extra_scale", torch.ones(3)))
    err = refused(s, tmp_path, capsys)
    assert "no rule consumes" in err and "model.layers.0.attn.extra_scale" in err


def test_missing_key(src, tmp_path, capsys):
    s = src()
    _rewrite(s, lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"))
    err = refused(s, tmp_path, capsys)
    assert "nothing produces" in err and "layers.1.down_proj.weight" in err


def test_shape_mismatch(src, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    s = src()
    _rewrite(s, lambda sd: sd.__setitem__("model.layers.0.norm.weight", torch.ones(17, dtype=torch.bfloat16)))
    err = refused(s, tmp_path, capsys)
    assert "shape mismatch" in err and "layers.0.norm_weight: converted [17]" in err and "declares [16]" in err


def test_split_that_does_not_fit_names_the_key(src, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    s = src()
    _rewrite(s, lambda sd: sd.__setitem__("model.layers.1.mlp.gate_up_proj.weight",
                                          torch.ones(47, 16, dtype=torch.bfloat16)))
    err = refused(s, tmp_path, capsys)
    assert "model.layers.1.mlp.gate_up_proj.weight [47, 16]" in err and "sum to 48" in err


def test_unknown_architecture(src, tmp_path, capsys):
    s = src()
    cfg = dict(CFG, architectures=["SomethingElseForCausalLM"], model_type="something_else")
    json.dump(cfg, open(os.path.join(s, "config.json"), "w"))
    err = refused(s, tmp_path, capsys)
    assert "config.json" in err and "SomethingElseForCausalLM" in err and S.FAMILY in err


def test_key_matched_by_two_rules(src, tmp_path, capsys):
    from convert.ops import Rule, keep
    from paddlevl.models import registry
    name = "tiny_test_overlap"
    if name not in registry.load_all():
        registry.register(registry.Family(
            name=name, architectures=("TinyTestOverlap",), parse_config=S.parse_config,
            build_model=S.build_model, rules=lambda c, k: S.rules(c, k) + [Rule(r"model\.norm\.weight", "x", keep())]))
    err = refused(src(), tmp_path, capsys, "--family", name)
    assert "more than one rule" in err and "model.norm.weight" in err


def test_dst_exists(src, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    code = convert_main([src(), str(dst), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "already exists" in err and "--overwrite" in err and str(dst) in err
    assert os.listdir(dst) == []


def test_no_config(src, tmp_path, capsys):
    s = src()
    os.remove(os.path.join(s, "config.json"))
    assert "no config.json" in refused(s, tmp_path, capsys)


# A driver that converts in a child process and stops for good once the first output shard is complete.
DRIVER = """
import os, sys, time
sys.path.insert(0, sys.argv.pop(1))
import test_convert_support as S
S.register()
from convert import writers
orig = writers.PdparamsShard.close
def close(self):
    orig(self)
    print("HALFWAY", flush=True)
    time.sleep(300)
writers.PdparamsShard.close = close
from convert.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_midway_leaves_nothing_complete_and_rerun_succeeds(pristine, tmp_path):
    src = pristine[("bin", 2)]
    dst = str(tmp_path / "out")
    args = [src, dst, "--no-progress", "--max-shard-size", "2KB"]
    p = subprocess.Popen([sys.executable, "-c", DRIVER, os.path.join(ROOT, "tests"), *args], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        line = p.stdout.readline()
        assert line.strip() == "HALFWAY", p.stderr.read()
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert not os.path.exists(dst)
    partial = [d for d in os.listdir(tmp_path) if d != "out"]
    assert partial == [f"out.partial-{p.pid}"]                      # clearly partial, and no config.json in it
    inside = os.listdir(tmp_path / partial[0])
    assert "model_state-00001-of-" in " ".join(inside) and "config.json" not in inside
    assert convert_main(args) == 0                                   # rerun: succeeds, cleans the stale folder
    assert os.listdir(tmp_path) == ["out"]
    words = S.make_words(CFG, "bfloat16")
    state = load_state(dst)
    assert all(S.same_words(state[k], v) for k, v in S.expected_paddle(CFG, words).items())


def test_sigterm_midway_cleans_up(pristine, tmp_path):
    src = pristine[("safetensors", 2)]
    dst = str(tmp_path / "out")
    p = subprocess.Popen([sys.executable, "-c", DRIVER, os.path.join(ROOT, "tests"), src, dst, "--no-progress",
                          "--max-shard-size", "2KB"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert p.stdout.readline().strip() == "HALFWAY", p.stderr.read()
        assert os.listdir(tmp_path) == [f"out.partial-{p.pid}"]
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 128 + signal.SIGTERM
    assert "terminated; nothing was written" in err
    assert os.listdir(tmp_path) == []


def test_not_enough_disk_space(src, tmp_path, capsys, monkeypatch):
    import collections
    import convert.engine as engine
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(engine.shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 1000, 1000))
    err = refused(src(), tmp_path, capsys)
    assert "not enough disk space" in err and "GB are free" in err
