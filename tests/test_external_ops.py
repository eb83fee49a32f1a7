"""external_ops: fused C++ kernels == composite Paddle path == paddlevl.layers, the PADDLEVL_FUSED switch, the
build cache and the fallback when the build is impossible.

The ops are built once per machine into the normal cache ($PADDLEVL_OPS_DIR or ~/.cache/paddlevl/ops, keyed by a
hash of the sources), so only the first run pays the compile (~15-30 s on 2 cores)."""
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import paddle
import pytest

import external_ops
from paddlevl.layers import norm as layers_norm
from paddlevl.layers import rotary as layers_rotary
from paddlevl.layers import mlp as layers_mlp

ROOT = Path(__file__).resolve().parents[1]
FP32_RTOL = 1e-6  # max|fused - composite| / max|composite|


@pytest.fixture(scope="module", autouse=True)
def built():
    """The ops must build here (CI has gcc); a failure fails the tests that need them, with the reason."""
    external_ops._reset_for_tests()
    try:
        external_ops.ensure_built(build=True, retry=True)
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv(external_ops.ENV_MODE, raising=False)
    external_ops.stats.clear()
    return monkeypatch


def rand(shape, seed, scale=1.0, dtype="float32"):
    rng = np.random.default_rng(seed)
    return paddle.to_tensor((rng.standard_normal(shape) * scale).astype(np.float32)).astype(dtype)


def f32(t):
    return t.astype("float32").numpy()


