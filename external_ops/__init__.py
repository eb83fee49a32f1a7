"""Fused inference kernels for paddlevl: rms_norm, rotary (rotate-half) and swiglu.

    from external_ops import rms_norm, apply_rotary, swiglu

Each wrapper runs the C++ op (csrc/paddlevl_ops.cc, plus csrc/paddlevl_ops.cu when Paddle has CUDA) when it is
available and the composite Paddle path otherwise. The composite path is numerically the one paddlevl/layers
uses (tests/test_external_ops.py checks both against each other and against paddlevl.layers).

PADDLEVL_FUSED selects the path, read at every call:
  "1"    fused: build the ops if needed; a failed build, or inputs the kernels do not cover, raise.
  "0"    composite always; nothing is built.
  unset  fused when the ops are built or can be built (JIT, once, on first use), else composite with one
         warning; inputs the kernels do not cover (float64, mixed dtypes, ...) and calls that need gradients
         take the composite path.

Builds go to $PADDLEVL_OPS_DIR (default ~/.cache/paddlevl/ops)/paddlevl_ops-<hash>, the hash covering the
sources, Paddle and Python versions and the CUDA switch, so a stale build is never loaded. A file lock keeps two
processes from building at once; the second one waits and loads the first one's library. The compiler output
goes to build.log in that folder. `python -m external_ops build` builds ahead of time.

Inference only: the ops have no backward and their outputs have stop_gradient=True; in auto mode a call that
needs gradients (grad enabled and an input with stop_gradient=False) takes the composite path instead.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path

import paddle
import paddle.nn.functional as F

__all__ = ["rms_norm", "apply_rotary", "swiglu", "rms_norm_composite", "apply_rotary_composite",
           "swiglu_composite", "mode", "available", "ensure_built", "build_dir", "stats"]

ENV_MODE = "PADDLEVL_FUSED"
ENV_DIR = "PADDLEVL_OPS_DIR"
LIB_NAME = "paddlevl_ops"
OPS = {"rms_norm": "paddlevl_rms_norm", "rotary": "paddlevl_rotary", "swiglu": "paddlevl_swiglu"}
CSRC = Path(__file__).resolve().parent / "csrc"
# -ffp-contract=off: no fused multiply-add, so products and sums round where the composite path rounds.
# -fno-trapping-math / -fno-math-errno: let gcc vectorise the branch-free loops; results are unchanged.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno"]
CUDA_FLAGS = ["-O3", "--fmad=false"]
FUSED_DTYPES = (paddle.float32, paddle.bfloat16, paddle.float16)

stats = collections.Counter()  # "<op>:fused" / "<op>:composite" call counts, for tests and debugging


# ---------------------------------------------------------------------------------------------- composite
def rms_norm_composite(x, weight, eps):
    """(x.float() * rsqrt(mean(x^2) + eps)).astype(x.dtype) * weight — as paddlevl.layers.norm.rms_norm."""
    h = x.astype("float32")
    h = h * paddle.rsqrt(h.pow(2).mean(axis=-1, keepdim=True) + eps)
    return h.astype(x.dtype) * weight


def _rotate_half(x):
    half = x.shape[-1] // 2
    return paddle.concat([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary_composite(x, cos, sin):
    """Rotate-half RoPE in float32, as paddlevl.layers.rotary.apply_rotary.

    x [B, L, heads, D]; cos/sin [B or 1, L, R], R <= D: the first R features rotate, the rest pass through."""
    rot = cos.shape[-1]
    xf = x.astype("float32")
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    if rot == x.shape[-1]:
        out = xf * c + _rotate_half(xf) * s
    else:
        head, tail = xf[..., :rot], xf[..., rot:]
        out = paddle.concat([head * c + _rotate_half(head) * s, tail], axis=-1)
    return out.astype(x.dtype)


def swiglu_composite(gate, up):
    """silu(gate) * up, as paddlevl.layers.mlp.swiglu. Paddle's CPU build has no bfloat16/float16 silu kernel,
    so those dtypes take silu in float32 rounded back to the dtype — what the GPU kernel computes."""
    if gate.dtype in (paddle.float32, paddle.float64):
        return F.silu(gate) * up
    return F.silu(gate.astype("float32")).astype(gate.dtype) * up


# ---------------------------------------------------------------------------------------------- mode
def mode() -> str:
    """'fused', 'composite' or 'auto' from $PADDLEVL_FUSED."""
    value = os.environ.get(ENV_MODE, "").strip()
    if value == "":
        return "auto"
    if value == "1":
        return "fused"
    if value == "0":
        return "composite"
    raise ValueError(f"{ENV_MODE}={value!r}: expected 1 (fused), 0 (composite) or unset (auto)")


# ---------------------------------------------------------------------------------------------- build / load
def _sources():
    srcs = [CSRC / "paddlevl_ops.cc"]
    if paddle.is_compiled_with_cuda():
        srcs.append(CSRC / "paddlevl_ops.cu")
    return srcs


def build_dir() -> Path:
    """The folder holding (or about to hold) the build for these sources, this Paddle and this Python."""
    root = Path(os.environ.get(ENV_DIR) or Path.home() / ".cache" / "paddlevl" / "ops").expanduser()
    h = hashlib.sha256()
    for src in _sources():
        h.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    for part in (paddle.__version__, getattr(paddle.version, "commit", ""), sys.version,
                 str(paddle.is_compiled_with_cuda()), " ".join(CXX_FLAGS), " ".join(CUDA_FLAGS)):
        h.update(str(part).encode() + b"\0")
    return root / f"{LIB_NAME}-{h.hexdigest()[:16]}"


class _State:
    lock = threading.Lock()
    loaded = False  # ops registered in this process
    error = None  # why the fused ops are unavailable (after a failed attempt)
    warned = False


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive lock between processes (fcntl where available; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # Windows: no cross-process lock, the build just may run twice
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _output_to(log_path: Path):
    """Send this process's stdout/stderr (file descriptors, so the compiler subprocess too) to log_path."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]


