"""Qwen-VL-Chat in Paddle: the QWen LLM, the ViT-bigG-style visual encoder and the 256-query resampler.

Parameter names (Paddle Linear weights are [in, out]; the converter transposes torch's [out, in]):

    transformer.wte.weight                                   [V, H]
    transformer.h.N.ln_1.weight / ln_2.weight                [H]
    transformer.h.N.attn.c_attn.{weight [H, 3H], bias [3H]}  fused [Q | K | V], heads contiguous in each block
    transformer.h.N.attn.c_proj.weight                       [H, H]
    transformer.h.N.mlp.{gate_proj (upstream w2), up_proj (w1)}.weight [H, F], mlp.down_proj (c_proj) [F, H]
    transformer.ln_f.weight                                  [H]
    transformer.visual.conv1.weight                          [width, 3, p, p]
    transformer.visual.positional_embedding                  [256, width] (16 x 16 table, resized to the grid)
    transformer.visual.ln_pre / ln_post                      LayerNorm eps 1e-6
    transformer.visual.transformer.resblocks.N.*             shared ViTBlock (in_proj split per head into q/k/v)
    transformer.visual.attn_pool.{pos_embed [256, H], query [256, H], kv_proj.weight [width, H] (absent when
        width == H), attn.{q,k,v,out}_proj, ln_q, ln_kv}
    transformer.visual.proj                                  [H, H] (used as x @ proj)
    lm_head.weight                                           [H, V]

LLM math (upstream modeling_qwen.py): positions are 0.. from the cache length (position_ids and the mask cumsum are
ignored); RoPE over `rotary_dim` dims in float32; dynamic NTK picks alpha from the prefill length and the decode
steps reuse it (kept in cache.state); logN multiplies queries at 1-based positions > seq_length by
log(p) / log(seq_length); scores / sqrt(kv_channels), softmax, c_proj.
"""
from __future__ import annotations

import math

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from ...layers import (KVCache, LayerNorm, RMSNorm, SwiGLU, ViTBlock, VisionAttention, apply_rotary, decoder_inputs,
                       logn_scale, ntk_scaled_base, qwen_ntk_alpha, rope_cos_sin, rope_inv_freq)
from .config import POS_EMBED_GRID, VISUAL_LN_EPS, QwenVLConfig, QwenVisualConfig

NTK_STATE = "qwen_vl_ntk_alpha"


