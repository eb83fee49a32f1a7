"""Pre-LN vision transformer blocks and the CLIP vision tower.

One block serves every tower (CLIP ViT-L, Qwen-VL ViT-bigG, Qwen2-VL NaViT): parameter names follow HF CLIP
(layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1/fc2); the converter tables rename the others."""
from __future__ import annotations

from dataclasses import dataclass

import paddle
from paddle import nn

from .attention import VisionAttention
from .mlp import GeluMLP
from .norm import LayerNorm


class ViTBlock(nn.Layer):
    """x + attn(ln1(x)); x + mlp(ln2(x))."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, act: str, eps: float):
        super().__init__()
        self.layer_norm1 = LayerNorm(dim, eps)
        self.self_attn = VisionAttention(dim, heads)
        self.layer_norm2 = LayerNorm(dim, eps)
        self.mlp = GeluMLP(dim, mlp_hidden, act=act)

    def forward(self, x, keep_mask=None, rope=None):
        x = x + self.self_attn(self.layer_norm1(x), keep_mask=keep_mask, rope=rope)
        return x + self.mlp(self.layer_norm2(x))


@dataclass
class CLIPVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    image_size: int
    patch_size: int
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    num_channels: int = 3

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPVisionConfig":
        d = d.get("vision_config", d)
        return cls(hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                   num_attention_heads=d["num_attention_heads"], num_hidden_layers=d["num_hidden_layers"],
                   image_size=d["image_size"], patch_size=d["patch_size"],
                   layer_norm_eps=d.get("layer_norm_eps", 1e-5), hidden_act=d.get("hidden_act", "quick_gelu"),
                   num_channels=d.get("num_channels", 3))


class CLIPEmbeddings(nn.Layer):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        c = cfg.hidden_size
        self.patch_size = cfg.patch_size
        self.class_embedding = self.create_parameter([c])
        self.patch_embedding = nn.Conv2D(cfg.num_channels, c, cfg.patch_size, stride=cfg.patch_size,
                                         bias_attr=False)
        n = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(n, c)

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values.astype(self.patch_embedding.weight.dtype))  # [B, C, g, g]
        x = x.flatten(2).transpose([0, 2, 1])  # [B, g*g, C]
        cls = self.class_embedding.reshape([1, 1, -1]).expand([x.shape[0], 1, x.shape[2]])
        x = paddle.concat([cls, x], axis=1)
        if x.shape[1] != self.position_embedding.weight.shape[0]:
            raise ValueError(f"CLIP tower expects {self.position_embedding.weight.shape[0] - 1} patches, "
                             f"got {x.shape[1] - 1} (image side {pixel_values.shape[-1]})")
        return x + self.position_embedding.weight.unsqueeze(0)


class CLIPEncoder(nn.Layer):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.layers = nn.LayerList([
            ViTBlock(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act,
                     cfg.layer_norm_eps) for _ in range(cfg.num_hidden_layers)])


class CLIPVisionTower(nn.Layer):
    """HF CLIPVisionModel's vision_model. forward() returns every hidden state like HF's `hidden_states`:
    [pre_layrnorm(embeddings), after layer 1, ..., after layer N] (so [-2] is the penultimate layer)."""

    def __init__(self, cfg: CLIPVisionConfig, num_layers: int | None = None):
        super().__init__()
        if num_layers is not None:  # a tower that is only ever read at an earlier layer may be built shorter
            cfg = CLIPVisionConfig(**{**cfg.__dict__, "num_hidden_layers": num_layers})
        self.config = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, pixel_values):
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        return states
