"""Streaming torch -> Paddle checkpoint converter.

    from convert import convert
    convert("Qwen-VL-Chat", "qwen_vl_paddle")            # same as `paddlevl convert Qwen-VL-Chat qwen_vl_paddle`

Pieces: readers.py (lazy per-tensor reading), ops.py (the ops a rule names), rules/<family>.py (the tables),
engine.py (plan, strict accounting, streaming, atomic rename), writers.py (pdparams / safetensors shards), cli.py.
"""
from .readers import ConvertError  # noqa: F401


def convert(src, dst, **kw):
    """See convert.engine.convert."""
    from .engine import convert as _convert
    return _convert(src, dst, **kw)