# ---- bicubic resize of the stored positional tables ---------------------------------------------------------
def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2 of fractional position t (float32)."""
    a = np.float32(a)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    one = np.float32(1)
    return np.stack([far(t + one), near(t), near(one - t), far(2 * one - t)], axis=-1)


def bicubic_matrix(src: int, dst: int) -> np.ndarray:
    """[dst, src] float32 matrix M with out = M @ in along one axis, equal to torch F.interpolate(mode="bicubic",
    align_corners=False) without antialias: source index (i + 0.5) * src / dst - 0.5 (not clamped), taps
    floor - 1 .. floor + 2 clamped to the border."""
    scale = np.float32(src) / np.float32(dst)
    real = scale * (np.arange(dst, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    base = np.floor(real)
    w = _cubic_weights((real - base).astype(np.float32))
    m = np.zeros((dst, src), dtype=np.float32)
    for k in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + k, 0, src - 1)
        np.add.at(m, (np.arange(dst), idx), w[:, k])
    return m


def resize_pos_table(table, grid: int):
    """[n*n, C] table (row-major n x n grid) -> [grid*grid, C] by 2-D bicubic resize in float32 (n == grid: as is)."""
    n = int(round(math.sqrt(table.shape[0])))
    if n * n != table.shape[0]:
        raise ValueError(f"positional table of {table.shape[0]} rows is not a square grid")
    if n == grid:
        return table
    c = table.shape[1]
    m = paddle.to_tensor(bicubic_matrix(n, grid))  # [g, n]
    t = table.astype("float32").reshape([n, n, c])
    t = paddle.matmul(m, t.reshape([n, n * c])).reshape([grid, n, c])  # rows
    t = paddle.matmul(m.unsqueeze(0).expand([grid, grid, n]), t)  # columns, per output row
    return t.reshape([grid * grid, c]).astype(table.dtype)


# ---- visual encoder ------------------------------------------------------------------------------------------
class VisualTransformer(nn.Layer):
    def __init__(self, cfg: QwenVisualConfig):
        super().__init__()
        self.resblocks = nn.LayerList([ViTBlock(cfg.width, cfg.heads, cfg.mlp_width, "gelu", VISUAL_LN_EPS)
                                       for _ in range(cfg.layers)])

    def forward(self, x):
        for blk in self.resblocks:
            x = blk(x)
        return x


class Resampler(nn.Layer):
    """One cross-attention from 256 learned queries (+ the stored 2-D sin-cos table) to the ViT tokens."""

    def __init__(self, cfg: QwenVisualConfig):
        super().__init__()
        h = cfg.output_dim
        self.pos_embed = self.create_parameter([cfg.n_queries, h])
        self.query = self.create_parameter([cfg.n_queries, h])
        self.kv_proj = nn.Linear(cfg.width, h, bias_attr=False) if cfg.width != h else None
        self.attn = VisionAttention(h, cfg.pool_heads)
        self.ln_q = LayerNorm(h, VISUAL_LN_EPS)
        self.ln_kv = LayerNorm(h, VISUAL_LN_EPS)
        self.grid = cfg.grid

    def forward(self, x):  # x [N, grid*grid, width]
        pos = resize_pos_table(self.pos_embed, self.grid)  # keys' positions, resized 16 -> grid
        kv = self.ln_kv(self.kv_proj(x) if self.kv_proj is not None else x)
        q = (self.ln_q(self.query) + self.pos_embed).unsqueeze(0)  # queries' positions: the 16 x 16 table
        q = q.expand([x.shape[0], q.shape[1], q.shape[2]])
        return self.attn(q, key=kv + pos.unsqueeze(0), value=kv)


class VisionTransformer(nn.Layer):
    def __init__(self, cfg: QwenVisualConfig):
        super().__init__()
        self.config = cfg
        self.conv1 = nn.Conv2D(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias_attr=False)
        self.positional_embedding = self.create_parameter([POS_EMBED_GRID * POS_EMBED_GRID, cfg.width])
        self.ln_pre = LayerNorm(cfg.width, VISUAL_LN_EPS)
        self.transformer = VisualTransformer(cfg)
        self.attn_pool = Resampler(cfg)
        self.ln_post = LayerNorm(cfg.output_dim, VISUAL_LN_EPS)
        self.proj = self.create_parameter([cfg.output_dim, cfg.output_dim])

    def features(self, pixel_values):
        """ViT output after the last block: [N, grid*grid, width]."""
        size = self.config.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[2:]) != (size, size):
            raise ValueError(f"pixel_values must be [N, 3, {size}, {size}], got {list(pixel_values.shape)}")
        x = self.conv1(pixel_values.astype(self.conv1.weight.dtype))  # [N, width, g, g]
        x = x.flatten(2).transpose([0, 2, 1])
        x = x + resize_pos_table(self.positional_embedding, self.config.grid).unsqueeze(0)
        return self.transformer(self.ln_pre(x))

    def pool(self, features):
        """Resampler + ln_post + proj: [N, 256, H]."""
        return paddle.matmul(self.ln_post(self.attn_pool(features)), self.proj)

    def forward(self, pixel_values):
        return self.pool(self.features(pixel_values))


# ---- language model --------------------------------------------------------------------------------------------
def additive_mask(attention_mask, query_len: int, dtype: str = "float32"):
    """Upstream's mask: finfo(dtype).min on padded keys ([B, 1, 1, S]) plus, when more than one query, finfo.min on
    future keys ([1, 1, L, S]); both together give -inf. So a left-padding query row (all keys masked) attends
    uniformly to every key that is masked only once, exactly as upstream (real rows are unaffected by the choice)."""
    s = attention_mask.shape[1]
    neg = paddle.full([], float(paddle.finfo(dtype).min), dtype=dtype)
    zero = paddle.zeros([], dtype=dtype)
    mask = paddle.where(attention_mask.unsqueeze(1).unsqueeze(1) == 0, neg, zero)  # [B, 1, 1, S]
    if query_len > 1:
        q_pos = paddle.arange(s - query_len, s, dtype="int64").unsqueeze(1)
        k_pos = paddle.arange(0, s, dtype="int64").unsqueeze(0)
        mask = mask + paddle.where(k_pos > q_pos, neg, zero).unsqueeze(0).unsqueeze(0)
    return mask


def qwen_attention(q, k, v, mask, head_dim: int):
    """softmax(q k^T / sqrt(d) + mask) v as upstream computes it (division after the matmul, activation dtype).
    q [B, L, H, D], k/v [B, S, H, D] -> [B, L, H * D]."""
    b, l, h, d = q.shape
    qt, kt, vt = (t.transpose([0, 2, 1, 3]) for t in (q, k, v))
    scores = paddle.matmul(qt, kt, transpose_y=True) / paddle.full([], math.sqrt(head_dim), dtype=q.dtype)
    if mask is not None:
        scores = scores + mask.astype(scores.dtype)
    probs = F.softmax(scores, axis=-1).astype(v.dtype)
    return paddle.matmul(probs, vt).transpose([0, 2, 1, 3]).reshape([b, l, h * d])


class QWenAttention(nn.Layer):
    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        self.heads, self.head_dim, self.hidden = cfg.num_attention_heads, cfg.kv_channels, cfg.hidden_size
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.c_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias_attr=False if cfg.no_bias else None)

    def forward(self, x, rope, logn, mask, cache, layer_idx):
        b, l, _ = x.shape
        qkv = self.c_attn(x)
        q, k, v = (t.reshape([b, l, self.heads, self.head_dim]) for t in paddle.split(qkv, 3, axis=-1))
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        if logn is not None:
            q = q * logn.astype(q.dtype)
        return self.c_proj(qwen_attention(q, k, v, mask, self.head_dim))


class QWenBlock(nn.Layer):
    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.attn = QWenAttention(cfg)
        self.ln_2 = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.ffn_size, bias=not cfg.no_bias)  # gate = w2, up = w1

    def forward(self, x, rope, logn, mask, cache, layer_idx):
        h = x + self.attn(self.ln_1(x), rope, logn, mask, cache, layer_idx)
        return h + self.mlp(self.ln_2(h))


class QWenModel(nn.Layer):
    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.h = nn.LayerList([QWenBlock(cfg) for _ in range(cfg.num_hidden_layers)])
        self.ln_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.visual = VisionTransformer(cfg.visual)


class QwenVLForCausalLM(nn.Layer):
    """Qwen-VL-Chat. Implements the decoder protocol of DESIGN.md (embed / forward_embeds / new_cache) plus
    image encoding and splicing of image features into the 256 slots of each <img>..</img> span."""

    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        self.config = cfg
        self.transformer = QWenModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias_attr=False)

    # ---- images ----------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values):
        """[N, 3, S, S] -> image features [N, 256, H]."""
        return self.transformer.visual(pixel_values)

    def embed_with_images(self, input_ids, image_embeds=None, image_spans=None):
        """Word embeddings with image_embeds[k] written at rows a+1 .. b-1 of span k = (row, a, b)."""
        embeds = self.embed(input_ids)
        spans = np.zeros((0, 3), np.int64) if image_spans is None else np.asarray(image_spans, np.int64).reshape(-1, 3)
        if len(spans) == 0:
            return embeds
        if image_embeds is None or image_embeds.shape[0] != len(spans):
            got = None if image_embeds is None else image_embeds.shape[0]
            raise ValueError(f"{len(spans)} image spans in the ids but {got} image feature sets")
        b, l, h = embeds.shape
        n = image_embeds.shape[1]
        index = []
        for row, a, e in spans.tolist():
            if e - a - 1 != n:
                raise ValueError(f"image span {a}..{e} of row {row} holds {e - a - 1} slots, the resampler gives {n}")
            index.extend(range(row * l + a + 1, row * l + e))
        flat = paddle.scatter(embeds.reshape([b * l, h]), paddle.to_tensor(np.asarray(index, np.int64)),
                              image_embeds.astype(embeds.dtype).reshape([-1, h]), overwrite=True)
        return flat.reshape([b, l, h])

    # ---- decoder protocol -------------------------------------------------------------------------------------
    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)

    def embed(self, input_ids):
        return self.transformer.wte(input_ids)

    def ntk_alpha(self, prefill_len: int) -> float:
        cfg = self.config
        return float(qwen_ntk_alpha(prefill_len, cfg.seq_length)) if cfg.use_dynamic_ntk else 1.0

    def forward_embeds(self, inputs_embeds, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                       last_only: bool = False, **_):
        """Logits [B, L, V] float32 ([B, 1, V] with last_only). position_ids are ignored, as upstream does."""
        h = self.hidden_states(inputs_embeds, attention_mask, cache)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h).astype("float32")

    def hidden_states(self, inputs_embeds, attention_mask=None, cache: KVCache | None = None):
        cfg = self.config
        l = inputs_embeds.shape[1]
        past = cache.seq_len if cache is not None else 0
        attention_mask, _ = decoder_inputs(inputs_embeds, attention_mask, None, cache)  # positions: from the cache
        if past == 0:  # prefill (or a cache-less forward): alpha from this length, kept for the decode steps
            alpha = self.ntk_alpha(l)
            if cache is not None:
                cache.state[NTK_STATE] = alpha
        else:
            alpha = cache.state.get(NTK_STATE, 1.0)
        positions = paddle.arange(past, past + l, dtype="int64").unsqueeze(0)
        dim = cfg.rotary_dim
        inv_freq = rope_inv_freq(dim, ntk_scaled_base(cfg.rotary_emb_base, alpha, dim))
        rope = rope_cos_sin(positions, inv_freq)
        logn = None
        if cfg.use_logn_attn and past + l > cfg.seq_length:
            logn = paddle.to_tensor(logn_scale(np.arange(past, past + l), cfg.seq_length).reshape([1, l, 1, 1]))
        mask = additive_mask(attention_mask, l, inputs_embeds.dtype)
        x = inputs_embeds
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, logn, mask, cache, i)
        return self.transformer.ln_f(x)

    # ---- upstream-style chat entry points (model.chat(tokenizer, query, history)) ----------------------------
    chat_config = None  # a chat.ChatConfig (the folder's generation_config.json); None = Qwen-VL-Chat defaults

    def chat(self, tokenizer, query: str, history=None, **kw):
        """(response, history) for one turn; see paddlevl.models.qwen_vl.chat.chat for the options."""
        from .chat import chat
        kw.setdefault("chat_config", self.chat_config)
        return chat(self, tokenizer, query, history, **kw)

    def chat_stream(self, tokenizer, query: str, history=None, **kw):
        """Generator of the response text so far, token by token."""
        from .chat import chat_stream
        kw.setdefault("chat_config", self.chat_config)
        return chat_stream(self, tokenizer, query, history, **kw)

    def forward(self, input_ids, pixel_values=None, image_spans=None, attention_mask=None, cache=None):
        """Full forward: ids [B, L] (+ pixel values of the images in span order) -> logits [B, L, V]."""
        if not isinstance(input_ids, paddle.Tensor):
            input_ids = paddle.to_tensor(np.asarray(input_ids, np.int64))
        image_embeds = None
        if pixel_values is not None and pixel_values.shape[0] > 0:
            if not isinstance(pixel_values, paddle.Tensor):
                pixel_values = paddle.to_tensor(np.asarray(pixel_values, np.float32))
            image_embeds = self.encode_images(pixel_values)
        embeds = self.embed_with_images(input_ids, image_embeds, image_spans)
        return self.forward_embeds(embeds, attention_mask, None, cache)
