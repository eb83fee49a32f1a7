"""plan -> stream -> write shards -> index -> atomic rename.

``make_plan`` reads only headers: it finds the family, applies the rule table to every source key, computes every
output's shape from the ops, builds the Paddle model under ``paddle.LazyGuard()`` (no memory) for the declared shapes,
and refuses anything that does not add up exactly. ``execute`` then streams one source tensor at a time into the
output shards inside ``DST.partial-<pid>`` and renames that folder to DST only when everything is written.
"""
from __future__ import annotations

import gc
import glob
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .ops import STORAGE, OpError
from .readers import ConvertError, Source, TensorInfo, open_source
from .writers import FORMATS, IOThread, out_dtype, pack_shards, shard_names

DTYPE_CHOICES = ("keep", "float32", "bfloat16", "float16")


@dataclass
class Output:
    name: str
    shape: tuple
    dtype: str            # dtype written
    nbytes: int


@dataclass
class Item:
    """One source tensor and what becomes of it."""
    info: TensorInfo
    rule: object = None
    outputs: list = field(default_factory=list)   # [Output]
    drop_reason: Optional[str] = None


@dataclass
class Plan:
    source: Source
    family: object
    items: list
    dtype: str
    fmt: str
    max_shard_size: int
    shards: list = field(default_factory=list)        # [(file name, [Output])]
    extra_files: list = field(default_factory=list)   # [relative path] (files or folders)
    notes: list = field(default_factory=list)

    @property
    def outputs(self):
        return [o for it in self.items for o in it.outputs]

    @property
    def total_bytes(self):
        return sum(o.nbytes for o in self.outputs)

    def weight_dtype(self):
        ds = sorted({o.dtype for o in self.outputs if o.dtype in ("bfloat16", "float16", "float32", "float64")})
        return ds[0] if len(ds) == 1 else ("mixed: " + ",".join(ds) if ds else "none")