def rel_err(a, b):
    a, b = f32(a), f32(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def within_one_ulp(a, b, mantissa_bits):
    """Elementwise |a - b| <= one unit in the last place of b (bfloat16: 7 bits, float16: 10 bits)."""
    a, b = f32(a), f32(b)
    tiny = 2.0 ** -(14 if mantissa_bits == 10 else 126)
    return bool(np.all(np.abs(a - b) <= np.maximum(np.abs(b), tiny) * 2.0 ** -mantissa_bits))


def run_fused(fn, *args):
    os.environ[external_ops.ENV_MODE] = "1"
    try:
        return fn(*args)
    finally:
        del os.environ[external_ops.ENV_MODE]


def rope_tables(batch, length, rot, seed, base=10000.0):
    rng = np.random.default_rng(seed)
    pos = paddle.to_tensor(rng.integers(0, 4096, size=(batch, length)).astype(np.int64))
    return layers_rotary.rope_cos_sin(pos, layers_rotary.rope_inv_freq(rot, base))


# ---------------------------------------------------------------------------------------- composite == layers
def test_layers_dispatch_through_external_ops(env):
    """paddlevl.layers runs these three ops through external_ops: composite when forced off (bit-identical to the
    composite functions), the fused kernel when forced on."""
    x, w = rand([3, 5, 37], 0), rand([37], 1)
    q = rand([2, 6, 3, 40], 2)
    a, b = rand([2, 3, 53], 4, 4.0), rand([2, 3, 53], 5)
    env.setenv(external_ops.ENV_MODE, "0")
    for dtype in ("float32", "bfloat16"):
        xd, wd = x.astype(dtype), w.astype(dtype)
        np.testing.assert_array_equal(f32(external_ops.rms_norm_composite(xd, wd, 1e-6)),
                                      f32(layers_norm.rms_norm(xd, wd, 1e-6)))
    for rot in (40, 20):
        cos, sin = rope_tables(2, 6, rot, 3)
        for dtype in ("float32", "bfloat16"):
            np.testing.assert_array_equal(f32(external_ops.apply_rotary_composite(q.astype(dtype), cos, sin)),
                                          f32(layers_rotary.apply_rotary(q.astype(dtype), cos, sin)))
    np.testing.assert_array_equal(external_ops.swiglu_composite(a, b).numpy(), layers_mlp.swiglu(a, b).numpy())
    assert external_ops.stats["rms_norm:composite"] == 2 and external_ops.stats["swiglu:composite"] == 1
    env.setenv(external_ops.ENV_MODE, "1")
    external_ops.stats.clear()
    cos, sin = rope_tables(2, 6, 40, 3)
    layers_norm.rms_norm(x, w, 1e-6), layers_rotary.apply_rotary(q, cos, sin), layers_mlp.swiglu(a, b)
    assert {k: v for k, v in external_ops.stats.items() if v} == {"rms_norm:fused": 1, "rotary:fused": 1,
                                                                  "swiglu:fused": 1}


# ---------------------------------------------------------------------------------------- fused == composite
@pytest.mark.parametrize("shape", [[2, 5, 37], [1, 1, 4096], [7, 1], [3, 2, 4, 129]])
@pytest.mark.parametrize("scale", [3.0, 1e-3])  # 1e-3: mean(x^2) ~ eps, so a wrong eps shows
def test_rms_norm_fp32(env, shape, scale):
    x, w = rand(shape, 10, scale), rand(shape[-1:], 11)
    for eps in (1e-6, 1e-5):
        ref = external_ops.rms_norm_composite(x, w, eps)
        out = run_fused(external_ops.rms_norm, x, w, eps)
        assert out.dtype == paddle.float32 and out.shape == x.shape
        assert rel_err(out, ref) <= FP32_RTOL
    assert external_ops.stats["rms_norm:fused"] == 2


def test_gradients_take_the_composite_path_in_auto_mode(env):
    x = rand([2, 3, 16], 16)
    w = paddle.create_parameter([16], "float32", default_initializer=paddle.nn.initializer.Assign(f32(rand([16], 17))))
    out = external_ops.rms_norm(x, w, 1e-6)  # grad enabled + a trainable weight: composite, backward works
    out.sum().backward()
    assert w.grad is not None and external_ops.stats == {"rms_norm:composite": 1}
    with paddle.no_grad():
        external_ops.rms_norm(x, w, 1e-6)
    assert external_ops.stats["rms_norm:fused"] == 1


def test_rms_norm_non_contiguous_and_parameter_weight(env):
    x = rand([5, 2, 37], 12).transpose([1, 0, 2])  # a strided view
    x.stop_gradient = False
    w = paddle.create_parameter([37], "float32", default_initializer=paddle.nn.initializer.Assign(f32(rand([37], 13))))
    assert not w.stop_gradient
    out = run_fused(external_ops.rms_norm, x, w, 1e-6)
    assert out.stop_gradient  # inference op: no graph, and no crash
    assert rel_err(out, external_ops.rms_norm_composite(x.detach(), w.detach(), 1e-6)) <= FP32_RTOL


@pytest.mark.parametrize("dtype,bits", [("bfloat16", 7)])  # CPU Paddle has no float16 multiply
def test_rms_norm_half(env, dtype, bits):
    x, w = rand([4, 3, 37], 14, 2.0, dtype), rand([37], 15, 1.0, dtype)
    out = run_fused(external_ops.rms_norm, x, w, 1e-6)
    ref = external_ops.rms_norm_composite(x, w, 1e-6)
    assert out.dtype == x.dtype
    assert within_one_ulp(out, ref, bits)
    assert np.mean(f32(out) == f32(ref)) >= 0.98


@pytest.mark.parametrize("b,l,h,d,rot,cos_batch", [
    (2, 5, 3, 64, 64, "B"),   # full rotation, per-sequence tables
    (1, 1, 4, 8, 8, "1"),     # one decode step
    (3, 7, 2, 37, 36, "1"),   # odd head dim, partial rotation (last feature passes through)
    (2, 4, 5, 40, 20, "B"),   # half rotated
])
def test_rotary_fp32(env, b, l, h, d, rot, cos_batch):
    x = rand([b, l, h, d], 20 + d, 2.0)
    cos, sin = rope_tables(b if cos_batch == "B" else 1, l, rot, 21)
    ref = external_ops.apply_rotary_composite(x, cos, sin)
    out = run_fused(external_ops.apply_rotary, x, cos, sin)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, ref) <= FP32_RTOL
    np.testing.assert_array_equal(out.numpy()[..., rot:], x.numpy()[..., rot:])


def test_rotary_non_contiguous_query(env):
    q = rand([2, 3, 6, 32], 22).transpose([0, 2, 1, 3])  # [B, H, L, D] -> [B, L, H, D] view
    cos, sin = rope_tables(2, 6, 32, 23)
    out = run_fused(external_ops.apply_rotary, q, cos, sin)
    assert rel_err(out, external_ops.apply_rotary_composite(q, cos, sin)) <= FP32_RTOL


@pytest.mark.parametrize("dtype,bits", [("bfloat16", 7)])  # CPU Paddle has no float16 multiply
def test_rotary_half(env, dtype, bits):
    x = rand([2, 5, 3, 38], 24, 2.0, dtype)
    cos, sin = rope_tables(2, 5, 38, 25)
    out = run_fused(external_ops.apply_rotary, x, cos, sin)
    ref = external_ops.apply_rotary_composite(x, cos, sin)
    assert out.dtype == x.dtype
    assert within_one_ulp(out, ref, bits)
    assert np.mean(f32(out) == f32(ref)) >= 0.98


