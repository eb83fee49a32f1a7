"""Converter table for Qwen-VL-Chat (Qwen/Qwen-VL-Chat, architectures ["QWenLMHeadModel"], .bin shards).

Source (release key names, torch layouts)                     -> target (paddlevl.models.qwen_vl.modeling)
  transformer.wte.weight, transformer.ln_f.weight              -> same names
  transformer.h.N.{ln_1,ln_2}.weight                           -> same names
  transformer.h.N.attn.c_attn.{weight [3H, H], bias}           -> same names, kept fused ([Q | K | V] blocks)
  transformer.h.N.attn.c_proj.weight                           -> same name
  transformer.h.N.mlp.w1 / w2 / c_proj .weight                 -> mlp.up_proj / gate_proj / down_proj
                                                                  (upstream: c_proj(w1(x) * silu(w2(x))))
  transformer.visual.{conv1.weight, positional_embedding, proj} -> same names, as is (conv layout is shared;
                                                                  proj is a raw x @ proj matrix: NOT transposed)
  transformer.visual.{ln_pre,ln_post}.*                        -> same names
  transformer.visual.transformer.resblocks.N.
      ln_1 / ln_2                                              -> layer_norm1 / layer_norm2
      attn.in_proj.{weight [3w, w], bias}                      -> self_attn.{q,k,v}_proj: rows for head h are
                                                                  [q_h; k_h; v_h] -> regroup(heads, [hd]*3)
      attn.out_proj                                            -> self_attn.out_proj
      mlp.c_fc / mlp.c_proj                                    -> mlp.fc1 / mlp.fc2
  transformer.visual.attn_pool.{pos_embed, query}              -> same names (pos_embed is loaded, not recomputed)
  transformer.visual.attn_pool.kv_proj.weight                  -> same name (absent when width == output_dim)
  transformer.visual.attn_pool.attn.in_proj_{weight,bias}      -> attn.{q,k,v}_proj: torch MultiheadAttention's
                                                                  [Wq; Wk; Wv] blocks -> split([H, H, H])
  transformer.visual.attn_pool.attn.out_proj.*                 -> attn.out_proj.*
  transformer.visual.attn_pool.{ln_q,ln_kv}.*                  -> same names
  lm_head.weight                                               -> same name (transposed)
Every Linear weight is transposed (torch [out, in] -> paddle [in, out]); sizes come from config.json.
"""
from __future__ import annotations

from convert.ops import Rule, chain, drop, keep, regroup, split, transpose

H = r"transformer\.h\.(\d+)"
V = r"transformer\.visual"
RB = V + r"\.transformer\.resblocks\.(\d+)"


def _llm_rules() -> list:
    t = "transformer.h.{1}"
    mlp = {"w1": "up_proj", "w2": "gate_proj", "c_proj": "down_proj"}
    rules = [
        Rule(r"transformer\.wte\.weight", "transformer.wte.weight", keep()),
        Rule(r"transformer\.ln_f\.weight", "transformer.ln_f.weight", keep()),
        Rule(H + r"\.(ln_1|ln_2)\.weight", t + ".{2}.weight", keep()),
        Rule(H + r"\.attn\.(c_attn|c_proj)\.weight", t + ".attn.{2}.weight", transpose()),
        Rule(H + r"\.attn\.(c_attn|c_proj)\.bias", t + ".attn.{2}.bias", keep()),
        Rule(H + r"\.attn\.masked_bias", (), drop("non-persistent upstream buffer (unused constant)")),
        Rule(H + r"\.attn\.rotary_emb\.inv_freq", (), drop("rotary buffer, recomputed from rotary_emb_base")),
        Rule(r"lm_head\.weight", "lm_head.weight", transpose()),
    ]
    for src, dst in mlp.items():
        rules.append(Rule(H + rf"\.mlp\.{src}\.weight", t + f".mlp.{dst}.weight", transpose()))
        rules.append(Rule(H + rf"\.mlp\.{src}\.bias", t + f".mlp.{dst}.bias", keep()))
    return rules


def _visual_rules(visual: dict) -> list:
    width, heads, out_dim = int(visual["width"]), int(visual["heads"]), int(visual.get("output_dim", 512))
    hd = width // heads
    v = "transformer.visual"
    b = v + ".transformer.resblocks.{1}"
    qkv = tuple(b + f".self_attn.{n}_proj" for n in "qkv")
    pool_qkv = tuple(v + f".attn_pool.attn.{n}_proj" for n in "qkv")
    return [
        Rule(V + r"\.(conv1\.weight|positional_embedding|proj)", v + ".{1}", keep()),
        Rule(V + r"\.(ln_pre|ln_post)\.(weight|bias)", v + ".{1}.{2}", keep()),
        Rule(RB + r"\.ln_1\.(weight|bias)", b + ".layer_norm1.{2}", keep()),
        Rule(RB + r"\.ln_2\.(weight|bias)", b + ".layer_norm2.{2}", keep()),
        Rule(RB + r"\.attn\.in_proj\.weight", tuple(n + ".weight" for n in qkv),
             chain(regroup(heads, [hd, hd, hd], axis=0), transpose())),
        Rule(RB + r"\.attn\.in_proj\.bias", tuple(n + ".bias" for n in qkv), regroup(heads, [hd, hd, hd], axis=0)),
        Rule(RB + r"\.attn\.out_proj\.weight", b + ".self_attn.out_proj.weight", transpose()),
        Rule(RB + r"\.attn\.out_proj\.bias", b + ".self_attn.out_proj.bias", keep()),
        Rule(RB + r"\.mlp\.c_fc\.weight", b + ".mlp.fc1.weight", transpose()),
        Rule(RB + r"\.mlp\.c_fc\.bias", b + ".mlp.fc1.bias", keep()),
        Rule(RB + r"\.mlp\.c_proj\.weight", b + ".mlp.fc2.weight", transpose()),
        Rule(RB + r"\.mlp\.c_proj\.bias", b + ".mlp.fc2.bias", keep()),
        Rule(V + r"\.attn_pool\.(pos_embed|query)", v + ".attn_pool.{1}", keep()),
        Rule(V + r"\.attn_pool\.kv_proj\.weight", v + ".attn_pool.kv_proj.weight", transpose()),
        Rule(V + r"\.attn_pool\.attn\.in_proj_weight", tuple(n + ".weight" for n in pool_qkv),
             chain(split([out_dim, out_dim, out_dim], axis=0), transpose())),
        Rule(V + r"\.attn_pool\.attn\.in_proj_bias", tuple(n + ".bias" for n in pool_qkv),
             split([out_dim, out_dim, out_dim], axis=0)),
        Rule(V + r"\.attn_pool\.attn\.out_proj\.weight", v + ".attn_pool.attn.out_proj.weight", transpose()),
        Rule(V + r"\.attn_pool\.attn\.out_proj\.bias", v + ".attn_pool.attn.out_proj.bias", keep()),
        Rule(V + r"\.attn_pool\.(ln_q|ln_kv)\.(weight|bias)", v + ".attn_pool.{1}.{2}", keep()),
    ]


def rules(config: dict, source_keys=()) -> list:
    """The full table; sizes from config.json (`visual`)."""
    if not isinstance(config.get("visual"), dict):
        raise KeyError("Qwen-VL config.json lacks the 'visual' section")
    return _llm_rules() + _visual_rules(config["visual"])
