#!/usr/bin/env python
"""Converter at real scale: synthetic full-size checkpoints (real key names, shapes, dtypes and shard layout of the
released 7B models, random data) converted by `python -m convert` in a separate process.

    python bench/convert_fullsize.py points_v15                  # one family, full size (16.7 GB)
    python bench/convert_fullsize.py --all --workdir /big/disk    # the four releases, one after the other
    python bench/convert_fullsize.py qwen_vl --limit-bytes 3GB    # a slice with real shapes (partial: --allow-missing)

For each family it prints: bytes, wall time of the converter process (+ the `sync` that puts its output on disk),
peak RSS of the converter process (ru_maxrss from wait4: anonymous memory AND mapped file pages), the time of a plain
`cp -r` of the same folder on the same disk (+ its `sync`) measured in the same run — the floor — and the ratio.
Both runs start with the source evicted from the page cache (posix_fadvise DONTNEED after sync), so they read the
same disk. Then a few converted tensors are read back and compared bit for bit with the source tensors transformed by
torch (an implementation of the ops independent of convert/ops.py); bf16 stays bf16 (--dtype keep).

Needs: torch, safetensors, the family rule tables, ../shared/tools/make_fullsize_checkpoint.py and
../shared/fullsize/<family>.json (see --shared). Disk: about 2.1 x the checkpoint per family (source + output; the
copy is deleted before converting). Results also go to WORKDIR/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # this checkout's convert/ and paddlevl/, whatever else is installed
FAMILIES = ("qwen_vl", "points_v15", "ixc2d5", "points_qwen2_5")


def log(msg):
    print(msg, flush=True)


def run(cmd, **kw):
    t = time.time()
    subprocess.run(cmd, check=True, **kw)
    return time.time() - t


def sync_time():
    t = time.time()
    os.sync()
    return time.time() - t


def evict(folder):
    """Drop a folder's pages from the page cache (no root needed), so a run reads from the disk."""
    os.sync()
    for r, _, fs in os.walk(folder):
        for f in fs:
            fd = os.open(os.path.join(r, f), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)


def weight_bytes(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f.endswith((".bin", ".safetensors")))


# --------------------------------------------------------------------------------------------------- steps
def make_source(a, family, src):
    manifest = os.path.join(a.shared, "fullsize", f"{family}.json")
    tool = os.path.join(a.shared, "tools", "make_fullsize_checkpoint.py")
    marker = os.path.join(src, "SYNTHETIC_CHECKPOINT.json")
    from convert.engine import parse_size
    want = {"limit_bytes": parse_size(a.limit_bytes) if a.limit_bytes else None, "max_dim": None,
            "reshard_order": "name" if a.release_index else None}
    if a.reuse and os.path.exists(marker):
        info = json.load(open(marker))
        if all(info.get(k) == v for k, v in want.items()):
            log(f"[{family}] reusing {src}")
            return info
    cmd = [sys.executable, tool, manifest, src, "--fill", "tile", "--force", "--progress-every", "30"]
    if a.limit_bytes:
        cmd += ["--limit-bytes", str(a.limit_bytes)]
    if a.release_index:   # files = a 5 GB split over the sorted names, index = the published one (POINTS-1.5)
        cmd += ["--reshard-bytes", "5GB", "--reshard-order", "name"]
    log(f"[{family}] writing the synthetic checkpoint: {' '.join(cmd[1:])}")
    run(cmd)
    if a.release_index:
        man = json.load(open(manifest))
        index_path = os.path.join(src, man["index_file"])
        index = json.load(open(index_path))
        wm = {t["name"]: t["file"] for t in man["tensors"] if t["name"] in index["weight_map"]}
        if set(wm.values()) <= set(index["weight_map"].values()):
            moved = sum(1 for k, v in wm.items() if index["weight_map"][k] != v)
            index["weight_map"] = wm
            json.dump(index, open(index_path, "w"), indent=2, sort_keys=True)
            log(f"[{family}] index replaced by the release's own weight_map: it is wrong about {moved} tensors' files")
        else:
            log(f"[{family}] --release-index: file names differ, index left as written")
    return json.load(open(marker))


