"""The converter table against the REAL POINTS-1.5 7B release layout (names, shapes, config; no weights): every
key is consumed by exactly one rule and every parameter of the Paddle model built for the real config is produced
with its declared shape (the converter's plan-time checks, run on the release manifest)."""
import json
import os

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "points_v15")
with open(os.path.join(FIX, "fullsize_points_v15.json"), encoding="utf-8") as _f:
    MANIFEST = json.load(_f)


def _plan(config, tensors):
    from paddlevl.models.registry import get
    fam = get("points_v15")
    rules = fam.rules(config, [t["name"] for t in tensors])
    produced, dropped = {}, []
    for t in tensors:
        hits = [(r, m) for r in rules for m in (r.match(t["name"]),) if m]
        assert len(hits) == 1, (t["name"], [r.pattern for r, _ in hits])
        rule, m = hits[0]
        names, shapes = rule.target_names(m), rule.op.shapes(tuple(t["shape"]))
        if not names:
            dropped.append(t["name"])
        assert len(names) == len(shapes)
        for n, s in zip(names, shapes):
            assert n not in produced, n
            produced[n] = tuple(s)
    return produced, dropped


def test_real_release_layout_converts_exactly():
    from convert.engine import declared_shapes
    from paddlevl.models.registry import get

    cfg = MANIFEST["config"]
    produced, dropped = _plan(cfg, MANIFEST["tensors"])
    declared = declared_shapes(get("points_v15"), cfg)
    assert set(produced) == set(declared)
    assert {n: s for n, s in produced.items() if s != declared[n]} == {}
    assert dropped and all(n.startswith("vision_encoder.merger.") for n in dropped)
    # real sizes come from the config: projector input 4 x 1280, LLM hidden 3584, kv heads 4 x 128
    assert declared["vision_projector.mlp.0.weight"] == (5120, 5120)
    assert declared["vision_projector.mlp.2.weight"] == (5120, 3584)
    assert declared["llm.model.layers.0.self_attn.k_proj.weight"] == (3584, 512)
    assert declared["llm.model.layers.0.mlp.gate_proj.weight"] == (3584, 18944)