@pytest.mark.parametrize("shape", [[1, 1, 37], [2, 3, 1000], [4, 11]])
def test_swiglu_fp32(env, shape):
    a, b = rand(shape, 30, 4.0), rand(shape, 31)
    out = run_fused(external_ops.swiglu, a, b)
    assert out.shape == a.shape and out.dtype == a.dtype
    assert rel_err(out, external_ops.swiglu_composite(a, b)) <= FP32_RTOL


def test_swiglu_extreme_gates(env):
    a = paddle.to_tensor(np.concatenate([np.linspace(-120, 120, 4801), [-1e4, 1e4, 0.0, -0.0]]).astype(np.float32))
    b = paddle.ones_like(a)
    out, ref = f32(run_fused(external_ops.swiglu, a, b)), f32(external_ops.swiglu_composite(a, b))
    assert np.all(np.isfinite(out))
    # elementwise relative error where the result is a normal float, absolute elsewhere
    normal = np.abs(ref) > 1e-30
    assert np.max(np.abs(out - ref)[normal] / np.abs(ref)[normal]) <= FP32_RTOL
    assert np.max(np.abs(out - ref)[~normal]) <= 1e-30


@pytest.mark.parametrize("dtype,bits", [("bfloat16", 7)])  # CPU Paddle has no float16 multiply
def test_swiglu_half(env, dtype, bits):
    a, b = rand([3, 5, 77], 32, 3.0, dtype), rand([3, 5, 77], 33, 1.0, dtype)
    out = run_fused(external_ops.swiglu, a, b)
    ref = external_ops.swiglu_composite(a, b)
    assert out.dtype == a.dtype
    assert within_one_ulp(out, ref, bits)
    assert np.mean(f32(out) == f32(ref)) >= 0.98


def test_bfloat16_rounding_and_special_values(env):
    """The kernels' own float -> bfloat16 rounding is Paddle's: ties to even, NaN, inf, zeros, subnormals."""
    specials = [np.nan, np.inf, 0.0, -0.0, 1e-40, -3e-39, 3.0e38, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, -2.5]
    rng = np.random.default_rng(34)
    vals = np.concatenate([specials, rng.standard_normal(2000) * 10.0 ** rng.integers(-3, 4, 2000)])
    a = paddle.to_tensor(vals.astype(np.float32)).astype("bfloat16")
    one = paddle.ones_like(a)
    out = run_fused(external_ops.swiglu, a, one)
    np.testing.assert_array_equal(f32(out), f32(external_ops.swiglu_composite(a, one)))
    # rotary with cos = 1, sin = 0 is the float32 round trip, whose rounding is exercised by x * 3
    x = paddle.to_tensor(vals[:2000].reshape(1, 50, 4, 10).astype(np.float32)).astype("bfloat16") * 3
    cos, sin = paddle.ones([1, 50, 10]) * 1.5, paddle.zeros([1, 50, 10])
    np.testing.assert_array_equal(f32(run_fused(external_ops.apply_rotary, x, cos, sin)),
                                  f32(external_ops.apply_rotary_composite(x, cos, sin)))


# ---------------------------------------------------------------------------------------- the switch
def test_env_switch(env):
    x, w = rand([2, 9], 40), rand([9], 41)
    env.setenv(external_ops.ENV_MODE, "0")

    def boom(*_):
        raise AssertionError("fused op called with PADDLEVL_FUSED=0")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(external_ops, "_run", boom)
        external_ops.rms_norm(x, w, 1e-6)
        external_ops.swiglu(x, x)
        external_ops.apply_rotary(rand([1, 2, 1, 4], 42), *rope_tables(1, 2, 4, 43))
    assert external_ops.stats == {"rms_norm:composite": 1, "swiglu:composite": 1, "rotary:composite": 1}

    external_ops.stats.clear()
    env.setenv(external_ops.ENV_MODE, "1")
    external_ops.rms_norm(x, w, 1e-6)
    env.delenv(external_ops.ENV_MODE)  # auto: the ops are built, so fused
    external_ops.rms_norm(x, w, 1e-6)
    assert external_ops.stats == {"rms_norm:fused": 2}

    env.setenv(external_ops.ENV_MODE, "yes")
    with pytest.raises(ValueError, match="PADDLEVL_FUSED"):
        external_ops.rms_norm(x, w, 1e-6)


