"""Converter tables for the POINTS LLM (both published key layouts) and POINTS-1.5 (WePOINTS
POINTS-1-5-Qwen-2-5-7B-Chat, architectures ["POINTSV15ChatModel"]).

LLM, "customllama" layout (the HF releases, CustomLlamaForCausalLM)  -> paddlevl.models.points.llm names
  llm.lm.embed_in.weight                                  -> llm.model.embed_tokens.weight
  llm.lm.layers.N.attention.query_dense.{weight,bias}     -> ...self_attn.q_proj
  llm.lm.layers.N.attention.key_value_dense.{weight,bias} -> ...self_attn.{k,v}_proj: rows = per kv head h
                                                             [K_h (hd rows); V_h (hd rows)] -> regroup(kv, [hd, hd])
  llm.lm.layers.N.attention.query_key_value.*             -> q/k/v (CustomLlama without GQA: per head [Q_h; K_h; V_h])
  llm.lm.layers.N.attention.dense.*                       -> ...self_attn.o_proj
  llm.lm.layers.N.mlp.dense_h_to_4h.* [2F, H]             -> ...mlp.up_proj (rows 0:F), mlp.gate_proj (rows F:2F)
  llm.lm.layers.N.mlp.dense_4h_to_h.*                     -> ...mlp.down_proj
  llm.lm.layers.N.{input,post_attention}_layernorm.weight -> same names
  llm.lm.final_layer_norm.weight                          -> llm.model.norm.weight
  llm.embed_out.weight                                    -> llm.lm_head.weight
LLM, "qwen2" layout (transformers Qwen2ForCausalLM, e.g. POINTS-Reader): llm.model.* / llm.lm_head.weight with the
  same names as ours -> kept (Linear weights transposed).
The layout is detected from the key names (llm.lm.* vs llm.model.*).

POINTS-1.5 vision side:
  vision_encoder.patch_embed.proj.weight [E, C, T, p, p]  -> kept (used as a matmul, no transpose)
  vision_encoder.blocks.N.norm1/norm2.*                   -> vision_encoder.blocks.N.layer_norm1/layer_norm2.*
  vision_encoder.blocks.N.attn.qkv.* [3E, E]              -> ...self_attn.{q,k,v}_proj ([Q; K; V] blocks)
  vision_encoder.blocks.N.attn.proj.*                     -> ...self_attn.out_proj
  vision_encoder.blocks.N.mlp.fc1/fc2.*                   -> same names
  vision_encoder.merger.*                                 -> dropped: loaded by upstream but never used
  vision_projector.ln_q.*, vision_projector.mlp.{0,2}.*   -> same names
Every 2-D Linear weight is transposed (torch [out, in] -> paddle [in, out]). Sizes come from config.json.
"""
from __future__ import annotations

from convert.ops import Rule, chain, drop, keep, regroup, split, transpose

CUSTOM_LAYER = r"llm\.lm\.layers\.(\d+)"
QWEN2_LAYER = r"llm\.model\.layers\.(\d+)"
T_LAYER = "llm.model.layers.{1}"


def detect_llm_layout(llm_config: dict, source_keys=()) -> str:
    """'customllama' or 'qwen2', from the checkpoint's key names (the config's key style when no keys given)."""
    keys = list(source_keys)
    custom = any(k.startswith("llm.lm.") or k == "llm.embed_out.weight" for k in keys)
    qwen2 = any(k.startswith("llm.model.") or k == "llm.lm_head.weight" for k in keys)
    if custom and qwen2:
        raise ValueError("checkpoint mixes CustomLlama (llm.lm.*) and Qwen2 (llm.model.*) LLM key names")
    if custom:
        return "customllama"
    if qwen2:
        return "qwen2"
    if keys:
        raise ValueError("no LLM weights found: expected llm.lm.* (CustomLlama) or llm.model.* (Qwen2) keys")
    from paddlevl.models.points.llm import PointsLLMConfig
    return PointsLLMConfig.from_dict(llm_config).layout