def copy_floor(src, tmp):
    """`cp -r` of the source folder (+ sync): wall seconds, sync seconds, CPU seconds of cp."""
    evict(src)
    t = time.time()
    p = subprocess.Popen(["cp", "-r", src, tmp])
    _, status, ru = os.wait4(p.pid, 0)
    t = time.time() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"cp -r {src} {tmp} failed")
    s = sync_time()
    shutil.rmtree(tmp)
    os.sync()
    return t, s, ru.ru_utime + ru.ru_stime


def convert(a, src, dst, partial):
    """Run the converter as its own process; -> (wall, sync, peak RSS bytes, stderr tail)."""
    evict(src)
    cmd = [sys.executable, "-m", "convert", src, dst, "--no-progress", "--format", a.format, "--dtype", a.dtype,
           "--max-shard-size", a.max_shard_size]
    if partial:
        cmd.append("--allow-missing")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    errf = open(dst + ".stderr.txt", "w+")
    t = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=errf)
    # Peak RSS = the child's VmHWM (high-water mark of its own address space since exec), polled until it exits.
    # Not ru_maxrss: Linux folds the pre-exec (forked) copy of THIS process's memory into the child's ru_maxrss.
    hwm = 0
    while True:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        hwm = max(hwm, int(line.split()[1]) * 1024)
        except (OSError, ValueError):
            pass
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.05)
    wall = time.time() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    errf.seek(0)
    err = errf.read()
    errf.close()
    os.remove(dst + ".stderr.txt")
    if p.returncode != 0:
        raise SystemExit(f"converter failed (exit {p.returncode}):\n{err[-3000:]}")
    return wall, sync_time(), hwm, err, ru.ru_utime + ru.ru_stime


def kill_halfway(a, src, dst, partial, total):
    """SIGKILL the converter when about half the bytes are written; check nothing looks complete; rerun."""
    evict(src)
    cmd = [sys.executable, "-m", "convert", src, dst, "--no-progress", "--max-shard-size", a.max_shard_size]
    if partial:
        cmd.append("--allow-missing")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = f"{dst}.partial-{p.pid}"
    while p.poll() is None:
        if os.path.isdir(tmp) and folder_bytes(tmp) >= total // 2:
            break
        time.sleep(0.2)
    if p.poll() is not None:
        raise SystemExit("the converter finished before it could be killed")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    written = folder_bytes(tmp)
    ok = not os.path.exists(dst) and not os.path.exists(os.path.join(tmp, "config.json"))
    log(f"  killed at {written / 1e9:.2f} GB: DST absent={not os.path.exists(dst)}, partial folder {tmp} "
        f"has no config.json={not os.path.exists(os.path.join(tmp, 'config.json'))}")
    return ok


# --------------------------------------------------------------------------------------------------- spot checks
def _torch_source(src_folder, key, files):
    import torch
    for path in files:
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(path, framework="pt") as f:
                if key in f.keys():
                    return f.get_tensor(key)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if key in sd:
                return sd[key].clone()
    raise KeyError(key)


def _torch_apply(op, t):
    """The ops' meaning, written again with torch (independent of convert/ops.py)."""
    import torch
    from convert import ops as O
    if isinstance(op, O._Chain):
        outs = [t]
        for o in op.ops:
            outs = [r for x in outs for r in _torch_apply(o, x)]
        return outs
    if isinstance(op, O._Keep):
        return [t]
    if isinstance(op, O._Transpose):
        return [t.t().contiguous()]
    if isinstance(op, O._Reshape):
        return [t.reshape(op.shape)]
    if isinstance(op, O._Split):
        sizes = list(op.sizes)
        if -1 in sizes:
            sizes[sizes.index(-1)] = t.shape[op.axis] - sum(s for s in sizes if s != -1)
        return [x.contiguous() for x in torch.split(t, sizes, dim=op.axis)]
    if isinstance(op, O._Regroup):
        ax = op.axis % t.dim()
        g = t.reshape(*t.shape[:ax], op.groups, sum(op.sizes), *t.shape[ax + 1:])
        pieces = torch.split(g, op.sizes, dim=ax + 1)
        return [p.reshape(*t.shape[:ax], -1, *t.shape[ax + 1:]).contiguous() for p in pieces]
    if isinstance(op, O._Cast):
        return [t.to(getattr(torch, op.dtype))]
    raise NotImplementedError(op.describe())


