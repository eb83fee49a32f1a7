"""`paddlevl parity --golden` on a synthetic, family-free fixture.

The fixture is written here in the format of the real ones (manifest.json, source/ in an HF safetensors layout,
inputs.npz, expected.npz). Its expected arrays come from an independent float64 numpy implementation of a tiny
"VLM" (a linear projector whose outputs replace placeholder tokens, then a Llama-style decoder), so the harness is
checked end to end: real converter, loader, family hook, comparison table, exit codes."""
import json
import math
import os

import numpy as np
import paddle
import pytest
from safetensors.numpy import save_file

from paddlevl import cli
from paddlevl.generation import GenerationConfig, generate
from paddlevl.models.registry import Family, _FAMILIES, register
from paddlevl.parity import run_golden
from toy_lm import ToyLM

CFG = {"architectures": ["ToyVLMForCausalLM"], "model_type": "toy_vlm", "vocab_size": 48, "hidden_size": 32,
       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 40,
       "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "feature_dim": 12, "image_token_id": 47}


class ToyVLM(paddle.nn.Layer):
    def __init__(self, c):
        super().__init__()
        self.lm = ToyLM(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                        c["num_key_value_heads"], c["intermediate_size"], c["rms_norm_eps"], c["rope_theta"])
        self.projector = paddle.nn.Linear(c["feature_dim"], c["hidden_size"])


def toy_rules(config, keys):
    from convert.ops import Rule, keep, transpose
    lin = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}
    rules = [Rule(r"model\.embed_tokens\.weight", "lm.embed_tokens.weight", keep()),
             Rule(r"model\.norm\.weight", "lm.norm.weight", keep()),
             Rule(r"lm_head\.weight", "lm.lm_head.weight", transpose()),
             Rule(r"projector\.weight", "projector.weight", transpose()),
             Rule(r"projector\.bias", "projector.bias", keep()),
             Rule(r"model\.layers\.(\d+)\.input_layernorm\.weight", "lm.layers.{1}.norm1.weight", keep()),
             Rule(r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "lm.layers.{1}.norm2.weight", keep()),
             Rule(r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", "lm.layers.{1}.mlp.{2}_proj.weight",
                  transpose())]
    for src, dst in lin.items():
        rules.append(Rule(rf"model\.layers\.(\d+)\.self_attn\.{src}\.weight", f"lm.layers.{{1}}.{dst}.weight",
                          transpose()))
        if src != "o_proj":
            rules.append(Rule(rf"model\.layers\.(\d+)\.self_attn\.{src}\.bias", f"lm.layers.{{1}}.{dst}.bias",
                              keep()))
    return rules


def toy_golden(model, fixture_dir, inputs):
    ids = paddle.to_tensor(inputs["input_ids"])
    image_embeds = model.projector(paddle.to_tensor(inputs["image_features"]))
    emb = model.lm.embed(ids)
    rows = paddle.nonzero((ids == CFG["image_token_id"])[0]).flatten()
    emb = paddle.scatter(emb[0], rows, image_embeds).unsqueeze(0)
    mask = np.ones(inputs["input_ids"].shape, np.int64)
    pos = paddle.arange(ids.shape[1], dtype="int64").unsqueeze(0)
    logits = model.lm.forward_embeds(emb, paddle.to_tensor(mask), pos, model.lm.new_cache())
    out = generate(model.lm, emb, mask, GenerationConfig(max_new_tokens=6))
    return {"logits": logits.numpy(), "image_embeds": image_embeds.numpy(),
            "greedy_ids": np.array([out.sequences[0]], np.int64)}


@pytest.fixture(scope="module", autouse=True)
def toy_family():
    fam = register(Family(name="toy_vlm", architectures=("ToyVLMForCausalLM",), parse_config=dict,
                          build_model=ToyVLM, rules=toy_rules, golden=toy_golden))
    yield fam
    _FAMILIES.pop("toy_vlm", None)