def parse_size(text) -> int:
    """'5GB' -> 5e9, '500MB', '2GiB' -> 2*2**30, '123' bytes."""
    import re
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?)(B?)\s*", str(text), re.I)
    if not m or (m.group(3) and not m.group(2)):
        raise ValueError(f"not a size: {text!r} (examples: 5GB, 500MB, 2GiB, 123456)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


# --------------------------------------------------------------------------------------------------- model shapes
def config_for(config: dict, folder: str) -> dict:
    """The config dict handed to a family's parse_config / rules: ``_name_or_path`` = the folder it was read from
    (what transformers sets), so a family can find files next to it (e.g. IXC2.5's CLIP sub-folder config)."""
    return dict(config, _name_or_path=os.path.abspath(folder))


def declared_shapes(family, config: dict) -> dict:
    """{name: shape} of every entry of the family model's state_dict, built with no memory (paddle.LazyGuard)."""
    import paddle
    try:
        cfg = family.parse_config(config)
        with paddle.LazyGuard():
            model = family.build_model(cfg)
        return {k: tuple(int(s) for s in v.shape) for k, v in model.state_dict().items()}
    except ConvertError:
        raise
    except Exception as e:  # noqa: BLE001 - a family bug or a config it cannot handle: tell the user which
        raise ConvertError(f"family {family.name}: cannot build the Paddle model for this config.json "
                           f"({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------------------------------- planning
def make_plan(src: str, family: Optional[str] = None, dtype: str = "keep", fmt: str = "pdparams",
              max_shard_size="5GB", declared: Optional[dict] = None, allow_missing: bool = False) -> Plan:
    from paddlevl.models import registry

    if dtype not in DTYPE_CHOICES:
        raise ConvertError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    if fmt not in FORMATS:
        raise ConvertError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    try:
        max_bytes = parse_size(max_shard_size)
    except ValueError as e:
        raise ConvertError(f"--max-shard-size: {e}") from None
    if max_bytes <= 0:
        raise ConvertError("--max-shard-size must be positive")
    source = open_source(src)
    try:
        keys = source.keys()
        config = config_for(source.config, source.folder)
        try:
            fam = registry.get(family) if family else registry.detect_family(config, keys)
        except (KeyError, registry.UnknownModelError) as e:
            raise ConvertError(f"{source.folder}/config.json: {e.args[0] if e.args else e}") from None
        try:
            rules = list(fam.rules(config, keys))
        except (OpError, ValueError, KeyError, TypeError) as e:
            raise ConvertError(f"family {fam.name}: its rule table failed for this config "
                               f"({type(e).__name__}: {e})") from None
        plan = Plan(source, fam, [], dtype, fmt, max_bytes, notes=list(source.notes))
        unconsumed, multi, rule_errors, produced = [], [], [], {}
        for key, info in source.tensors.items():
            hits = [(r, m) for r in rules for m in (r.match(key),) if m]
            if not hits:
                unconsumed.append(key)
                continue
            if len(hits) > 1:
                multi.append(f"{key} (rules {', '.join(r.pattern for r, _ in hits)})")
                continue
            rule, m = hits[0]
            item = Item(info, rule)
            try:
                shapes = rule.op.shapes(info.shape)
                dtypes = rule.op.out_dtypes(info.dtype)
                names = rule.target_names(m)
            except OpError as e:
                rule_errors.append(f"{key} {list(info.shape)} (rule {rule.pattern}, {rule.op.describe()}): {e}")
                continue
            if not shapes and not rule.targets:
                item.drop_reason = getattr(rule.op, "reason", None) or rule.op.describe()
            elif len(names) != len(shapes):
                rule_errors.append(f"{key}: rule {rule.pattern} names {len(names)} target(s) but "
                                   f"{rule.op.describe()} gives {len(shapes)} output(s)")
                continue
            for name, shape, d in zip(names, shapes, dtypes):
                d = out_dtype(d, dtype)
                item.outputs.append(Output(name, tuple(shape), d, int(np.prod(shape, dtype=np.int64))
                                           * STORAGE[d].itemsize))
                produced.setdefault(name, []).append((key, tuple(shape)))
            plan.items.append(item)
        if declared is None:
            declared = declared_shapes(fam, config)
        twice = [f"{n} (from {', '.join(k for k, _ in v)})" for n, v in produced.items() if len(v) > 1]
        unexpected = [f"{n} (from {v[0][0]})" for n, v in produced.items() if n not in declared]
        missing = [n for n in declared if n not in produced]
        if missing and allow_missing:
            plan.notes.append(f"--allow-missing: {len(missing)} model parameter(s) have no source tensor "
                              f"(e.g. {missing[0]}); the output is partial and will not load")
            missing = []
        mismatch = [f"{n}: converted {list(v[0][1])} (from {v[0][0]}) but the model declares {list(declared[n])}"
                    for n, v in produced.items() if n in declared and v[0][1] != declared[n]]
        problems = [(unconsumed, "source tensor(s) that no rule consumes"),
                    (multi, "source tensor(s) matched by more than one rule"),
                    (rule_errors, "rule(s) that cannot apply"),
                    (twice, "target(s) produced more than once"),
                    (unexpected, "converted tensor(s) the Paddle model does not have"),
                    (missing, "model parameter(s) that nothing produces"),
                    (mismatch, "shape mismatch(es)")]
        lines = []
        for names, what in problems:
            if names:
                shown = names[:20]
                lines.append(f"  {len(names)} {what}:\n" + "\n".join(f"    {n}" for n in shown)
                             + (f"\n    ... and {len(names) - 20} more" if len(names) > 20 else ""))
        if lines:
            raise ConvertError(f"{source.folder} does not convert exactly as family {fam.name} "
                               f"(nothing was written):\n" + "\n".join(lines))
        outs = plan.outputs
        groups = pack_shards([o.nbytes for o in outs], max_bytes)
        plan.shards = [(fn, [outs[i] for i in g]) for fn, g in zip(shard_names(fmt, len(groups)), groups)]
        plan.extra_files = _extra_files(source, fam)
        return plan
    except BaseException:
        source.close()
        raise


def _extra_files(source: Source, fam) -> list:
    """Relative paths (files or folders) of the family's extra files present in the source folder."""
    skip = {os.path.basename(p) for p in source.files} | {"config.json"}
    if source.index_file:
        skip.add(os.path.basename(source.index_file))
    out = []
    for pat in fam.extra_files:
        for p in sorted(glob.glob(os.path.join(glob.escape(source.folder), pat))):
            rel = os.path.relpath(p, source.folder)
            if rel not in skip and rel not in out and not rel.startswith(".."):
                out.append(rel)
    return out


def format_plan(plan: Plan, dst: Optional[str] = None) -> str:
    s = plan.source
    lines = [f"source: {s.folder} ({s.format}, {len(s.files)} file(s), {len(s.tensors)} tensors)",
             f"family: {plan.family.name}",
             f"target: {dst or '(dry run)'} ({plan.fmt}, dtype {plan.dtype})", ""]
    for it in plan.items:
        i = it.info
        src = f"{i.key} {list(i.shape)} {i.dtype}"
        if it.drop_reason is not None:
            lines.append(f"{src}  DROP: {it.drop_reason}")
            continue
        op = it.rule.op.describe()
        for o in it.outputs:
            lines.append(f"{src} -> {o.name} {list(o.shape)} {o.dtype}  [{op}]")
    lines.append("")
    for fn, outs in plan.shards:
        lines.append(f"shard {fn}: {len(outs)} tensors, {sum(o.nbytes for o in outs)} bytes")
    if len(plan.shards) > 1:
        lines.append(f"index {FORMATS[plan.fmt]['index']}")
    lines.append("copy: config.json (+ paddlevl tag)" + "".join(f", {e}" for e in plan.extra_files))
    n_drop = sum(1 for it in plan.items if it.drop_reason is not None)
    lines.append(f"total: {len(plan.outputs)} tensors, {plan.total_bytes} bytes ({plan.total_bytes / 1e9:.3f} GB); "
                 f"{n_drop} source tensor(s) dropped")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- execution
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(dst: str, log=None) -> None:
    """Remove DST.partial-<pid> / DST.old-<pid> folders left by converter runs that no longer exist."""
    for p in glob.glob(glob.escape(dst) + ".partial-*") + glob.glob(glob.escape(dst) + ".old-*"):
        tail = p.rsplit("-", 1)[-1]
        if tail.isdigit() and not _pid_alive(int(tail)) and os.path.isdir(p):
            if log:
                log(f"removing {p} (left by an interrupted run)")
            shutil.rmtree(p, ignore_errors=True)


def check_dst(src: str, dst: str, overwrite: bool) -> str:
    dst = os.path.abspath(dst)
    s, d = os.path.realpath(src), os.path.realpath(dst)
    if s == d or d.startswith(s + os.sep) or s.startswith(d + os.sep):
        raise ConvertError(f"DST {dst} must be outside SRC {src} (and not contain it)")
    if os.path.lexists(dst) and not overwrite:
        raise ConvertError(f"{dst} already exists; pass --overwrite to replace it")
    if os.path.lexists(dst) and not os.path.isdir(dst):
        raise ConvertError(f"{dst} exists and is not a folder; refusing to replace it")
    return dst


def _tag(plan: Plan) -> dict:
    spec = FORMATS[plan.fmt]
    return {"family": plan.family.name, "weight_layout": plan.fmt,
            "weights": spec["index"] if len(plan.shards) > 1 else plan.shards[0][0],
            "source": {"folder": plan.source.folder, "format": plan.source.format,
                       "files": [os.path.basename(p) for p in plan.source.files]},
            "dtype": plan.weight_dtype()}


def execute(plan: Plan, dst: str, overwrite: bool = False, progress: bool = True, log=None) -> dict:
    """Write the converted folder. Returns a small summary dict."""
    log = log or (lambda m: print(m, file=sys.stderr))
    src = plan.source
    dst = check_dst(src.folder, dst, overwrite)
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    clean_stale(dst, log)
    free = shutil.disk_usage(os.path.dirname(dst) or ".").free
    need = plan.total_bytes + (64 << 20)
    if need > free:
        raise ConvertError(f"not enough disk space for {dst}: the converted weights need {need / 1e9:.2f} GB, "
                           f"{free / 1e9:.2f} GB are free")
    tmp = f"{dst}.partial-{os.getpid()}"
    if os.path.lexists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    t0 = time.time()
    bar = None
    try:
        from tqdm import tqdm
        bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="convert",
                   disable=None if progress else True, file=sys.stderr, mininterval=0.5)
        _write_weights(plan, tmp, bar)
        weight_map = {o.name: fn for fn, outs in plan.shards for o in outs}
        if len(plan.shards) > 1:
            with open(os.path.join(tmp, FORMATS[plan.fmt]["index"]), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": plan.total_bytes}, "weight_map": weight_map}, f, indent=2)
                f.write("\n")
        for rel in plan.extra_files:
            a, b = os.path.join(src.folder, rel), os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(b), exist_ok=True)
            if os.path.isdir(a):
                shutil.copytree(a, b, dirs_exist_ok=True)
            else:
                shutil.copy2(a, b)
        config = dict(src.config)
        config["paddlevl"] = _tag(plan)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:   # written last: marks complete
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")
        bar.close()
        if os.path.lexists(dst):
            if not overwrite:
                raise ConvertError(f"{dst} appeared while converting; pass --overwrite to replace it")
            old = f"{dst}.old-{os.getpid()}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        if bar is not None:
            bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        src.close()
    wall = time.time() - t0
    n = len(plan.outputs)
    peak = peak_rss()
    log(f"wrote {n} tensors, {plan.total_bytes} bytes ({plan.total_bytes / 1e9:.3f} GB) in {len(plan.shards)} "
        f"{plan.fmt} file(s) to {dst} in {wall:.1f}s" + (f"; peak memory {peak / 2**30:.2f} GiB" if peak else ""))
    return {"dst": dst, "tensors": n, "bytes": plan.total_bytes, "shards": len(plan.shards), "wall_s": wall,
            "peak_rss_bytes": peak}


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM: mapped file pages included), 0 where unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _write_weights(plan: Plan, tmp: str, bar) -> None:
    spec = FORMATS[plan.fmt]
    shard_of = {}
    for si, (fn, outs) in enumerate(plan.shards):
        for o in outs:
            shard_of[o.name] = si
    io = IOThread(progress=bar.update)
    state = {"shard": None, "index": -1}

    def shard_for(name):
        si = shard_of[name]
        if si != state["index"]:
            if state["shard"] is not None:
                state["shard"].close()
            fn, outs = plan.shards[si]
            state["index"] = si
            state["shard"] = spec["shard"](os.path.join(tmp, fn), io, [(x.name, x.shape, x.dtype) for x in outs])
        return state["shard"]

    todo = [it for it in plan.items if it.drop_reason is None]
    gc_was_on = gc.isenabled()
    gc.disable()   # the loop makes many short-lived small objects and no cycles: collections are pure overhead
    try:
        for i, item in enumerate(todo):
            if i == 0:
                _prefetch(plan, item)
            if i + 1 < len(todo):   # let the disk read the next tensor while this one is transposed and written
                _prefetch(plan, todo[i + 1])
            _convert_one(plan, item, shard_for, io)
        if state["shard"] is None:   # every tensor dropped: still write the (empty) weights file
            shard_for_empty = spec["shard"](os.path.join(tmp, plan.shards[0][0]), io, [])
            shard_for_empty.close()
        else:
            state["shard"].close()
    finally:
        io.close()
        if gc_was_on:
            gc.enable()


