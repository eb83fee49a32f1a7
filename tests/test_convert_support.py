"""A tiny test-only family for the converter tests, and writers of tiny upstream-style checkpoints.

The family has the fused layouts the real ones have: a qkv projection fused per kv-head group (regroup + transpose),
a fused gate/up projection (split + transpose), a [1, 1, H] parameter (reshape), a rotary buffer that is dropped,
an embedding and a LayerNorm (keep). Expected Paddle tensors are computed here by explicit loops, independently of
convert.ops, so the tests check the engine against a second implementation.
(No tests in this module: pytest collects it, finds none, and the other test_convert_* files import it.)
"""
from __future__ import annotations

import json
import os

import numpy as np

FAMILY = "tiny_test"
ARCH = "TinyTestForCausalLM"


def tiny_config(vocab=40, hidden=16, heads=4, kv_heads=2, ffn=24, layers=2, **extra):
    cfg = {"architectures": [ARCH], "model_type": "tiny_test", "vocab_size": vocab, "hidden_size": hidden,
           "num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": ffn,
           "num_hidden_layers": layers, "torch_dtype": "bfloat16"}
    cfg.update(extra)
    return cfg


def _dims(cfg):
    h, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // nh
    return h, nh, nkv, d, cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]


# --------------------------------------------------------------------------------------------------- the family
def parse_config(config):
    return dict(config)


