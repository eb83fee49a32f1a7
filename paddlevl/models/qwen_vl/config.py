"""Qwen-VL-Chat configuration, read from the upstream config.json (QWenConfig keys, nested `visual`).

Everything the model needs is derived here from the file: nothing about the checkpoint's size is a literal
elsewhere. Two structural facts are fixed by the upstream code rather than the config: the resampler always has
256 queries (a 16x16 grid) and output_dim // 128 heads."""
from __future__ import annotations

from dataclasses import dataclass

RESAMPLER_QUERIES = 256  # upstream VisionTransformer(n_queries=256) is never overridden by the config
RESAMPLER_HEAD_DIM = 128  # upstream Resampler(num_heads=output_dim // 128): the head count divides by 128
POS_EMBED_GRID = 16  # the ViT's stored positional table is 256 x width (16 x 16), resized to the patch grid
VISUAL_LN_EPS = 1e-6  # every ViT / resampler LayerNorm (upstream partial(nn.LayerNorm, eps=1e-6))


@dataclass
class QwenVisualConfig:
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float
    output_dim: int
    image_start_id: int
    n_queries: int = RESAMPLER_QUERIES

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)  # truncation, as upstream: 1664 * 4.9231 -> 8192

    @property
    def pool_heads(self) -> int:
        # upstream nn.MultiheadAttention(output_dim, output_dim // 128): heads are output_dim / pool_heads wide,
        # which is 128 only when output_dim is a multiple of 128 (192 -> one head of 192, 320 -> two of 160)
        return self.output_dim // RESAMPLER_HEAD_DIM

    @property
    def image_end_id(self) -> int:
        return self.image_start_id + 1

    @property
    def image_pad_id(self) -> int:
        return self.image_start_id + 2


@dataclass
class QwenVLConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_channels: int
    intermediate_size: int
    layer_norm_epsilon: float
    seq_length: int
    rotary_emb_base: float
    rotary_pct: float
    use_dynamic_ntk: bool
    use_logn_attn: bool
    no_bias: bool
    visual: QwenVisualConfig

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size // 2  # w1 / w2 width

    @property
    def rotary_dim(self) -> int:
        return self.kv_channels if self.rotary_pct == 1.0 else int(self.kv_channels * self.rotary_pct)


def _need(d: dict, key: str, where: str = "config.json"):
    if key not in d:
        raise ValueError(f"Qwen-VL {where} has no {key!r}")
    return d[key]


def parse_config(d: dict) -> QwenVLConfig:
    """Upstream config.json dict -> QwenVLConfig (defaults are QWenConfig's own)."""
    v = _need(d, "visual")
    visual = QwenVisualConfig(
        image_size=int(_need(v, "image_size", "config.json 'visual'")),
        patch_size=int(_need(v, "patch_size", "config.json 'visual'")),
        width=int(_need(v, "width", "config.json 'visual'")),
        layers=int(_need(v, "layers", "config.json 'visual'")),
        heads=int(_need(v, "heads", "config.json 'visual'")),
        mlp_ratio=float(_need(v, "mlp_ratio", "config.json 'visual'")),
        output_dim=int(v.get("output_dim", 512)),
        image_start_id=int(_need(v, "image_start_id", "config.json 'visual'")),
        n_queries=int(v.get("n_queries", RESAMPLER_QUERIES)),
    )
    cfg = QwenVLConfig(
        vocab_size=int(_need(d, "vocab_size")),
        hidden_size=int(_need(d, "hidden_size")),
        num_hidden_layers=int(_need(d, "num_hidden_layers")),
        num_attention_heads=int(_need(d, "num_attention_heads")),
        kv_channels=int(d.get("kv_channels", 128)),
        intermediate_size=int(_need(d, "intermediate_size")),
        layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-6)),
        seq_length=int(d.get("seq_length", 8192)),
        rotary_emb_base=float(d.get("rotary_emb_base", 10000)),
        rotary_pct=float(d.get("rotary_pct", 1.0)),
        use_dynamic_ntk=bool(d.get("use_dynamic_ntk", True)),
        use_logn_attn=bool(d.get("use_logn_attn", True)),
        no_bias=bool(d.get("no_bias", True)),
        visual=visual,
    )
    _check(cfg)
    return cfg


def _check(cfg: QwenVLConfig) -> None:
    v = cfg.visual
    problems = []
    if cfg.kv_channels * cfg.num_attention_heads != cfg.hidden_size:
        problems.append(f"kv_channels * num_attention_heads ({cfg.kv_channels} * {cfg.num_attention_heads}) "
                        f"!= hidden_size ({cfg.hidden_size}); the upstream attention splits c_attn by hidden_size")
    if v.output_dim != cfg.hidden_size:
        problems.append(f"visual.output_dim ({v.output_dim}) != hidden_size ({cfg.hidden_size})")
    # image_size need not be a multiple of patch_size: the stride-p conv drops the remainder (grid = S // p).
    if v.grid < 1:
        problems.append(f"visual.image_size {v.image_size} is smaller than patch_size {v.patch_size}")
    if v.width % v.heads:
        problems.append(f"visual.width {v.width} is not divisible by visual.heads {v.heads}")
    if v.pool_heads < 1 or v.output_dim % v.pool_heads:
        problems.append(f"visual.output_dim {v.output_dim}: the resampler has output_dim // {RESAMPLER_HEAD_DIM} = "
                        f"{v.pool_heads} heads, which must be >= 1 and divide output_dim")
    q = int(round(v.n_queries ** 0.5))
    if q * q != v.n_queries:
        problems.append(f"resampler queries {v.n_queries} is not a square")
    if problems:
        raise ValueError("unsupported Qwen-VL config: " + "; ".join(problems))