def spot_check(src, dst, n, seed=0):
    """Compare n converted tensors (the largest ones, one per op kind, and random ones) with torch's version."""
    import numpy as np
    import torch
    from convert.engine import make_plan
    from convert.readers import PdparamsFile, SafetensorsFile

    plan = make_plan(src, allow_missing=True)
    plan.source.close()
    items = [it for it in plan.items if it.drop_reason is None]
    chosen = sorted(items, key=lambda it: -it.info.nbytes)[:2]
    by_op = {}
    for it in items:
        by_op.setdefault(it.rule.op.describe().split("(")[0], it)
    chosen += list(by_op.values())
    rng = random.Random(seed)
    chosen += rng.sample(items, min(len(items), max(0, n - len(chosen))))
    seen, rows = set(), []
    cfg = json.load(open(os.path.join(dst, "config.json")))["paddlevl"]
    index = os.path.join(dst, "model_state.pdparams.index.json" if cfg["weight_layout"] == "pdparams"
                         else "model.safetensors.index.json")
    wmap = json.load(open(index))["weight_map"] if os.path.exists(index) else None
    for it in chosen:
        if it.info.key in seen:
            continue
        seen.add(it.info.key)
        ref = _torch_apply(it.rule.op, _torch_source(src, it.info.key, plan.source.files))
        for o, r in zip(it.outputs, ref):
            fn = wmap[o.name] if wmap else cfg["weights"]
            path = os.path.join(dst, fn)
            reader = PdparamsFile(path) if path.endswith(".pdparams") else SafetensorsFile(path)
            got = np.array(reader.get(o.name), copy=True)
            reader.close()
            want = (r.view(torch.int16).numpy().view(np.uint16) if r.dtype == torch.bfloat16 else r.numpy())
            same = got.shape == want.shape and got.dtype.itemsize == want.dtype.itemsize and \
                np.array_equal(got.view(f"u{got.dtype.itemsize}"), want.view(f"u{want.dtype.itemsize}"))
            rows.append((it.info.key, o.name, list(o.shape), o.dtype, it.rule.op.describe(), same))
    return rows


