"""Golden parity: run a fixture produced by the upstream torch code through our converter and model.

`paddlevl parity --golden FIXTURE_DIR` converts FIXTURE_DIR/source with the real converter into a temporary folder,
loads it in float32, lets the family compute every array it can from FIXTURE_DIR/inputs.npz (its `golden` hook),
and compares them with FIXTURE_DIR/expected.npz:
  float arrays: max|diff| / max|ref| <= rtol; integer/bool arrays: identical.
The required arrays (logits, image_embeds, greedy_ids) must be compared and pass; every other expected array the
family does not produce is reported as skipped.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

REQUIRED = ("logits", "image_embeds", "greedy_ids")


@dataclass
class Row:
    name: str
    shape: tuple
    max_abs: float | None
    max_rel: float | None
    status: str  # pass / FAIL / skipped / MISSING

    @property
    def ok(self):
        return self.status in ("pass", "skipped")


def compare(name, got, ref, rtol) -> Row:
    ref = np.asarray(ref)
    if got is None:
        return Row(name, ref.shape, None, None, "MISSING" if name in REQUIRED else "skipped")
    got = np.asarray(got)
    if got.shape != ref.shape:
        return Row(name, ref.shape, None, None, f"FAIL shape {got.shape}")
    if ref.dtype.kind in "iub":
        diff = np.abs(got.astype(np.int64) - ref.astype(np.int64)).max() if ref.size else 0
        return Row(name, ref.shape, float(diff), None, "pass" if diff == 0 else "FAIL")
    d = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    max_abs = float(d.max()) if d.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    rel = max_abs / scale if scale > 0 else max_abs
    ok = np.isfinite(got).all() and rel <= rtol
    return Row(name, ref.shape, max_abs, rel, "pass" if ok else "FAIL")


def fixture_family(fixture_dir) -> str:
    with open(os.path.join(fixture_dir, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)["family"]


def run_golden(fixture_dir, rtol: float = 1e-4, workdir=None, out="stdout"):
    """Returns (rows, outputs). Prints the table to `out` (a file; "stdout" = sys.stdout now; None = silent)."""
    from convert.engine import convert as convert_checkpoint

    from .checkpoint import load_model
    from .models.registry import get

    fixture_dir = os.fspath(fixture_dir)
    family = get(fixture_family(fixture_dir))
    if family.golden is None:
        raise NotImplementedError(f"family {family.name} has no golden-parity support yet")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        dst = os.path.join(tmp, "converted")
        convert_checkpoint(os.path.join(fixture_dir, "source"), dst, progress=False)
        model = load_model(dst, dtype="float32")
        with np.load(os.path.join(fixture_dir, "inputs.npz")) as z:
            inputs = {k: z[k] for k in z.files}
        outputs = family.golden(model, fixture_dir, inputs)
    with np.load(os.path.join(fixture_dir, "expected.npz")) as z:
        expected = {k: z[k] for k in z.files}
    rows = [compare(k, outputs.get(k), v, rtol) for k, v in expected.items()]
    rows += [Row(k, (), None, None, "MISSING") for k in REQUIRED if k not in expected]
    if out == "stdout":
        out = sys.stdout
    if out is not None:
        print_table(family.name, fixture_dir, rows, outputs, expected, rtol, out)
    return rows, outputs


def print_table(family, fixture_dir, rows, outputs, expected, rtol, out):
    print(f"golden parity: {fixture_dir} (family {family}, fp32, rtol {rtol:g} of max|ref|)", file=out)
    print(f"{'array':32s} {'shape':>18s} {'max abs err':>12s} {'max rel err':>12s}  status", file=out)
    for r in rows:
        a = "-" if r.max_abs is None else f"{r.max_abs:.3e}"
        m = "-" if r.max_rel is None else f"{r.max_rel:.3e}"
        print(f"{r.name:32s} {str(tuple(r.shape)):>18s} {a:>12s} {m:>12s}  {r.status}", file=out)
    for k in ("greedy_ids",):
        if k in outputs:
            print(f"{k} ours     : {np.asarray(outputs[k]).tolist()}", file=out)
            print(f"{k} upstream : {np.asarray(expected.get(k)).tolist()}", file=out)
    ok = all(r.ok for r in rows)
    print("PASS" if ok else "FAIL", file=out)


def main_golden(fixture_dir, rtol=1e-4) -> int:
    rows, _ = run_golden(fixture_dir, rtol)
    return 0 if all(r.ok for r in rows) else 1
