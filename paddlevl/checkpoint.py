"""Load a folder written by ``paddlevl convert``.

    model = load_model("qwen_vl_paddle")                 # float32 on CPU: the parity mode
    model = load_model("qwen_vl_paddle", dtype="bfloat16")

The folder's config.json carries ``"paddlevl": {"family", "weight_layout", ...}``; the family record (registry) parses
the config and builds the model; the weights come from ``model_state.pdparams`` / ``model_state-0000k-of-0000n.pdparams``
+ ``model_state.pdparams.index.json`` (PaddleNLP layout) or the safetensors equivalents. The check is strict: a
parameter with no weight, a weight with no parameter, or a shape that differs is an error naming them.
"""
from __future__ import annotations

import json
import os
from typing import Iterator, Optional

import numpy as np

__all__ = ["load_model", "load_state", "read_config", "iter_weights", "CheckpointError"]

PDPARAMS_INDEX = "model_state.pdparams.index.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
FLOATS = ("bfloat16", "float16", "float32", "float64")


class CheckpointError(ValueError):
    """A converted folder that cannot be loaded (the message names the file / parameter)."""


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no config.json - not a converted folder")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if not isinstance(config.get("paddlevl"), dict) or "family" not in config["paddlevl"]:
        raise CheckpointError(f"{path} has no \"paddlevl\" tag: this is not a folder written by `paddlevl convert` "
                              f"(convert the upstream checkpoint first: paddlevl convert SRC DST)")
    return config


# --------------------------------------------------------------------------------------------------- weight files
def _weight_files(folder: str):
    """-> (format, [file names]) of the weights in a converted folder."""
    for fmt, index, single in (("pdparams", PDPARAMS_INDEX, "model_state.pdparams"),
                               ("safetensors", SAFETENSORS_INDEX, "model.safetensors")):
        ip = os.path.join(folder, index)
        if os.path.isfile(ip):
            with open(ip, encoding="utf-8") as f:
                wm = json.load(f)["weight_map"]
            files = sorted(set(wm.values()))
            missing = [n for n in files if not os.path.isfile(os.path.join(folder, n))]
            if missing:
                raise CheckpointError(f"{ip} names missing file(s): {', '.join(missing)}")
            return fmt, files
        if os.path.isfile(os.path.join(folder, single)):
            return fmt, [single]
    raise CheckpointError(f"{folder}: no weights ({PDPARAMS_INDEX}, model_state.pdparams, {SAFETENSORS_INDEX} or "
                          f"model.safetensors)")


def iter_weights(folder: str) -> Iterator:
    """Yield ``(name, words, dtype)`` for every stored tensor: ``words`` is a numpy array of raw storage words
    (bfloat16 as uint16, the Paddle convention), ``dtype`` the logical dtype name."""
    from convert.readers import ConvertError, PdparamsFile, SafetensorsFile

    fmt, files = _weight_files(folder)
    for fn in files:
        path = os.path.join(folder, fn)
        try:
            r = PdparamsFile(path) if fmt == "pdparams" else SafetensorsFile(path)   # memory-mapped, nothing read
        except ConvertError as e:
            raise CheckpointError(str(e)) from None
        try:
            for name, info in sorted(r.infos.items(), key=lambda kv: kv[1].offset):
                arr = r.get(name)
                yield name, arr, info.dtype
                r.release(arr)
        finally:
            r.close()


def _words_to(arr: np.ndarray, dtype: str, want: str) -> np.ndarray:
    """Raw words of ``dtype`` -> numpy array paddle.to_tensor turns into ``want`` (bfloat16 via uint16 words)."""
    if dtype not in FLOATS or want not in FLOATS or dtype == want:
        return arr
    from convert.writers import cast_words
    return cast_words(arr, dtype, want)


def load_state(folder: str) -> dict:
    """{name: numpy array} of a converted folder, bfloat16 as uint16 words (what ``paddle.load(return_numpy=True)``
    gives for a .pdparams). Copies the data out of any file mapping."""
    return {name: np.array(arr, copy=True) for name, arr, _ in iter_weights(folder)}


# --------------------------------------------------------------------------------------------------- the model
def _paddle_dtype_name(p) -> str:
    return str(p.dtype).replace("paddle.", "")


def load_model(folder: str, dtype: str = "float32", family: Optional[str] = None):
    """Build the family's Paddle model for ``folder``/config.json and load its weights strictly; floating parameters
    are stored as ``dtype`` (the compute dtype) unless the family declared a parameter with a fixed dtype.
    Returns the model in eval mode."""
    import paddle

    from paddlevl.models import registry

    if dtype not in ("float32", "bfloat16", "float16", "float64"):
        raise CheckpointError(f"dtype must be float32, bfloat16, float16 or float64, got {dtype!r}")
    config = read_config(folder)
    fam = registry.get(family or config["paddlevl"]["family"])
    # `_name_or_path` = the folder (as transformers sets it): a family may read files next to config.json
    cfg = fam.parse_config(dict(config, _name_or_path=os.path.abspath(folder)))
    prev = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        with paddle.LazyGuard():   # parameters get memory only when their weights arrive
            model = fam.build_model(cfg)
    finally:
        paddle.set_default_dtype(prev)
    params = model.state_dict()
    seen, unexpected, mismatch = set(), [], []
    for name, words, wdtype in iter_weights(folder):
        p = params.get(name)
        if p is None:
            unexpected.append(name)
            continue
        if tuple(words.shape) != tuple(p.shape):
            mismatch.append(f"{name}: file {list(words.shape)}, model {list(p.shape)}")
            continue
        want = _paddle_dtype_name(p)
        t = paddle.to_tensor(np.ascontiguousarray(_words_to(words, wdtype, want)))
        if t.dtype != p.dtype:   # integer buffers and the like
            t = t.astype(p.dtype)
        p.set_value(t)
        seen.add(name)
        del words, t
    missing = [n for n in params if n not in seen]
    problems = [(missing, "model parameter(s) with no weight in the folder"),
                (unexpected, "weight(s) the model does not have"), (mismatch, "shape mismatch(es)")]
    lines = [f"  {len(v)} {what}: " + ", ".join(v[:12]) + (f" ... and {len(v) - 12} more" if len(v) > 12 else "")
             for v, what in problems if v]
    if lines:
        raise CheckpointError(f"{folder} does not match family {fam.name}'s model for its config.json:\n"
                              + "\n".join(lines))
    model.eval()
    return model