def build_model(cfg):
    import paddle
    from paddle import nn

    h, nh, nkv, d, f, v, n = _dims(cfg)

    class Block(nn.Layer):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(h, nh * d)
            self.k_proj = nn.Linear(h, nkv * d)
            self.v_proj = nn.Linear(h, nkv * d)
            self.o_proj = nn.Linear(nh * d, h, bias_attr=False)
            self.gate_proj = nn.Linear(h, f, bias_attr=False)
            self.up_proj = nn.Linear(h, f, bias_attr=False)
            self.down_proj = nn.Linear(f, h, bias_attr=False)
            self.norm_weight = self.create_parameter([h], default_initializer=nn.initializer.Constant(1.0))

    class Tiny(nn.Layer):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(v, h)
            self.layers = nn.LayerList([Block() for _ in range(n)])
            self.norm = nn.LayerNorm(h, epsilon=1e-6)
            self.pos_scale = self.create_parameter([h])
            self.lm_head = nn.Linear(h, v, bias_attr=False)
            # a computed table: not persistable, so not part of the checkpoint
            self.register_buffer("inv_freq", paddle.ones([d // 2]), persistable=False)

        def forward(self, ids):
            x = self.embed_tokens(ids)
            for blk in self.layers:
                x = x + blk.o_proj(blk.q_proj(x))
            return self.lm_head(self.norm(x) * self.pos_scale)

    return Tiny()


def rules(config, source_keys):
    from convert.ops import Rule, chain, drop, keep, regroup, reshape, split, transpose

    h, nh, nkv, d, f, v, n = _dims(config)
    qkv = regroup(nkv, [nh // nkv * d, d, d])
    return [
        Rule(r"model\.embed_tokens\.weight", "embed_tokens.weight", keep()),
        Rule(r"model\.layers\.(\d+)\.attn\.qkv\.weight",
             ("layers.{1}.q_proj.weight", "layers.{1}.k_proj.weight", "layers.{1}.v_proj.weight"),
             chain(qkv, transpose())),
        Rule(r"model\.layers\.(\d+)\.attn\.qkv\.bias",
             ("layers.{1}.q_proj.bias", "layers.{1}.k_proj.bias", "layers.{1}.v_proj.bias"), qkv),
        Rule(r"model\.layers\.(\d+)\.attn\.o_proj\.weight", "layers.{1}.o_proj.weight", transpose()),
        Rule(r"model\.layers\.(\d+)\.mlp\.gate_up_proj\.weight",
             ("layers.{1}.gate_proj.weight", "layers.{1}.up_proj.weight"), chain(split([f, f]), transpose())),
        Rule(r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "layers.{1}.down_proj.weight", transpose()),
        Rule(r"model\.layers\.(\d+)\.norm\.weight", "layers.{1}.norm_weight"),
        Rule(r"model\.norm\.(weight|bias)", "norm.{1}"),
        Rule(r"model\.pos_scale", "pos_scale", reshape([-1])),
        Rule(r"lm_head\.weight", "lm_head.weight", transpose()),
        Rule(r"model\.rotary_emb\.inv_freq", None, drop("recomputed from the config at load time")),
    ]


def register():
    from paddlevl.models import registry

    fams = registry.load_all()
    if FAMILY in fams:
        return fams[FAMILY]
    return registry.register(registry.Family(
        name=FAMILY, architectures=(ARCH,), model_types=("tiny_test",), parse_config=parse_config,
        build_model=build_model, rules=rules,
        extra_files=("tokenizer.json", "generation_config.json", "vision/*", "missing_file.txt")))


# --------------------------------------------------------------------------------------------------- source data
def source_shapes(cfg):
    h, nh, nkv, d, f, v, n = _dims(cfg)
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(n):
        p = f"model.layers.{i}."
        shapes[p + "attn.qkv.weight"] = ((nh + 2 * nkv) * d, h)
        shapes[p + "attn.qkv.bias"] = ((nh + 2 * nkv) * d,)
        shapes[p + "attn.o_proj.weight"] = (h, nh * d)
        shapes[p + "mlp.gate_up_proj.weight"] = (2 * f, h)
        shapes[p + "mlp.down_proj.weight"] = (h, f)
        shapes[p + "norm.weight"] = (h,)
    shapes.update({"model.norm.weight": (h,), "model.norm.bias": (h,), "model.pos_scale": (1, 1, h),
                   "model.rotary_emb.inv_freq": (d // 2,), "lm_head.weight": (v, h)})
    return shapes


def make_words(cfg, dtype="bfloat16", seed=0):
    """{key: raw words} (bf16 as uint16). bf16 words are uniformly random 16-bit patterns: NaN payloads, infinities
    and subnormals included, so any rounding anywhere shows up."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, s in source_shapes(cfg).items():
        if dtype == "bfloat16":
            out[k] = rng.integers(0, 1 << 16, size=s, dtype=np.uint16)
        else:
            out[k] = rng.standard_normal(s).astype(dtype)
    return out


def to_torch(words, dtype):
    import torch
    if dtype == "bfloat16":
        return torch.from_numpy(words.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(words.copy())


def expected_paddle(cfg, words):
    """{paddle name: raw words} computed with explicit loops (independent of convert.ops)."""
    h, nh, nkv, d, f, v, n = _dims(cfg)
    qn = nh // nkv * d
    exp = {"embed_tokens.weight": words["model.embed_tokens.weight"],
           "norm.weight": words["model.norm.weight"], "norm.bias": words["model.norm.bias"],
           "pos_scale": words["model.pos_scale"].reshape(h), "lm_head.weight": words["lm_head.weight"].T}
    for i in range(n):
        p = f"model.layers.{i}."
        w, b = words[p + "attn.qkv.weight"], words[p + "attn.qkv.bias"]
        qs, ks, vs = [], [], []
        for g in range(nkv):
            base = g * (qn + 2 * d)
            qs.append(np.arange(base, base + qn))
            ks.append(np.arange(base + qn, base + qn + d))
            vs.append(np.arange(base + qn + d, base + qn + 2 * d))
        for name, rows in (("q", qs), ("k", ks), ("v", vs)):
            rows = np.concatenate(rows)
            exp[f"layers.{i}.{name}_proj.weight"] = w[rows].T
            exp[f"layers.{i}.{name}_proj.bias"] = b[rows]
        exp[f"layers.{i}.o_proj.weight"] = words[p + "attn.o_proj.weight"].T
        gu = words[p + "mlp.gate_up_proj.weight"]
        exp[f"layers.{i}.gate_proj.weight"] = gu[:f].T
        exp[f"layers.{i}.up_proj.weight"] = gu[f:].T
        exp[f"layers.{i}.down_proj.weight"] = words[p + "mlp.down_proj.weight"].T
        exp[f"layers.{i}.norm_weight"] = words[p + "norm.weight"]
    return {k: np.ascontiguousarray(a) for k, a in exp.items()}


# --------------------------------------------------------------------------------------------------- checkpoint writers
def write_checkpoint(folder, cfg, words, dtype="bfloat16", fmt="safetensors", shards=1, extras=True):
    """Write an upstream-style folder: config.json, weights (single file or `shards` files + HF index), extra files."""
    import torch
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    keys = list(words)
    groups = [keys[i::shards] for i in range(shards)] if shards > 1 else [keys]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    weight_map = {}
    for gi, ks in enumerate(groups, 1):
        if shards == 1:
            fn = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
        else:
            fn = (f"model-{gi:05d}-of-{shards:05d}.safetensors" if fmt == "safetensors"
                  else f"pytorch_model-{gi:05d}-of-{shards:05d}.bin")
        sd = {k: to_torch(words[k], dtype) for k in ks}
        if fmt == "safetensors":
            from safetensors.torch import save_file
            save_file(sd, os.path.join(folder, fn), metadata={"format": "pt"})
        else:
            torch.save(sd, os.path.join(folder, fn))
        weight_map.update({k: fn for k in ks})
    if shards > 1:
        index = "model.safetensors.index.json" if ext == "safetensors" else "pytorch_model.bin.index.json"
        total = sum(words[k].nbytes for k in keys)
        with open(os.path.join(folder, index), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    if extras:
        with open(os.path.join(folder, "tokenizer.json"), "w") as f:
            f.write('{"model": "tiny"}\n')
        with open(os.path.join(folder, "generation_config.json"), "w") as f:
            f.write('{"max_new_tokens": 8}\n')
        os.makedirs(os.path.join(folder, "vision"), exist_ok=True)
        with open(os.path.join(folder, "vision", "config.json"), "w") as f:
            f.write('{"image_size": 28}\n')
        with open(os.path.join(folder, "README.md"), "w") as f:
            f.write("not copied: not an extra file of the family\n")
    return folder


def bf16_words_to_f32(words):
    return (words.astype(np.uint32) << 16).view(np.float32)


def same_words(a, b):
    """Bit-exact equality (NaN payloads included)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype.itemsize != b.dtype.itemsize:
        return False
    u = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    return bool(np.array_equal(np.ascontiguousarray(a).view(u), np.ascontiguousarray(b).view(u)))
