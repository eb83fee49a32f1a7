"""Streaming torch -> Paddle checkpoint converter.

    from convert import convert
    convert("Qwen-VL-Chat", "qwen_vl_paddle")            # same as `paddlevl convert Qwen-VL-Chat qwen_vl_paddle`

Pieces: readers.py (lazy per-tensor reading), ops.py (the ops a rule names), rules/<family>.py (the tables),
engine.py (plan, strict accounting, streaming, atomic rename), writers.py (pdparams / safetensors shards), cli.py.
"""
from .readers import ConvertError  # noqa: F401


def convert(src, dst, *, dtype="keep", format="pdparams", max_shard_size="5GB", family=None, overwrite=False,
            progress=False, log=None):
    """Convert the upstream checkpoint folder ``src`` into ``dst``; returns a summary dict. Raises ConvertError."""
    from .engine import check_dst, execute, make_plan
    check_dst(src, dst, overwrite)
    plan = make_plan(src, family=family, dtype=dtype, fmt=format, max_shard_size=max_shard_size)
    return execute(plan, dst, overwrite=overwrite, progress=progress, log=log or (lambda m: None))