def _prefetch(plan: Plan, item: Item) -> None:
    """Ask the kernel to read a whole source tensor ahead (sequential readahead into the page cache; not RSS).
    Without it a tiled transpose faults the pages in a scattered order and the disk reads them 4 KB at a time."""
    reader = plan.source.reader(item.info.key)
    reader.prefetch(reader.get(item.info.key))


def _convert_one(plan: Plan, item: Item, shard_for, io: IOThread) -> None:
    info = item.info
    reader = plan.source.reader(info.key)
    arr = reader.get(info.key)
    results = item.rule.op.apply(arr, info.dtype)
    for (a, d), o in zip(results, item.outputs):
        if tuple(a.shape) != o.shape:   # the op's shape function and its data path disagree: a bug in an op
            raise ConvertError(f"internal: {info.key} -> {o.name}: op gave {list(a.shape)}, planned {list(o.shape)}")
        shard_for(o.name).add(o.name, a, d, o.dtype, o.shape, source=reader)
    io.call(lambda: reader.release(arr))   # the whole source tensor, once its last bytes are written


def convert(src: str, dst: str, *, dtype: str = "keep", format: str = "pdparams", max_shard_size="5GB",
            family: Optional[str] = None, overwrite: bool = False, progress: bool = True, log=None,
            allow_missing: bool = False) -> dict:
    """Convert the upstream checkpoint folder ``src`` into ``dst`` (what `paddlevl convert` does); returns a summary
    dict. Raises ConvertError (nothing written) when the checkpoint does not convert exactly."""
    check_dst(src, dst, overwrite)
    plan = make_plan(src, family=family, dtype=dtype, fmt=format, max_shard_size=max_shard_size,
                     allow_missing=allow_missing)
    return execute(plan, dst, overwrite=overwrite, progress=progress, log=log or (lambda m: None))
