"""Attention core shared by every model: masks, grouped-query attention, the KV cache, and the projection-level
attention module used by the vision towers (separate q/k/v/out projections; fused upstream layouts are split by
the converter)."""
from __future__ import annotations

import paddle
import paddle.nn.functional as F
from paddle import nn

NEG_INF = float(paddle.finfo(paddle.float32).min)


class KVCache:
    """Per-layer keys/values, each [B, S, kv_heads, head_dim], grown along S.

    `state` keeps per-sequence values a family must carry from prefill to decode (e.g. Qwen-VL's NTK alpha)."""

    def __init__(self, num_layers: int):
        self.layers: list = [None] * num_layers
        self.state: dict = {}

    def __len__(self):
        return self.seq_len

    @property
    def seq_len(self) -> int:
        kv = self.layers[0]
        return 0 if kv is None else int(kv[0].shape[1])

    def update(self, i: int, k, v):
        """Append this step's k, v for layer i and return the full (k, v)."""
        past = self.layers[i]
        if past is not None:
            k = paddle.concat([past[0], k], axis=1)
            v = paddle.concat([past[1], v], axis=1)
        self.layers[i] = (k, v)
        return k, v

    def select(self, index):
        """Keep only the batch rows in `index` (used when finished sequences leave a batch)."""
        index = paddle.to_tensor(index, dtype="int64")
        self.layers = [None if kv is None else (paddle.gather(kv[0], index), paddle.gather(kv[1], index))
                       for kv in self.layers]


def causal_keep_mask(attention_mask, query_len: int):
    """Boolean [B, 1, L, S] mask of the key positions each query may attend to.

    attention_mask: [B, S] with 1 for real tokens (left padding = leading zeros), S = past + L; or None (all real,
    needs `query_len` and assumes no past). Query j (0-based in this step) sits at absolute S - L + j."""
    s = attention_mask.shape[1]
    past = s - query_len
    q_pos = paddle.arange(past, s, dtype="int64").reshape([query_len, 1])
    k_pos = paddle.arange(0, s, dtype="int64").reshape([1, s])
    causal = (k_pos <= q_pos).unsqueeze(0).unsqueeze(0)  # [1, 1, L, S]
    real = attention_mask.astype("bool").unsqueeze(1).unsqueeze(1)  # [B, 1, 1, S]
    return paddle.logical_and(causal, real)


# Scores of at most this many float32 elements are materialised at once; longer prompts run in query blocks
# (each query row's softmax is independent, so blocks give the same result with bounded memory).
MAX_SCORE_ELEMENTS = 1 << 25


def attention(q, k, v, keep_mask=None, scale: float | None = None):
    """Scaled dot-product attention with grouped-query support.

    q [B, L, H, D]; k, v [B, S, Hkv, D] with H % Hkv == 0 (query head i uses kv head i // (H // Hkv));
    keep_mask: boolean, broadcastable to [B, H, L, S] (True = attend) or None.
    Scores and softmax in float32; returns [B, L, H * D] in q's dtype."""
    b, l, h, d = q.shape
    hkv, s = k.shape[2], k.shape[1]
    g = h // hkv
    scale = d ** -0.5 if scale is None else scale
    qf = q.astype("float32").reshape([b, l, hkv, g, d]).transpose([0, 2, 3, 1, 4])  # [B, Hkv, g, L, D]
    kf = k.astype("float32").transpose([0, 2, 1, 3]).unsqueeze(2)  # [B, Hkv, 1, S, D]
    vf = v.astype("float32").transpose([0, 2, 1, 3]).unsqueeze(2)
    m = keep_mask
    if m is not None and m.ndim == 4:  # [B|1, H|1, L|1, S] -> [B|1, Hkv|1, g|1, L|1, S]
        m = m.reshape([m.shape[0], hkv, g, m.shape[2], m.shape[3]]) if m.shape[1] == h else m.unsqueeze(2)
    block = max(1, MAX_SCORE_ELEMENTS // max(1, b * h * s))
    outs = []
    for start in range(0, l, block):
        stop = min(l, start + block)
        mb = m if (m is None or m.shape[-2] == 1 or (start == 0 and stop == l)) else m[..., start:stop, :]
        outs.append(_attend(qf[:, :, :, start:stop] if stop - start < l else qf, kf, vf, mb, scale))
    out = outs[0] if len(outs) == 1 else paddle.concat(outs, axis=3)  # [B, Hkv, g, L, D]
    return out.transpose([0, 3, 1, 2, 4]).reshape([b, l, h * d]).astype(q.dtype)


def _attend(qf, kf, vf, keep, scale):
    scores = paddle.matmul(qf, kf, transpose_y=True) * scale  # [B, Hkv, g, Lb, S]
    if keep is not None:
        scores = paddle.where(keep, scores, paddle.full([], NEG_INF, dtype="float32"))
    return paddle.matmul(F.softmax(scores, axis=-1), vf)


def block_diagonal_mask(lengths):
    """Boolean [1, 1, N, N] mask letting tokens attend only inside their own segment (one segment per image)."""
    seg = paddle.concat([paddle.full([int(n)], i, dtype="int64") for i, n in enumerate(lengths)])
    return (seg.unsqueeze(1) == seg.unsqueeze(0)).unsqueeze(0).unsqueeze(0)


class VisionAttention(nn.Layer):
    """Bidirectional multi-head attention with separate q/k/v/out projections (HF CLIP names).

    Optional rotary tables (cos, sin [1, N, D]) rotate q and k; optional keep_mask confines attention."""

    def __init__(self, dim: int, heads: int, bias: bool = True, kdim: int | None = None):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        kdim = dim if kdim is None else kdim
        self.q_proj = nn.Linear(dim, dim, bias_attr=None if bias else False)
        self.k_proj = nn.Linear(kdim, dim, bias_attr=None if bias else False)
        self.v_proj = nn.Linear(kdim, dim, bias_attr=None if bias else False)
        self.out_proj = nn.Linear(dim, dim, bias_attr=None if bias else False)

    def forward(self, x, keep_mask=None, rope=None, key=None, value=None):
        """Self-attention on x [B, N, dim]; cross-attention when key/value [B, S, kdim] are given."""
        key = x if key is None else key
        value = key if value is None else value
        b, n, _ = x.shape
        q = self.q_proj(x).reshape([b, n, self.heads, self.head_dim])
        k = self.k_proj(key).reshape([b, key.shape[1], self.heads, self.head_dim])
        v = self.v_proj(value).reshape([b, value.shape[1], self.heads, self.head_dim])
        if rope is not None:
            from .rotary import apply_rotary
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return self.out_proj(attention(q, k, v, keep_mask))


def decoder_inputs(inputs_embeds, attention_mask=None, position_ids=None, cache: KVCache | None = None):
    """Fill the decoder protocol's optional arguments for one step of L new tokens after the cached ones.

    attention_mask defaults to all ones over past + L; position_ids default to the number of real tokens before
    each new one (padding -> 0), which is 0..L-1 after the cache when there is no padding."""
    b, l = inputs_embeds.shape[0], inputs_embeds.shape[1]
    past = cache.seq_len if cache is not None else 0
    if attention_mask is None:
        attention_mask = paddle.ones([b, past + l], dtype="int64")
    if attention_mask.shape[1] != past + l:
        raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions, expected past {past} + {l}")
    if position_ids is None:
        position_ids = paddle.clip(paddle.cumsum(attention_mask.astype("int64"), axis=1) - 1, min=0)[:, -l:]
    return attention_mask, position_ids
