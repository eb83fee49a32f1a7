"""Converter table for POINTS 1.0 (WePOINTS/POINTS-Qwen-2-5-7B-Chat, architectures ["POINTSChatModel"]).

Source (HF release key names, torch layouts)              -> target (paddlevl.models.points.modeling_v1)
  {general_vit,ocr_vit}.vision_model.<CLIP key>          -> {tower}.<same key> (q/k/v/out_proj, fc1, fc2 weights
                                                            transposed; conv, embeddings, norms kept)
  {tower}.vision_model.embeddings.position_ids           -> dropped (non-persistent buffer, if a file has it)
  vision_projector.{0,2}.{weight,bias}                   -> same names (weights transposed)
  llm.*                                                  -> the shared POINTS LLM table (convert/rules/points.py
                                                            `llm_rules`: CustomLlama llm.lm.* / embed_out, K/V
                                                            interleaved per kv head, dense_h_to_4h = [up; gate])
Sizes (kv heads, head dim, ffn) come from config.json's llm_config. Patterns are disjoint: every key matches exactly
one rule, and a key no rule knows is left for the engine to report.
"""
from __future__ import annotations

from convert.ops import Rule, drop, keep, transpose
from convert.rules.points import llm_rules

TOWER = r"(general_vit|ocr_vit)\.vision_model"
LINEAR = r"(self_attn\.(?:q|k|v|out)_proj|mlp\.fc1|mlp\.fc2)"


def vision_rules() -> list:
    layer = TOWER + r"\.encoder\.layers\.(\d+)\."
    return [
        Rule(TOWER + r"\.embeddings\.(class_embedding|patch_embedding\.weight|position_embedding\.weight)",
             "{1}.embeddings.{2}", keep()),
        Rule(TOWER + r"\.embeddings\.position_ids", (), drop("non-persistent CLIP buffer (arange), recomputed")),
        Rule(TOWER + r"\.(pre_layrnorm|post_layernorm)\.(weight|bias)", "{1}.{2}.{3}", keep()),
        Rule(layer + r"(layer_norm1|layer_norm2)\.(weight|bias)", "{1}.encoder.layers.{2}.{3}.{4}", keep()),
        Rule(layer + LINEAR + r"\.weight", "{1}.encoder.layers.{2}.{3}.weight", transpose()),
        Rule(layer + LINEAR + r"\.bias", "{1}.encoder.layers.{2}.{3}.bias", keep()),
        Rule(r"vision_projector\.(0|2)\.weight", "vision_projector.{1}.weight", transpose()),
        Rule(r"vision_projector\.(0|2)\.bias", "vision_projector.{1}.bias", keep()),
    ]


def v1_rules(config: dict, source_keys=()) -> list:
    """The full table; the LLM part (and its key layout) from the shared POINTS LLM rules."""
    for k in ("llm_config", "vision_config"):
        if not isinstance(config.get(k), dict):
            raise KeyError(f"POINTS 1.0 config.json lacks '{k}'")
    return vision_rules() + llm_rules(config["llm_config"], source_keys)