def _library(folder: Path) -> Path:
    return folder / LIB_NAME / f"{LIB_NAME}.so"


def _compile(folder: Path, verbose: bool = False):
    """Compile the sources into folder with paddle.utils.cpp_extension.load (which also registers the ops)."""
    from paddle.utils.cpp_extension import load

    kwargs = dict(name=LIB_NAME, sources=[str(s) for s in _sources()], extra_cxx_cflags=list(CXX_FLAGS),
                  build_directory=str(folder), verbose=verbose)
    if paddle.is_compiled_with_cuda():
        kwargs["extra_cxx_cflags"].append("-DPADDLEVL_WITH_CUDA")
        kwargs["extra_cuda_cflags"] = list(CUDA_FLAGS)
    if verbose:
        load(**kwargs)
        return
    with _output_to(folder / "build.log"):
        load(**kwargs)


def _register(lib: Path):
    from paddle.utils.cpp_extension import load_op_meta_info_and_register_op

    names = load_op_meta_info_and_register_op(str(lib))
    missing = set(OPS.values()) - set(names)
    if missing:
        raise RuntimeError(f"{lib} does not define {sorted(missing)}")


def _first_error(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    hits = [ln.strip() for ln in lines if "error" in ln.lower() and "warning" not in ln.lower()]
    return hits[0][:200] if hits else ""


def ensure_built(build: bool = True, verbose: bool = False, retry: bool = False) -> bool:
    """Make the fused ops usable in this process: load the cached build, or compile it (build=True).

    Returns True when the ops are registered, False when they are not built and build=False. Raises
    RuntimeError (reason + log path) when they cannot be; callers in auto mode turn that into a warning.
    A failed build leaves a BUILD_FAILED marker that later processes respect (no rebuild on every start)
    unless retry=True (`python -m external_ops build`, PADDLEVL_FUSED=1). The outcome is remembered for the
    process."""
    with _State.lock:
        if _State.loaded:
            return True
        if _State.error is not None and not retry:
            raise RuntimeError(_State.error)
        try:
            folder = build_dir()
            ok, failed, log = folder / "BUILD_OK", folder / "BUILD_FAILED", folder / "build.log"
            if not ok.exists():
                if not build:
                    return False
                if failed.exists() and not retry:
                    raise RuntimeError(f"an earlier build failed ({failed.read_text().strip()}); "
                                       "run `python -m external_ops build` to retry")
                folder.mkdir(parents=True, exist_ok=True)
                with _file_lock(folder / "build.lock"):
                    if not ok.exists():  # else another process built it while we waited
                        log.unlink(missing_ok=True)
                        try:
                            _compile(folder, verbose)
                            if not _library(folder).exists():
                                raise RuntimeError(f"no {_library(folder)} after the build")
                        except Exception as exc:
                            reason = _first_error(log) or _one_line(exc)
                            failed.write_text(f"{reason}; compiler output in {log}\n")
                            raise RuntimeError(f"build failed: {reason}; compiler output in {log}") from exc
                        failed.unlink(missing_ok=True)
                        ok.write_text(str(_library(folder)) + "\n")
                        _State.loaded = True  # cpp_extension.load registered the ops
                        return True
            _register(_library(folder))
        except Exception as exc:
            reason = exc if isinstance(exc, RuntimeError) else _one_line(exc)
            _State.error = f"paddlevl fused ops unavailable: {reason}"
            raise RuntimeError(_State.error) from exc
        _State.loaded = True
        _State.error = None
        return True


def available(build: bool = False) -> bool:
    """True when the fused ops are registered (or, with build=True, could be built now)."""
    try:
        return ensure_built(build=build)
    except RuntimeError:
        return False


def _reset_for_tests():
    """Forget a failed attempt (tests simulate failures); a registered library stays registered."""
    _State.error = None
    _State.warned = False


# ---------------------------------------------------------------------------------------------- dispatch
def _use_fused(op: str, why_not: str | None, tensors) -> bool:
    """Decide the path for one call. why_not: None when the kernel covers these inputs, else the reason.

    The kernels have no backward: in auto mode a call that needs gradients (grad enabled and an input with
    stop_gradient=False, e.g. a Parameter outside paddle.no_grad()) takes the composite path so autograd works;
    forced mode runs the kernel anyway and the output carries no gradient."""
    m = mode()
    if m == "composite":
        return False
    if m == "fused":
        if why_not is not None:
            raise ValueError(f"{ENV_MODE}=1 but the fused {op} does not cover these inputs: {why_not}")
        ensure_built(build=True, retry=_State.error is None)
        return True
    if why_not is not None or _needs_grad(*tensors):
        return False
    try:
        return ensure_built(build=True)
    except RuntimeError as exc:
        if not _State.warned:
            _State.warned = True
            warnings.warn(f"{exc}; using the composite Paddle path", RuntimeWarning, stacklevel=3)
        return False


def _check_tensors(*tensors) -> str | None:
    dtype = tensors[0].dtype
    if dtype not in FUSED_DTYPES:
        return f"dtype {dtype} (fused: float32, bfloat16, float16)"
    if any(t.dtype != dtype for t in tensors):
        return f"mixed dtypes {[str(t.dtype) for t in tensors]}"
    place = tensors[0].place
    if not (place.is_cpu_place() or (place.is_gpu_place() and paddle.is_compiled_with_cuda())):
        return f"place {place}"
    if not paddle.framework.in_dynamic_or_pir_mode():
        return "legacy static graph mode"
    return None


def _needs_grad(*tensors) -> bool:
    return paddle.is_grad_enabled() and any(not t.stop_gradient for t in tensors)


def _contiguous(t):
    return t if t.is_contiguous() else t.contiguous()


def _run(op: str, *args):
    stats[f"{op}:fused"] += 1
    out = paddle._C_ops._run_custom_op(OPS[op], *args)
    return out[0] if isinstance(out, (list, tuple)) else out


# ---------------------------------------------------------------------------------------------- public ops
def rms_norm(x, weight, eps: float):
    """RMSNorm over the last axis: (x.float() * rsqrt(mean(x^2) + eps)).astype(x.dtype) * weight."""
    why = _check_tensors(x, weight)
    if why is None and (x.ndim == 0 or weight.shape != [x.shape[-1]]):
        why = f"weight shape {weight.shape} for x shape {x.shape}"
    if _use_fused("rms_norm", why, (x, weight)):
        return _run("rms_norm", _contiguous(x), _contiguous(weight), float(eps))
    stats["rms_norm:composite"] += 1
    return rms_norm_composite(x, weight, eps)


def apply_rotary(x, cos, sin):
    """Rotate-half RoPE computed in float32: x [B, L, heads, D], cos/sin [B or 1, L, R] float32 with R <= D
    (the first R features rotate). Returns x's dtype."""
    why = _check_tensors(x)
    if why is None:
        if cos.dtype not in FUSED_DTYPES or sin.dtype not in FUSED_DTYPES:
            why = f"cos/sin dtype {cos.dtype}/{sin.dtype}"
        elif x.ndim != 4 or cos.ndim != 3 or cos.shape != sin.shape:
            why = f"shapes x {x.shape}, cos {cos.shape}, sin {sin.shape} (want [B, L, H, D], [B or 1, L, R])"
        elif cos.shape[0] not in (1, x.shape[0]) or cos.shape[1] != x.shape[1] or cos.shape[2] % 2 \
                or cos.shape[2] > x.shape[3]:
            why = f"cos/sin {cos.shape} do not match x {x.shape}"
    if _use_fused("rotary", why, (x, cos, sin)):
        # half-precision tables widen to float32 exactly, as the composite's type promotion does
        cos32, sin32 = (t if t.dtype == paddle.float32 else t.astype("float32") for t in (cos, sin))
        return _run("rotary", _contiguous(x), _contiguous(cos32), _contiguous(sin32))
    stats["rotary:composite"] += 1
    return apply_rotary_composite(x, cos, sin)


def swiglu(gate, up):
    """silu(gate) * up (elementwise, same shapes)."""
    why = _check_tensors(gate, up)
    if why is None and gate.shape != up.shape:
        why = f"shapes {gate.shape} and {up.shape} differ"
    if _use_fused("swiglu", why, (gate, up)):
        return _run("swiglu", _contiguous(gate), _contiguous(up))
    stats["swiglu:composite"] += 1
    return swiglu_composite(gate, up)
