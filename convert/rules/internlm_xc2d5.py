"""Converter table for InternLM-XComposer-2.5 (internlm/internlm-xcomposer2d5-7b, architectures
["InternLMXComposer2ForCausalLM"], model_type "internlm2", pytorch_model-0000k-of-0000n.bin shards).

Source (release key names, torch layouts)                     -> target (paddlevl.models.internlm_xc2d5.modeling)
  model.tok_embeddings.weight, model.norm.weight               -> same names, kept
  model.layers.N.{attention_norm,ffn_norm}.weight              -> same names, kept
  model.layers.N.attention.wqkv.weight  [(nh+2kv)*d, H]        -> same name, transposed; the fused rows stay
                                                                  grouped per kv head [q.. (g), k, v] and the model
                                                                  reads them that way
  model.layers.N.attention.wo / feed_forward.w1,w2,w3 .weight  -> same names, transposed
  <any of the five>.bias (config bias: true only)              -> same name, kept
  <any of the five>.Plora_A.weight / Plora_B.weight            -> same names, transposed (Partial-LoRA, image slots)
  <any of the five>.lora_{sft,dpo,web}_{A,B}.weight            -> dropped: extra LoRA sets that only
                                                                  write_artical (infer_mode 'write': sft + dpo) and
                                                                  write_webpage ('web') add on every token; chat
                                                                  (infer_mode 'base') never uses them
  output.weight [V, H]                                         -> same name, transposed (untied head); with
                                                                  tie_word_embeddings true it is dropped (HF ties it
                                                                  to tok_embeddings; safetensors saves omit it)
  plora_glb_GN [1,1,4C], plora_sub_GN [1,1,1,4C]               -> same names, kept
  vision_proj.{0,2}.weight / .bias                             -> same names, weight transposed
  vit.vision_tower.vision_model.<HF CLIP key>                  -> same names (q/k/v/out_proj, fc1, fc2 weights
                                                                  transposed; conv, embeddings, norms kept)
  ...embeddings.position_ids, rotary_emb.{inv_freq,cos_cached,sin_cached}  -> dropped (buffers, recomputed) if an
                                                                  older checkpoint carries them
Nothing here depends on sizes: every op is a keep/transpose/drop, the shapes are checked against the model built
from config.json (+ the CLIP config) by the engine.
"""
from __future__ import annotations

from convert.ops import Rule, drop, keep, transpose

L = r"model\.layers\.(\d+)"
PLORA = r"(attention\.wqkv|attention\.wo|feed_forward\.w1|feed_forward\.w2|feed_forward\.w3)"
CLIP = r"vit\.vision_tower\.vision_model"
CLIP_LINEAR = r"(self_attn\.(?:q|k|v|out)_proj|mlp\.fc1|mlp\.fc2)"


def rules(config: dict, source_keys=()) -> list:
    t = "model.layers.{1}"
    c = "vit.vision_tower.vision_model"
    return [
        # ---- language model
        Rule(r"model\.tok_embeddings\.weight", "model.tok_embeddings.weight", keep()),
        Rule(r"model\.norm\.weight", "model.norm.weight", keep()),
        Rule(L + r"\.(attention_norm|ffn_norm)\.weight", t + ".{2}.weight", keep()),
        Rule(L + r"\." + PLORA + r"\.weight", t + ".{2}.weight", transpose()),
        Rule(L + r"\." + PLORA + r"\.bias", t + ".{2}.bias", keep()),
        Rule(L + r"\." + PLORA + r"\.(Plora_A|Plora_B)\.weight", t + ".{2}.{3}.weight", transpose()),
        Rule(L + r"\." + PLORA + r"\.lora_(sft|dpo)_(A|B)\.weight", (),
             drop("lora_sft/lora_dpo: only write_artical (infer_mode='write') adds them, on every token; "
                  "chat uses infer_mode='base'")),
        Rule(L + r"\." + PLORA + r"\.lora_web_(A|B)\.weight", (),
             drop("lora_web: only write_webpage (infer_mode='web') adds it, on every token; "
                  "chat uses infer_mode='base'")),
        Rule(L + r"\.attention\.rotary_emb\.(inv_freq|cos_cached|sin_cached)", (),
             drop("rotary buffer, recomputed from rope_theta")),
        Rule(r"output\.weight", (), drop("output head tied to tok_embeddings (tie_word_embeddings)"))
        if config.get("tie_word_embeddings", False) else Rule(r"output\.weight", "output.weight", transpose()),
        # ---- vision: HD separators, projector, CLIP tower
        Rule(r"plora_(glb|sub)_GN", "plora_{1}_GN", keep()),
        Rule(r"vision_proj\.(0|2)\.weight", "vision_proj.{1}.weight", transpose()),
        Rule(r"vision_proj\.(0|2)\.bias", "vision_proj.{1}.bias", keep()),
        Rule(CLIP + r"\.embeddings\.(class_embedding|patch_embedding\.weight|position_embedding\.weight)",
             c + ".embeddings.{1}", keep()),
        Rule(CLIP + r"\.embeddings\.position_ids", (), drop("non-persistent CLIP buffer (arange), recomputed")),
        Rule(CLIP + r"\.(pre_layrnorm|post_layernorm)\.(weight|bias)", c + ".{1}.{2}", keep()),
        Rule(CLIP + r"\.encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2)\.(weight|bias)",
             c + ".encoder.layers.{1}.{2}.{3}", keep()),
        Rule(CLIP + r"\.encoder\.layers\.(\d+)\." + CLIP_LINEAR + r"\.weight",
             c + ".encoder.layers.{1}.{2}.weight", transpose()),
        Rule(CLIP + r"\.encoder\.layers\.(\d+)\." + CLIP_LINEAR + r"\.bias",
             c + ".encoder.layers.{1}.{2}.bias", keep()),
    ]
