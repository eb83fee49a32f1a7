"""POINTS-1.5 (WePOINTS POINTSV15ChatModel) in Paddle.

    pixel_values [N, C*T*p*p] --vision_encoder (Qwen2-VL NaViT, no merger)--> [N, E]
                              --vision_projector (patch merger)-----------> [N / merge^2, H] = image_embeds
    prompt ids --embed--> rows at every <|image_pad|> run replaced, in order, by image_embeds --llm--> logits

Parameter names (targets of convert/rules/points.py):
    llm.*                                           see llm.py
    vision_encoder.patch_embed.proj.weight          [E, C, T, p, p] (the Conv3d kernel, used as a matmul)
    vision_encoder.blocks.N.layer_norm1/2.{weight,bias}, .self_attn.{q,k,v,out}_proj.*, .mlp.fc1/fc2.*
    vision_projector.ln_q.{weight,bias}, vision_projector.mlp.0.*, vision_projector.mlp.2.*
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import paddle
from paddle import nn

from ...layers import LayerNorm, ViTBlock, apply_rotary, attention, vision_rope_2d
from .llm import PointsLLM, PointsLLMConfig

VISION_LN_EPS = 1e-6     # Qwen2-VL vision blocks and PatchMerger build their LayerNorms with eps=1e-6 (not in config)
SCORE_BUDGET = 1 << 26   # max attention-score elements per call in the tower (large images attend in query chunks)


@dataclass
class NaViTConfig:
    embed_dim: int = 1280
    depth: int = 32
    num_heads: int = 16
    mlp_ratio: float = 4.0
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    hidden_act: str = "quick_gelu"

    @classmethod
    def from_dict(cls, d: dict) -> "NaViTConfig":
        """Qwen2VLVisionConfig dict; missing keys take the transformers defaults (those of the real model)."""
        c = cls()
        return cls(
            embed_dim=int(d.get("embed_dim", c.embed_dim)), depth=int(d.get("depth", c.depth)),
            num_heads=int(d.get("num_heads", c.num_heads)), mlp_ratio=float(d.get("mlp_ratio", c.mlp_ratio)),
            in_channels=int(d.get("in_channels", d.get("in_chans", c.in_channels))),
            patch_size=int(d.get("patch_size", d.get("spatial_patch_size", c.patch_size))),
            temporal_patch_size=int(d.get("temporal_patch_size", c.temporal_patch_size)),
            spatial_merge_size=int(d.get("spatial_merge_size", c.spatial_merge_size)),
            hidden_act=d.get("hidden_act", c.hidden_act))

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


@dataclass
class POINTSV15Config:
    llm: PointsLLMConfig
    vision: NaViTConfig

    @classmethod
    def from_dict(cls, d: dict) -> "POINTSV15Config":
        if "llm_config" not in d or "vision_config" not in d:
            raise KeyError("POINTS-1.5 config.json needs 'llm_config' and 'vision_config'")
        cfg = cls(llm=PointsLLMConfig.from_dict(d["llm_config"]), vision=NaViTConfig.from_dict(d["vision_config"]))
        if cfg.vision.embed_dim % cfg.vision.num_heads:
            raise ValueError(f"vision embed_dim {cfg.vision.embed_dim} is not divisible by "
                             f"num_heads {cfg.vision.num_heads}")
        return cfg

    @property
    def tokens_per_merge(self) -> int:
        return self.vision.spatial_merge_size ** 2


class PatchEmbed(nn.Layer):
    """Conv3d with stride == kernel == (T, p, p) and no bias, applied to pre-flattened patches == one matmul."""

    def __init__(self, cfg: NaViTConfig):
        super().__init__()
        self.proj = nn.Layer()
        self.proj.weight = self.proj.create_parameter(
            [cfg.embed_dim, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size])
        self.embed_dim, self.patch_dim = cfg.embed_dim, cfg.patch_dim

    def forward(self, pixel_values):
        if pixel_values.ndim != 2 or pixel_values.shape[1] != self.patch_dim:
            raise ValueError(f"pixel_values must be [num_patches, {self.patch_dim}], got {list(pixel_values.shape)}")
        w = self.proj.weight.reshape([self.embed_dim, self.patch_dim])
        return paddle.matmul(pixel_values.astype(w.dtype), w, transpose_y=True)


class NaViTVisionTower(nn.Layer):
    """Qwen2-VL vision transformer without its merger (WePOINTS Qwen2VisionTransformerForNavitPOINTS).

    Attention is confined to each image (each frame of each image): the tower runs on every segment separately,
    which is the block-diagonal attention of upstream (all other ops are per patch)."""

    def __init__(self, cfg: NaViTConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.LayerList([ViTBlock(cfg.embed_dim, cfg.num_heads, cfg.mlp_hidden, cfg.hidden_act,
                                             VISION_LN_EPS) for _ in range(cfg.depth)])

    def rot_pos_emb(self, grid_thw) -> np.ndarray:
        """Per-patch rotary angles [N, head_dim / 2] (float32 numpy), positions restart for every image."""
        return vision_rope_2d(grid_thw, self.config.head_dim, self.config.spatial_merge_size)

    def forward(self, pixel_values, grid_thw, return_patch_embed: bool = False):
        grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
        n = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
        if pixel_values.shape[0] != n:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw {grid.tolist()} "
                             f"describes {n}")
        x = self.patch_embed(pixel_values)
        patch_out = x
        freqs = paddle.to_tensor(self.rot_pos_emb(grid))
        emb = paddle.concat([freqs, freqs], axis=-1)
        cos, sin = paddle.cos(emb), paddle.sin(emb)
        seg_lens = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0]).tolist()
        outs, start = [], 0
        for length in seg_lens:
            end = start + int(length)
            h = x[start:end].unsqueeze(0)
            rope = (cos[start:end].unsqueeze(0), sin[start:end].unsqueeze(0))
            for blk in self.blocks:
                h = self._block(blk, h, rope)
            outs.append(h.squeeze(0))
            start = end
        out = paddle.concat(outs, axis=0) if len(outs) > 1 else outs[0]
        return (out, patch_out) if return_patch_embed else out


    def _block(self, blk: ViTBlock, x, rope):
        """blk(x) for one image; images with many patches attend in query chunks to bound the score memory."""
        n, heads = x.shape[1], self.config.num_heads
        chunk = max(1, SCORE_BUDGET // (heads * n))
        if chunk >= n:
            return blk(x, rope=rope)
        a, hd = blk.self_attn, self.config.head_dim
        h = blk.layer_norm1(x)
        q = apply_rotary(a.q_proj(h).reshape([1, n, heads, hd]), *rope)
        k = apply_rotary(a.k_proj(h).reshape([1, n, heads, hd]), *rope)
        v = a.v_proj(h).reshape([1, n, heads, hd])
        out = paddle.concat([attention(q[:, s:s + chunk], k, v) for s in range(0, n, chunk)], axis=1)
        x = x + a.out_proj(out)
        return x + blk.mlp(blk.layer_norm2(x))


class PatchMerger(nn.Layer):
    """LayerNorm(E) -> group merge^2 consecutive patches -> Linear(4E, 4E) -> GELU(erf) -> Linear(4E, H)."""

    def __init__(self, dim: int, context_dim: int, spatial_merge_size: int = 2):
        super().__init__()
        self.hidden = context_dim * spatial_merge_size ** 2
        self.ln_q = LayerNorm(context_dim, VISION_LN_EPS)
        self.mlp = nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.GELU(approximate=False),
                                 nn.Linear(self.hidden, dim))

    def forward(self, x):
        return self.mlp(self.ln_q(x).reshape([-1, self.hidden]))


class POINTSV15ChatModel(nn.Layer):
    def __init__(self, cfg: POINTSV15Config):
        super().__init__()
        self.config = cfg
        self.llm = PointsLLM(cfg.llm)
        self.vision_encoder = NaViTVisionTower(cfg.vision)
        # upstream hard-codes context_dim=1280 (the real embed_dim); the checkpoint's width is vision embed_dim
        self.vision_projector = PatchMerger(cfg.llm.hidden_size, cfg.vision.embed_dim, cfg.vision.spatial_merge_size)

    @property
    def lm(self) -> PointsLLM:
        return self.llm

    def image_tokens(self, grid_thw) -> list[int]:
        """Number of <|image_pad|> tokens of each image (t * h * w / merge^2)."""
        grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
        return [int(t * h * w) // self.config.tokens_per_merge for t, h, w in grid.tolist()]

    def image_embeds(self, pixel_values, grid_thw):
        """Features of every image, concatenated in order: [sum(tokens), H]."""
        if not isinstance(pixel_values, paddle.Tensor):
            pixel_values = paddle.to_tensor(np.asarray(pixel_values, dtype=np.float32))
        dtype = self.vision_encoder.patch_embed.proj.weight.dtype
        feats = self.vision_encoder(pixel_values.astype(dtype), grid_thw)
        return self.vision_projector(feats)

    def inputs_embeds(self, input_ids, image_embeds=None, grid_thw=None, image_token_id: int | None = None):
        """Token embeddings with every maximal run of image_token_id overwritten, in order, by image_embeds.

        input_ids [B, L]; image_embeds rows are consumed row by row, run by run (the images of all rows,
        concatenated in that order); grid_thw gives each image's token count (checked against its run)."""
        ids_np = np.asarray(input_ids.numpy() if isinstance(input_ids, paddle.Tensor) else input_ids, dtype=np.int64)
        if ids_np.ndim == 1:
            ids_np = ids_np[None]
        embeds = self.llm.embed(paddle.to_tensor(ids_np))
        runs = [] if image_token_id is None else _image_runs(ids_np, image_token_id)
        n_img = 0 if grid_thw is None else len(np.asarray(grid_thw).reshape(-1, 3))
        if len(runs) != n_img:
            raise ValueError(f"the prompt has {len(runs)} <|image_pad|> run(s) but {n_img} image(s) were given")
        if not runs:
            return embeds
        want = self.image_tokens(grid_thw)
        for k, ((b, s, e), n) in enumerate(zip(runs, want)):
            if e - s != n:
                raise ValueError(f"image {k}: its <|image_pad|> run has {e - s} tokens, the image needs {n}")
        if image_embeds.shape[0] != sum(want):
            raise ValueError(f"image_embeds has {image_embeds.shape[0]} rows, the images need {sum(want)}")
        b_, l_, hdim = embeds.shape
        flat_pos = np.concatenate([np.arange(s, e) + b * l_ for b, s, e in runs])
        flat = paddle.scatter(embeds.reshape([b_ * l_, hdim]), paddle.to_tensor(flat_pos),
                              image_embeds.astype(embeds.dtype), overwrite=True)
        return flat.reshape([b_, l_, hdim])

    def chat(self, messages, tokenizer, image_processor, generation_config=None) -> str:
        """Upstream's model.chat(messages, tokenizer, image_processor, generation_config) (see chat_v15.py)."""
        from .chat_v15 import chat
        return chat(self, messages, tokenizer, image_processor, generation_config)

    def forward(self, input_ids, pixel_values=None, grid_thw=None, image_token_id=None, attention_mask=None):
        """Prefill logits [B, L, V] (float32)."""
        img = None if pixel_values is None else self.image_embeds(pixel_values, grid_thw)
        emb = self.inputs_embeds(input_ids, img, grid_thw, image_token_id)
        if attention_mask is not None and not isinstance(attention_mask, paddle.Tensor):
            attention_mask = paddle.to_tensor(np.asarray(attention_mask, dtype=np.int64))
        return self.llm.forward_embeds(emb, attention_mask)


def _image_runs(ids: np.ndarray, token_id: int) -> list[tuple[int, int, int]]:
    """(row, start, end) of every maximal run of token_id, row-major."""
    runs = []
    for b, row in enumerate(ids):
        hit = np.concatenate([[0], (row == token_id).astype(np.int8), [0]])
        edges = np.flatnonzero(np.diff(hit))
        runs.extend((b, int(s), int(e)) for s, e in zip(edges[0::2], edges[1::2]))
    return runs
