"""Converter table for POINTS 1.0 (WePOINTS/POINTS-Qwen-2-5-7B-Chat, architectures ["POINTSChatModel"]).

Source (HF release key names, torch layouts)              -> target (paddlevl.models.points.modeling_v1)
  {general_vit,ocr_vit}.vision_model.<CLIP key>          -> {tower}.<same key>   (Linear weights transposed)
  vision_projector.{0,2}.{weight,bias}                   -> same names           (weights transposed)
  llm.lm.embed_in.weight                                 -> llm.model.embed_tokens.weight
  llm.lm.layers.N.attention.query_dense.{weight,bias}    -> ...self_attn.q_proj
  llm.lm.layers.N.attention.key_value_dense.{w,b}        -> ...self_attn.{k,v}_proj: rows are [K_h; V_h] per kv head
                                                            h (hd rows each) -> regroup(nkv, [hd, hd])
  llm.lm.layers.N.attention.dense.weight                 -> ...self_attn.o_proj.weight
  llm.lm.layers.N.mlp.dense_h_to_4h.weight [2F, H]       -> ...mlp.{up,gate}_proj (first half up, second gate)
  llm.lm.layers.N.mlp.dense_4h_to_h.weight               -> ...mlp.down_proj.weight
  llm.lm.layers.N.{input,post_attention}_layernorm       -> same names
  llm.lm.final_layer_norm.weight                         -> llm.model.norm.weight
  llm.embed_out.weight                                   -> llm.lm_head.weight (transposed)
Sizes (kv heads, head dim, ffn) come from config.json's llm_config.
"""
from __future__ import annotations

from convert.ops import Rule, chain, drop, keep, regroup, split, transpose

TOWER = r"(general_vit|ocr_vit)\.vision_model"
LAYER = r"llm\.lm\.layers\.(\d+)"


def _vision_rules() -> list:
    # patterns are disjoint: every key matches exactly one rule, and an unknown key is left for the engine to report
    lin = r"(self_attn\.(?:q|k|v|out)_proj|mlp\.fc1|mlp\.fc2)"
    return [
        Rule(TOWER + r"\.embeddings\.(class_embedding|patch_embedding\.weight|position_embedding\.weight)",
             "{1}.embeddings.{2}", keep()),
        Rule(TOWER + r"\.embeddings\.position_ids", (), drop("non-persistent CLIP buffer (arange), recomputed")),
        Rule(TOWER + r"\.(pre_layrnorm|post_layernorm)\.(weight|bias)", "{1}.{2}.{3}", keep()),
        Rule(TOWER + r"\.encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2)\.(weight|bias)",
             "{1}.encoder.layers.{2}.{3}.{4}", keep()),
        Rule(TOWER + r"\.encoder\.layers\.(\d+)\." + lin + r"\.weight", "{1}.encoder.layers.{2}.{3}.weight",
             transpose()),
        Rule(TOWER + r"\.encoder\.layers\.(\d+)\." + lin + r"\.bias", "{1}.encoder.layers.{2}.{3}.bias", keep()),
        Rule(r"vision_projector\.(0|2)\.weight", "vision_projector.{1}.weight", transpose()),
        Rule(r"vision_projector\.(0|2)\.bias", "vision_projector.{1}.bias", keep()),
    ]


def _llm_rules(llm_config: dict) -> list:
    from paddlevl.models.points.llm import PointsLLMConfig

    c = PointsLLMConfig.from_dict(llm_config)
    hd, kv, ffn = c.head_dim, c.num_kv_heads, c.ffn_hidden_size
    t = "llm.model.layers.{1}"
    return [
        Rule(r"llm\.lm\.embed_in\.weight", "llm.model.embed_tokens.weight", keep()),
        Rule(LAYER + r"\.attention\.query_dense\.weight", t + ".self_attn.q_proj.weight", transpose()),
        Rule(LAYER + r"\.attention\.query_dense\.bias", t + ".self_attn.q_proj.bias", keep()),
        Rule(LAYER + r"\.attention\.key_value_dense\.weight",
             (t + ".self_attn.k_proj.weight", t + ".self_attn.v_proj.weight"),
             chain(regroup(kv, [hd, hd], axis=0), transpose())),
        Rule(LAYER + r"\.attention\.key_value_dense\.bias",
             (t + ".self_attn.k_proj.bias", t + ".self_attn.v_proj.bias"), regroup(kv, [hd, hd], axis=0)),
        Rule(LAYER + r"\.attention\.dense\.weight", t + ".self_attn.o_proj.weight", transpose()),
        Rule(LAYER + r"\.attention\.dense\.bias", t + ".self_attn.o_proj.bias", keep()),
        Rule(LAYER + r"\.mlp\.dense_h_to_4h\.weight", (t + ".mlp.up_proj.weight", t + ".mlp.gate_proj.weight"),
             chain(split([ffn, ffn], axis=0), transpose())),
        Rule(LAYER + r"\.mlp\.dense_h_to_4h\.bias", (t + ".mlp.up_proj.bias", t + ".mlp.gate_proj.bias"),
             split([ffn, ffn], axis=0)),
        Rule(LAYER + r"\.mlp\.dense_4h_to_h\.weight", t + ".mlp.down_proj.weight", transpose()),
        Rule(LAYER + r"\.mlp\.dense_4h_to_h\.bias", t + ".mlp.down_proj.bias", keep()),
        Rule(LAYER + r"\.(input_layernorm|post_attention_layernorm)\.weight", t + ".{2}.weight", keep()),
        Rule(r"llm\.lm\.final_layer_norm\.weight", "llm.model.norm.weight", keep()),
        Rule(r"llm\.embed_out\.weight", "llm.lm_head.weight", transpose()),
        Rule(r"llm\.lm\.layers\.(\d+)\.attention\.rotary_emb\.inv_freq", (),
             drop("rotary buffer, recomputed from rotary_emb_base")),
    ]


def v1_rules(config: dict, source_keys=()) -> list:
    """The full table; sizes from config.json (`llm_config`)."""
    if not isinstance(config.get("llm_config"), dict):
        raise KeyError("POINTS 1.0 config.json lacks 'llm_config'")
    return _vision_rules() + _llm_rules(config["llm_config"])