# --------------------------------------------------------------------------------------------------- main
def bench_family(a, family):
    src = os.path.join(a.workdir, f"{family}_src")
    dst = os.path.join(a.workdir, f"{family}_paddle")
    info = make_source(a, family, src)
    partial = not info.get("complete", False)
    total = weight_bytes(src)
    os.sync()
    if os.path.exists(dst):
        shutil.rmtree(dst)
    log(f"[{family}] {total / 1e9:.2f} GB in {len(info['files'])} file(s)"
        + (" [PARTIAL: --allow-missing]" if partial else ""))
    cp_wall, cp_sync, cp_cpu = copy_floor(src, os.path.join(a.workdir, f"{family}_copy"))
    log(f"[{family}] copy floor: cp -r {cp_wall:.1f}s + sync {cp_sync:.1f}s ({cp_cpu:.1f} CPU-s)")
    load = os.getloadavg()[0]
    wall, sync, rss, err, cpu = convert(a, src, dst, partial)
    ratio = (wall + sync) / max(cp_wall + cp_sync, 1e-9)
    log(f"[{family}] converter: {wall:.1f}s + sync {sync:.1f}s ({cpu:.1f} CPU-s), peak RSS {rss / 2**30:.2f} GiB, "
        f"ratio {ratio:.2f} x copy (load average before: {load:.1f} on {os.cpu_count()} cores)")
    for line in err.strip().splitlines()[-2:]:
        log("    " + line)
    rows = spot_check(src, dst, a.spot)
    for key, name, shape, dt, op, same in rows:
        log(f"    {'OK ' if same else 'BAD'} {key} -> {name} {shape} {dt} [{op}]")
    killed_ok = None
    if a.kill_halfway:
        shutil.rmtree(dst)
        killed_ok = kill_halfway(a, src, dst, partial, total)
        w2, s2, rss2, _, _ = convert(a, src, dst, partial)
        log(f"  rerun after the kill: {w2:.1f}s, ok")
    result = dict(family=family, bytes=total, files=len(info["files"]), partial=partial, format=a.format,
                  dtype=a.dtype, convert_s=round(wall, 2), convert_sync_s=round(sync, 2),
                  peak_rss_bytes=rss, convert_cpu_s=round(cpu, 1), load_before=round(load, 2), copy_s=round(cp_wall, 2), copy_cpu_s=round(cp_cpu, 1), copy_sync_s=round(cp_sync, 2),
                  ratio=round(ratio, 3), spot_checks=len(rows), spot_checks_ok=sum(r[-1] for r in rows),
                  killed_halfway_ok=killed_ok, cpus=os.cpu_count(), when=time.strftime("%Y-%m-%d %H:%M:%S"))
    if not a.keep:
        shutil.rmtree(dst, ignore_errors=True)
        if not a.keep_source:
            shutil.rmtree(src, ignore_errors=True)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("families", nargs="*", metavar="FAMILY", help=f"any of {', '.join(FAMILIES)}")
    ap.add_argument("--all", action="store_true", help="all four families")
    ap.add_argument("--workdir", default="/tmp/paddlevl_fullsize", help="where checkpoints are written (one disk)")
    ap.add_argument("--shared", default=os.path.join(os.path.dirname(ROOT), "shared"),
                    help="folder holding fullsize/*.json and tools/make_fullsize_checkpoint.py")
    ap.add_argument("--limit-bytes", default=None, help="write only the first tensors up to SIZE (e.g. 3GB)")
    ap.add_argument("--format", default="pdparams", choices=["pdparams", "safetensors"])
    ap.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16", "float16"])
    ap.add_argument("--max-shard-size", default="5GB")
    ap.add_argument("--spot", type=int, default=8, help="tensors to compare bit for bit (default 8)")
    ap.add_argument("--reuse", action="store_true", help="reuse an existing synthetic source of the same kind")
    ap.add_argument("--keep", action="store_true", help="keep the source and the converted folder")
    ap.add_argument("--keep-source", action="store_true", help="keep the synthetic source (for --reuse)")
    ap.add_argument("--release-index", action="store_true",
                    help="files split greedily at 5 GB over the sorted names, with the manifest's (release) index: "
                         "the published POINTS-1.5 situation, where the index is wrong about most tensors' files")
    ap.add_argument("--kill-halfway", action="store_true",
                    help="also SIGKILL a conversion halfway, check nothing looks complete, and rerun")
    a = ap.parse_args(argv)
    fams = list(FAMILIES) if a.all else a.families
    if not fams:
        ap.error("name a family or pass --all")
    unknown = [f for f in fams if f not in FAMILIES]
    if unknown:
        ap.error(f"unknown family {unknown}; known: {', '.join(FAMILIES)}")
    os.makedirs(a.workdir, exist_ok=True)
    results = []
    for fam in fams:
        results.append(bench_family(a, fam))
    path = os.path.join(a.workdir, "results.json")
    old = json.load(open(path)) if os.path.exists(path) else []
    json.dump(old + results, open(path, "w"), indent=1)
    log("\n| family | GB | files | convert + sync (s) | cp + sync (s) | ratio | peak RSS (GiB) | spot checks |")
    log("|---|---|---|---|---|---|---|---|")
    for r in results:
        log(f"| {r['family']}{' (partial)' if r['partial'] else ''} | {r['bytes'] / 1e9:.2f} | {r['files']} | "
            f"{r['convert_s'] + r['convert_sync_s']:.1f} | {r['copy_s'] + r['copy_sync_s']:.1f} | {r['ratio']:.2f} | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['spot_checks_ok']}/{r['spot_checks']} |")
    bad = [r for r in results if r["spot_checks_ok"] != r["spot_checks"] or r["killed_halfway_ok"] is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