# ---------------------------------------------------------------- independent numpy reference (float64)
def np_forward(w, ids, feats, c):
    h, nh, nkv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    d, eps = h // nh, c["rms_norm_eps"]
    img = feats @ w["projector.weight"].T + w["projector.bias"]
    x = w["model.embed_tokens.weight"][ids].copy()
    x[np.flatnonzero(ids == c["image_token_id"])[: len(img)]] = img  # the prompt's placeholders only
    n = len(ids)
    inv = 1.0 / c["rope_theta"] ** (np.arange(0, d, 2) / d)
    ang = np.arange(n)[:, None] * inv
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(t):  # [n, heads, d]
        t1, t2 = t[..., : d // 2], t[..., d // 2:]
        return t * cos[:, None] + np.concatenate([-t2, t1], -1) * sin[:, None]

    def rms(t, wt):
        return t / np.sqrt((t ** 2).mean(-1, keepdims=True) + eps) * wt

    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        hh = rms(x, w[p + "input_layernorm.weight"])
        q = rope((hh @ w[p + "self_attn.q_proj.weight"].T + w[p + "self_attn.q_proj.bias"]).reshape(n, nh, d))
        k = rope((hh @ w[p + "self_attn.k_proj.weight"].T + w[p + "self_attn.k_proj.bias"]).reshape(n, nkv, d))
        v = (hh @ w[p + "self_attn.v_proj.weight"].T + w[p + "self_attn.v_proj.bias"]).reshape(n, nkv, d)
        k, v = np.repeat(k, nh // nkv, 1), np.repeat(v, nh // nkv, 1)
        s = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", pr, v).reshape(n, h) @ w[p + "self_attn.o_proj.weight"].T
        hh = rms(x, w[p + "post_attention_layernorm.weight"])
        g = hh @ w[p + "mlp.gate_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (hh @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    return rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T, img


def write_fixture(root, seed=0):
    rng = np.random.default_rng(seed)
    c = CFG
    h, f, v, fd = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["feature_dim"]
    kvd = c["num_key_value_heads"] * h // c["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h),
              "projector.weight": (h, fd), "projector.bias": (h,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
                       p + "self_attn.k_proj.weight": (kvd, h), p + "self_attn.k_proj.bias": (kvd,),
                       p + "self_attn.v_proj.weight": (kvd, h), p + "self_attn.v_proj.bias": (kvd,),
                       p + "self_attn.o_proj.weight": (h, h), p + "mlp.gate_proj.weight": (f, h),
                       p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f)})
    w = {}
    for k, s in shapes.items():
        a = rng.standard_normal(s) / math.sqrt(s[-1])
        if k.endswith("norm.weight"):
            a = 1 + 0.1 * rng.standard_normal(s)
        if k == "lm_head.weight":
            a *= 6
        w[k] = a.astype(np.float32)
    os.makedirs(os.path.join(root, "source"))
    save_file(w, os.path.join(root, "source", "model.safetensors"))
    json.dump(c, open(os.path.join(root, "source", "config.json"), "w"))
    json.dump({"family": "toy_vlm", "note": "synthetic family-free fixture"}, open(os.path.join(root, "manifest.json"), "w"))
    ids = rng.integers(0, v - 1, size=20)
    ids[3:7] = c["image_token_id"]
    feats = rng.standard_normal((4, fd))
    w64 = {k: a.astype(np.float64) for k, a in w.items()}
    seq, greedy = list(ids), []
    for _ in range(6):  # greedy without cache: recompute the whole sequence each step
        logits, img = np_forward(w64, np.array(seq), feats, c)
        greedy.append(int(logits[-1].argmax()))
        seq.append(greedy[-1])
    logits, img = np_forward(w64, ids, feats, c)
    np.savez(os.path.join(root, "inputs.npz"), input_ids=ids[None].astype(np.int64),
             image_features=feats.astype(np.float32))
    np.savez(os.path.join(root, "expected.npz"), logits=logits[None].astype(np.float32),
             image_embeds=img.astype(np.float32), greedy_ids=np.array([greedy], np.int64),
             debug_unproduced=np.zeros(3, np.float32))
    return root


def test_golden_harness_passes_on_synthetic_fixture(tmp_path, capsys):
    fx = write_fixture(str(tmp_path / "fx"))
    rows, outputs = run_golden(fx, rtol=1e-4)
    status = {r.name: r.status for r in rows}
    assert status == {"logits": "pass", "image_embeds": "pass", "greedy_ids": "pass", "debug_unproduced": "skipped"}
    assert cli.main(["parity", "--golden", fx]) == 0
    table = capsys.readouterr().out
    assert "max rel err" in table and "debug_unproduced" in table and table.strip().endswith("PASS")


def test_golden_harness_fails_on_wrong_expected_and_missing_required(tmp_path, capsys):
    fx = write_fixture(str(tmp_path / "fx"))
    exp = dict(np.load(os.path.join(fx, "expected.npz")))
    bad = dict(exp, logits=exp["logits"] + 1e-3 * np.abs(exp["logits"]).max())   # 1e-3 of the range: too far
    np.savez(os.path.join(fx, "expected.npz"), **bad)
    assert cli.main(["parity", "--golden", fx]) == 1
    assert "FAIL" in capsys.readouterr().out
    bad = dict(exp, greedy_ids=exp["greedy_ids"][:, ::-1].copy())
    np.savez(os.path.join(fx, "expected.npz"), **bad)
    assert cli.main(["parity", "--golden", fx]) == 1
    bad = dict(exp, some_extra=np.zeros(2))
    np.savez(os.path.join(fx, "expected.npz"), **{k: v for k, v in bad.items() if k != "image_embeds"})
    rows, _ = run_golden(fx, out=None)
    assert ("image_embeds", "MISSING") in {(r.name, r.status) for r in rows}
