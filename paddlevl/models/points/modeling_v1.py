"""POINTS 1.0 (WePOINTS/POINTS-Qwen-2-5-7B-Chat): two CLIP towers + pixel shuffle + shared projector + POINTS LLM.

    crops [n, 3, S, S] -> general_vit / ocr_vit (HF CLIPVisionModel), hidden_states[-2] (input of the last block),
    CLS dropped -> [n, g, g, Cv] (g = S / patch) -> 2x2 pixel shuffle -> [n, (g/2)^2, 4 Cv]
    -> vision_projector (Linear 4Cv->H, GELU erf, Linear H->H), shared by both towers
    -> image features = 0.5 * proj(general) + 0.5 * proj(ocr)            [n, (g/2)^2, H]
    -> written, crop after crop, into the rows of the <|image_pad|> runs of embed(input_ids) -> LLM.

Parameter names (what the converter writes):
    general_vit.*, ocr_vit.*      = HF CLIPVisionModel `vision_model.*` (paddlevl.layers.vit.CLIPVisionTower)
    vision_projector.0.{weight,bias} [4Cv, H], vision_projector.2.{weight,bias} [H, H]   (paddle [in, out])
    llm.*                         = paddlevl.models.points.llm.PointsLLM
The last CLIP block and post_layernorm are loaded (the checkpoint is kept whole) but never run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import paddle
from paddle import nn

from ...layers import CLIPVisionConfig, CLIPVisionTower
from .llm import PointsLLM, PointsLLMConfig

FEATURE_LAYER = -2  # upstream reads hidden_states[-2]
SHUFFLE = 2         # pixel shuffle scale 0.5 -> 2x2 patches per token
# transformers CLIPVisionConfig's class defaults: what upstream uses for a key vision_config leaves out
CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                            num_channels=3)


@dataclass
class PointsV1Config:
    vision: CLIPVisionConfig
    llm: PointsLLMConfig

    @classmethod
    def from_dict(cls, d: dict) -> "PointsV1Config":
        for key in ("vision_config", "llm_config"):
            if not isinstance(d.get(key), dict):
                raise KeyError(f"config.json of POINTS 1.0 lacks the {key!r} section")
        given = {k: v for k, v in d["vision_config"].items() if v is not None}
        vision = CLIPVisionConfig.from_dict({**CLIP_VISION_DEFAULTS, **given})
        cfg = cls(vision=vision, llm=PointsLLMConfig.from_dict(d["llm_config"]))
        g = cfg.grid
        if vision.image_size % vision.patch_size or g % SHUFFLE:
            raise ValueError(f"vision_config image_size {vision.image_size} / patch_size {vision.patch_size} must "
                             f"give an even patch grid for the 2x2 pixel shuffle (got {vision.image_size / vision.patch_size})")
        if vision.num_hidden_layers < 1:
            raise ValueError("vision_config.num_hidden_layers must be >= 1 (features come from hidden_states[-2])")
        return cfg

    @property
    def grid(self) -> int:
        return self.vision.image_size // self.vision.patch_size

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def tokens_per_crop(self) -> int:
        return (self.grid // SHUFFLE) ** 2


def pixel_shuffle(x, scale: int = SHUFFLE):
    """[n, R, C, D] (patch rows, cols) -> [n, (R/s)*(C/s), s*s*D]; token (r, c) = concat over (dr, dc) row-major of
    x[s*r + dr, s*c + dc] (InternVL pixel_shuffle(0.5) followed by the flatten upstream does)."""
    n, r, c, d = x.shape
    x = x.reshape([n, r // scale, scale, c // scale, scale, d]).transpose([0, 1, 3, 2, 4, 5])
    return x.reshape([n, (r // scale) * (c // scale), scale * scale * d])


class PointsV1ChatModel(nn.Layer):
    def __init__(self, cfg: PointsV1Config):
        super().__init__()
        self.config = cfg
        self.general_vit = CLIPVisionTower(cfg.vision)
        self.ocr_vit = CLIPVisionTower(cfg.vision)
        cv, h = cfg.vision.hidden_size, cfg.llm.hidden_size
        self.vision_projector = nn.Sequential(nn.Linear(cv * SHUFFLE * SHUFFLE, h), nn.GELU(), nn.Linear(h, h))
        self.llm = PointsLLM(cfg.llm)

    # ---------------------------------------------------------------------------------------------- vision
    def vit_penultimate(self, pixel_values, tower: str):
        """hidden_states[-2] of one tower (CLS included) [n, 1 + g*g, Cv]."""
        vit = getattr(self, tower)
        x = vit.pre_layrnorm(vit.embeddings(pixel_values))
        n_run = len(vit.encoder.layers) + 1 + FEATURE_LAYER  # blocks whose output is hidden_states[-2]
        for layer in vit.encoder.layers[:n_run]:
            x = layer(x)
        return x

    def project(self, penultimate):
        """[n, 1 + g*g, Cv] -> projected crop tokens [n, (g/2)^2, H]."""
        g = self.config.grid
        x = penultimate[:, 1:].reshape([penultimate.shape[0], g, g, penultimate.shape[-1]])
        return self.vision_projector(pixel_shuffle(x))

    def image_features(self, pixel_values, return_parts: bool = False):
        """Crops [n, 3, S, S] -> [n, tokens_per_crop, H]; with return_parts also each tower's pieces."""
        s = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (self.config.vision.num_channels, s, s):
            raise ValueError(f"pixel_values must be [n, {self.config.vision.num_channels}, {s}, {s}], "
                             f"got {list(pixel_values.shape)}")
        dtype = self.vision_projector[0].weight.dtype
        pixel_values = pixel_values.astype(dtype)
        parts = {}
        for tower in ("general_vit", "ocr_vit"):
            pen = self.vit_penultimate(pixel_values, tower)
            parts[f"{tower}_penultimate"] = pen
            parts[f"{tower}_embeds"] = self.project(pen)
        feats = 0.5 * parts["general_vit_embeds"] + 0.5 * parts["ocr_vit_embeds"]
        return (feats, parts) if return_parts else feats

    # ---------------------------------------------------------------------------------------------- merge
    def merge(self, input_ids, image_features, image_token_id: int):
        """embed(input_ids) with the <|image_pad|> rows overwritten by the crop features, in order.

        input_ids [B, L]; image_features: [n, T, H] for B == 1, or a list with one [n_b, T, H] per row. Every run
        of image tokens must hold a whole number of crops (upstream: a run of T*k rows takes the next k crops)."""
        embeds = self.llm.embed(input_ids)
        b, l, h = embeds.shape
        if not isinstance(image_features, (list, tuple)):
            image_features = [image_features] if b == 1 else list(image_features)
        if len(image_features) != b:
            raise ValueError(f"{len(image_features)} image feature sets for a batch of {b}")
        t = self.config.tokens_per_crop
        ids = input_ids.numpy()
        flat_idx, rows = [], []
        for i in range(b):
            m = ids[i] == image_token_id
            feats = image_features[i]
            n = 0 if feats is None else int(feats.shape[0])
            edges = np.flatnonzero(np.diff(np.concatenate([[0], m.astype(np.int8), [0]])))
            for start, end in zip(edges[0::2], edges[1::2]):
                if (end - start) % t:
                    raise ValueError(f"row {i}: a run of {end - start} image tokens at {start} is not a multiple of "
                                     f"{t} tokens per crop")
            if int(m.sum()) != n * t:
                raise ValueError(f"row {i}: {int(m.sum())} image tokens but {n} crops x {t} tokens")
            if n:
                flat_idx.append(np.flatnonzero(m) + i * l)
                rows.append(feats.reshape([n * t, h]).astype(embeds.dtype))
        if not rows:
            return embeds
        idx = paddle.to_tensor(np.concatenate(flat_idx).astype(np.int64))
        out = paddle.scatter(embeds.reshape([b * l, h]), idx, paddle.concat(rows, axis=0), overwrite=True)
        return out.reshape([b, l, h])

    def forward(self, input_ids, pixel_values, image_token_id: int, attention_mask=None):
        """Prefill logits [B, L, V] float32 (B == 1 when pixel_values is one tensor)."""
        embeds = self.merge(input_ids, self.image_features(pixel_values), image_token_id)
        return self.llm.forward_embeds(embeds, attention_mask)

    def chat(self, image, prompt: str, tokenizer, image_processor, catty: bool = True, generation_config=None,
             max_splits: int = 8) -> str:
        """Upstream's `POINTSChatModel.chat(pixel_values, prompt, tokenizer, image_processor, catty,
        generation_config, max_splits)`: one image (PIL image or path) and one prompt -> the response."""
        from .chat_v1 import chat
        return chat(self, image, prompt, tokenizer, image_processor, catty=catty,
                    generation_config=generation_config, max_splits=max_splits)
