"""Configuration of InternLM-XComposer-2.5 (`InternLMXComposer2ForCausalLM`, model_type "internlm2").

The LLM sizes come from the release config.json. The CLIP tower's config is NOT in it: upstream builds the tower
from the hub repo `internlm/internlm-xcomposer2d5-clip` by name; a local copy lives in the sub-folder
`internlm-xcomposer2d5-clip/config.json` next to the weights (the fixtures have it; the converter copies it).
Where it is looked for, in order:
  1. `config["vision_config"]` (a dict, e.g. injected by a caller),
  2. `<folder>/internlm-xcomposer2d5-clip/config.json` with folder = the `folder` argument (the checkpoint /
     converted folder), the config's `_name_or_path` (HF: "the folder this config was read from"), or the
     upstream folder a converted config records in its "paddlevl" tag,
  3. the published internlm-xcomposer2d5-clip values (CLIP ViT-L/14 at 560), with a warning.
A tower that does not fit the weights then fails the strict shape check at load time, naming the tensor.

Constants of the upstream code (not in any config): Partial-LoRA rank 256 / alpha 256 on wqkv, wo, w1, w2, w3;
the separator vectors glb_GN / sub_GN and the projector input are 4 x CLIP width (the 2x2 merge);
projector = Linear(4C, H) -> GELU -> Linear(H, H); the HD tile side is the CLIP image size (560).
They can be overridden by optional config keys `plora_rank`, `plora_alpha`.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

from ...layers.vit import CLIPVisionConfig

CLIP_SUBDIR = "internlm-xcomposer2d5-clip"

# internlm/internlm-xcomposer2d5-clip (CLIP ViT-L/14 with a 560-pixel position table)
RELEASE_CLIP = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                    image_size=560, patch_size=14, layer_norm_eps=1e-5, hidden_act="quick_gelu", num_channels=3)


def find_clip_config(config: dict, folder: Optional[str] = None) -> tuple:
    """(vision config dict, where it came from)."""
    if isinstance(config.get("vision_config"), dict):
        return config["vision_config"], "config.json vision_config"
    tag_source = ((config.get("paddlevl") or {}).get("source") or {}).get("folder")
    for base in (folder, config.get("_name_or_path"), tag_source):
        if not base:
            continue
        path = os.path.join(os.fspath(base), CLIP_SUBDIR, "config.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                try:
                    return json.load(f), path
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} is not valid JSON: {e}") from e
    warnings.warn(f"no {CLIP_SUBDIR}/config.json found next to the weights: using the published "
                  f"internlm-xcomposer2d5-clip tower (CLIP ViT-L/14, 560 px)", stacklevel=3)
    return dict(RELEASE_CLIP), "built-in internlm-xcomposer2d5-clip values"


@dataclass
class IXCConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rms_eps: float
    rope_theta: float
    max_position_embeddings: int
    vision: CLIPVisionConfig
    rope_scaling_type: Optional[str] = None     # None | "dynamic" | "linear"
    rope_scaling_factor: float = 1.0
    bias: bool = False                          # wqkv / wo bias (config "bias"); the MLP never has one
    tie_word_embeddings: bool = False           # True: the head reads tok_embeddings (HF ties output.weight to it)
    plora_rank: int = 256
    plora_alpha: int = 256
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 2
    vision_source: str = ""
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def qkv_size(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def vision_merged_size(self) -> int:
        """Width of a merged 2x2 patch token (and of glb_GN / sub_GN, and the projector's input)."""
        return 4 * self.vision.hidden_size

    @property
    def tile_size(self) -> int:
        return self.vision.image_size

    @property
    def merged_grid(self) -> int:
        """Merged tokens per tile side (20 for 560 / 14 / 2)."""
        return self.vision.image_size // self.vision.patch_size // 2

    @classmethod
    def from_dict(cls, d: dict, folder: Optional[str] = None) -> "IXCConfig":
        def need(key):
            if d.get(key) is None:
                raise KeyError(f"InternLM-XComposer-2.5 config.json lacks {key!r}")
            return d[key]

        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        kv = int(d.get("num_key_value_heads") or heads)
        if hidden % heads:
            raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        if heads % kv:
            raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise NotImplementedError(f"hidden_act {act!r}: InternLM2 uses silu")
        scaling = d.get("rope_scaling") or None
        stype, sfactor = None, 1.0
        if scaling:
            stype = scaling.get("type") or scaling.get("rope_type")
            if stype not in ("dynamic", "linear"):
                raise NotImplementedError(f"rope_scaling {scaling!r}: InternLM2 supports 'dynamic' and 'linear'")
            sfactor = float(scaling["factor"])
        vdict, vsource = find_clip_config(d, folder)
        vision = CLIPVisionConfig.from_dict(vdict)
        if vision.image_size % vision.patch_size or (vision.image_size // vision.patch_size) % 2:
            raise ValueError(f"CLIP tower {vision.image_size}/{vision.patch_size}: the 2x2 merge needs an even "
                             f"patch grid")
        if vision.hidden_act not in ("quick_gelu", "gelu"):
            raise NotImplementedError(f"CLIP hidden_act {vision.hidden_act!r}")
        return cls(
            vocab_size=int(need("vocab_size")), hidden_size=hidden, num_layers=int(need("num_hidden_layers")),
            num_heads=heads, num_kv_heads=kv, intermediate_size=int(need("intermediate_size")),
            rms_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(d.get("rope_theta", 10000)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)), vision=vision,
            rope_scaling_type=stype, rope_scaling_factor=sfactor, bias=bool(d.get("bias", True)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            plora_rank=int(d.get("plora_rank", 256)), plora_alpha=int(d.get("plora_alpha", 256)),
            bos_token_id=int(d.get("bos_token_id", 1)),
            eos_token_id=int(d.get("eos_token_id", 2)), pad_token_id=int(d.get("pad_token_id", 2)),
            vision_source=vsource, raw=dict(d))