def test_inputs_the_kernels_do_not_cover(env):
    x, w = rand([2, 9], 44, dtype="float64"), rand([9], 45, dtype="float64")
    out = external_ops.rms_norm(x, w, 1e-6)  # auto: composite, no error
    assert out.dtype == paddle.float64 and external_ops.stats == {"rms_norm:composite": 1}
    env.setenv(external_ops.ENV_MODE, "1")
    with pytest.raises(ValueError, match="float64"):
        external_ops.rms_norm(x, w, 1e-6)
    with pytest.raises(ValueError, match="differ"):
        external_ops.swiglu(rand([2, 3], 46), rand([3, 2], 47))


# ---------------------------------------------------------------------------------------- build cache and fallback
def test_fallback_when_the_build_fails(env, tmp_path):
    """A compiler error (simulated with a broken source): auto mode warns once and runs the composite path;
    later processes see BUILD_FAILED and do not rebuild; forced mode raises."""
    broken = tmp_path / "csrc"
    broken.mkdir()
    (broken / "paddlevl_ops.cc").write_text('#error "simulated compiler failure"\n')
    env.setattr(external_ops, "CSRC", broken)
    env.setenv(external_ops.ENV_DIR, str(tmp_path / "cache"))
    env.setattr(external_ops._State, "loaded", False)
    env.setattr(external_ops._State, "error", None)
    env.setattr(external_ops._State, "warned", False)
    x, w = rand([2, 9], 48), rand([9], 49)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = external_ops.rms_norm(x, w, 1e-6)
        external_ops.rms_norm(x, w, 1e-6)
    messages = [str(c.message) for c in caught if "paddlevl fused ops" in str(c.message)]
    assert len(messages) == 1 and "simulated compiler failure" in messages[0]
    assert "\n" not in messages[0]
    np.testing.assert_array_equal(out.numpy(), external_ops.rms_norm_composite(x, w, 1e-6).numpy())
    assert external_ops.stats == {"rms_norm:composite": 2}
    folder = external_ops.build_dir()
    assert (folder / "BUILD_FAILED").exists() and not (folder / "BUILD_OK").exists()

    env.setattr(external_ops._State, "error", None)  # a new process: remembers the failure on disk, no rebuild
    env.setattr(external_ops._State, "warned", False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(external_ops, "_compile", lambda *a, **k: pytest.fail("rebuilt despite BUILD_FAILED"))
        with pytest.warns(RuntimeWarning, match="earlier build failed"):
            external_ops.swiglu(x, x)

    env.setattr(external_ops._State, "error", None)
    env.setenv(external_ops.ENV_MODE, "1")  # forced: retries once, then raises
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(external_ops, "_compile", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("g++")))
        with pytest.raises(RuntimeError, match="g\\+\\+"):
            external_ops.rms_norm(x, w, 1e-6)


def test_unwritable_cache_falls_back(env, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    env.setenv(external_ops.ENV_DIR, str(blocker))
    env.setattr(external_ops._State, "loaded", False)
    env.setattr(external_ops._State, "error", None)
    env.setattr(external_ops._State, "warned", False)
    x = rand([3, 4], 50)
    with pytest.warns(RuntimeWarning, match="paddlevl fused ops unavailable"):
        out = external_ops.swiglu(x, x)
    np.testing.assert_array_equal(out.numpy(), external_ops.swiglu_composite(x, x).numpy())


def test_cached_build_is_reused_by_a_new_process():
    """`python -m external_ops build` in a fresh process loads the cached library without compiling."""
    folder = external_ops.build_dir()
    log = folder / "build.log"
    before = log.stat().st_mtime_ns if log.exists() else None
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "external_ops", "build"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert str(folder) in proc.stdout
    assert (log.stat().st_mtime_ns if log.exists() else None) == before


def test_build_lock_serialises(tmp_path):
    order = []

    def hold(name, delay):
        time.sleep(delay)
        with external_ops._file_lock(tmp_path / "build.lock"):
            order.append(f"{name}+")
            time.sleep(0.3)
            order.append(f"{name}-")

    threads = [threading.Thread(target=hold, args=("a", 0.0)), threading.Thread(target=hold, args=("b", 0.1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order == ["a+", "a-", "b+", "b-"]


def test_cuda_source_is_added_only_with_cuda(monkeypatch):
    assert [s.name for s in external_ops._sources()] == (
        ["paddlevl_ops.cc", "paddlevl_ops.cu"] if paddle.is_compiled_with_cuda() else ["paddlevl_ops.cc"])
    cpu_dir = external_ops.build_dir()
    monkeypatch.setattr(paddle, "is_compiled_with_cuda", lambda: True)
    assert [s.name for s in external_ops._sources()] == ["paddlevl_ops.cc", "paddlevl_ops.cu"]
    assert external_ops.build_dir() != cpu_dir or paddle.is_compiled_with_cuda()