def llm_rules(llm_config: dict, source_keys=()) -> list:
    """Rules for the `llm.*` keys of either layout (shared by POINTS 1.0 and POINTS-1.5)."""
    from paddlevl.models.points.llm import PointsLLMConfig

    c = PointsLLMConfig.from_dict(llm_config)
    if detect_llm_layout(llm_config, source_keys) == "qwen2":
        return _qwen2_llm_rules(c.tie_word_embeddings)
    hd, kv, heads, ffn = c.head_dim, c.num_kv_heads, c.num_heads, c.ffn_hidden_size
    a, t = CUSTOM_LAYER + r"\.attention\.", T_LAYER + ".self_attn."
    m, tm = CUSTOM_LAYER + r"\.mlp\.", T_LAYER + ".mlp."
    return [
        Rule(r"llm\.lm\.embed_in\.weight", "llm.model.embed_tokens.weight", keep()),
        Rule(a + r"query_dense\.weight", t + "q_proj.weight", transpose()),
        Rule(a + r"query_dense\.bias", t + "q_proj.bias", keep()),
        Rule(a + r"key_value_dense\.weight", (t + "k_proj.weight", t + "v_proj.weight"),
             chain(regroup(kv, [hd, hd], axis=0), transpose())),
        Rule(a + r"key_value_dense\.bias", (t + "k_proj.bias", t + "v_proj.bias"), regroup(kv, [hd, hd], axis=0)),
        # CustomLlama uses one fused projection when num_kv_heads == num_attention_heads
        Rule(a + r"query_key_value\.weight", (t + "q_proj.weight", t + "k_proj.weight", t + "v_proj.weight"),
             chain(regroup(heads, [hd, hd, hd], axis=0), transpose())),
        Rule(a + r"query_key_value\.bias", (t + "q_proj.bias", t + "k_proj.bias", t + "v_proj.bias"),
             regroup(heads, [hd, hd, hd], axis=0)),
        Rule(a + r"dense\.weight", t + "o_proj.weight", transpose()),
        Rule(a + r"dense\.bias", t + "o_proj.bias", keep()),
        Rule(a + r"rotary_emb\.inv_freq", (), drop("rotary buffer, recomputed from rotary_emb_base")),
        Rule(m + r"dense_h_to_4h\.weight", (tm + "up_proj.weight", tm + "gate_proj.weight"),
             chain(split([ffn, ffn], axis=0), transpose())),
        Rule(m + r"dense_h_to_4h\.bias", (tm + "up_proj.bias", tm + "gate_proj.bias"), split([ffn, ffn], axis=0)),
        Rule(m + r"dense_4h_to_h\.weight", tm + "down_proj.weight", transpose()),
        Rule(m + r"dense_4h_to_h\.bias", tm + "down_proj.bias", keep()),
        Rule(CUSTOM_LAYER + r"\.(input_layernorm|post_attention_layernorm)\.weight", T_LAYER + ".{2}.weight", keep()),
        Rule(r"llm\.lm\.final_layer_norm\.weight", "llm.model.norm.weight", keep()),
        _head_rule(r"llm\.embed_out\.weight", c.tie_word_embeddings),
    ]


def _head_rule(pattern: str, tied: bool):
    if tied:  # the model reads the input embedding; a saved copy of the tied head is redundant
        return Rule(pattern, (), drop("output head tied to the input embedding (tie_word_embeddings)"))
    return Rule(pattern, "llm.lm_head.weight", transpose())


def _qwen2_llm_rules(tied: bool) -> list:
    lin = r"(self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)"
    return [
        Rule(r"llm\.model\.embed_tokens\.weight", "llm.model.embed_tokens.weight", keep()),
        Rule(QWEN2_LAYER + r"\." + lin + r"\.weight", T_LAYER + ".{2}.weight", transpose()),
        Rule(QWEN2_LAYER + r"\." + lin + r"\.bias", T_LAYER + ".{2}.bias", keep()),
        Rule(QWEN2_LAYER + r"\.(input_layernorm|post_attention_layernorm)\.weight", T_LAYER + ".{2}.weight", keep()),
        Rule(QWEN2_LAYER + r"\.self_attn\.rotary_emb\.inv_freq", (), drop("rotary buffer, recomputed from rope_theta")),
        Rule(r"llm\.model\.norm\.weight", "llm.model.norm.weight", keep()),
        _head_rule(r"llm\.lm_head\.weight", tied),
    ]


def _v15_vision_rules(vision_config: dict) -> list:
    from paddlevl.models.points.modeling_v15 import NaViTConfig

    e = NaViTConfig.from_dict(vision_config).embed_dim
    b, t = r"vision_encoder\.blocks\.(\d+)\.", "vision_encoder.blocks.{1}."
    qkv = tuple(t + f"self_attn.{n}_proj" for n in "qkv")
    return [
        Rule(r"vision_encoder\.patch_embed\.proj\.weight", "vision_encoder.patch_embed.proj.weight", keep()),
        Rule(b + r"norm(1|2)\.(weight|bias)", t + "layer_norm{2}.{3}", keep()),
        Rule(b + r"attn\.qkv\.weight", tuple(n + ".weight" for n in qkv), chain(split([e, e, e], axis=0), transpose())),
        Rule(b + r"attn\.qkv\.bias", tuple(n + ".bias" for n in qkv), split([e, e, e], axis=0)),
        Rule(b + r"attn\.proj\.weight", t + "self_attn.out_proj.weight", transpose()),
        Rule(b + r"attn\.proj\.bias", t + "self_attn.out_proj.bias", keep()),
        Rule(b + r"mlp\.(fc1|fc2)\.weight", t + "mlp.{2}.weight", transpose()),
        Rule(b + r"mlp\.(fc1|fc2)\.bias", t + "mlp.{2}.bias", keep()),
        Rule(r"vision_encoder\.merger\..+", (),
             drop("Qwen2-VL's own patch merger: loaded by upstream but never used (POINTS-1.5's vision tower "
                  "forward stops after the last block; vision_projector does the merging)")),
        Rule(r"vision_encoder\.rotary_pos_emb\.inv_freq", (), drop("rotary buffer, recomputed (theta 10000)")),
        Rule(r"vision_projector\.ln_q\.(weight|bias)", "vision_projector.ln_q.{1}", keep()),
        Rule(r"vision_projector\.mlp\.(0|2)\.weight", "vision_projector.mlp.{1}.weight", transpose()),
        Rule(r"vision_projector\.mlp\.(0|2)\.bias", "vision_projector.mlp.{1}.bias", keep()),
    ]


def v15_rules(config: dict, source_keys=()) -> list:
    """The full POINTS-1.5 table; the LLM key layout is picked from source_keys."""
    for k in ("llm_config", "vision_config"):
        if not isinstance(config.get(k), dict):
            raise KeyError(f"POINTS-1.5 config.json lacks '{k}'")
    return _v15_vision_rules(config["vision_config"]) + llm_rules(config["llm_config"], source_keys)
