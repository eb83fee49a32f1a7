"""Rotary position embeddings.

All tables are computed in float32 and the rotation itself runs in float32 (as every upstream model here does),
then the result is cast back to the activation dtype.
"""
import math

import numpy as np
import paddle

import external_ops


def rope_inv_freq(dim: int, base: float):
    """1 / base^(arange(0, dim, 2) / dim) in float32 -> paddle tensor [dim // 2]."""
    exponent = paddle.arange(0, dim, 2, dtype="float32") / float(dim)
    return 1.0 / paddle.pow(paddle.full([], float(base), dtype="float32"), exponent)


def rope_cos_sin(position_ids, inv_freq):
    """positions [B, L] (int) -> cos, sin [B, L, 2 * len(inv_freq)] float32, halves duplicated (NeoX layout)."""
    freqs = position_ids.astype("float32").unsqueeze(-1) * inv_freq.reshape([1, 1, -1])
    emb = paddle.concat([freqs, freqs], axis=-1)
    return paddle.cos(emb), paddle.sin(emb)


def rotate_half(x):
    half = x.shape[-1] // 2
    return paddle.concat([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):
    """Rotate-half RoPE in float32. x [B, L, heads, D]; cos/sin [B or 1, L, R] with R <= D (the first R dims
    rotate). Fused kernel when built (external_ops), else the composite Paddle path."""
    return external_ops.apply_rotary(x, cos, sin)


# ---- Qwen-VL (QWen LLM): dynamic NTK base and logN query scaling -------------------------------------------
def qwen_ntk_alpha(seq_len: int, seq_length: int) -> int:
    """NTK factor upstream picks from the prefill length: 2^ceil(log2(L / seq_length) + 1) - 1, at least 1."""
    context_value = math.log(seq_len / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def ntk_scaled_base(base: float, alpha: float, dim: int) -> float:
    return base * alpha ** (dim / (dim - 2))


def logn_scale(positions, seq_length: int):
    """Query multiplier log(p) / log(seq_length) for 1-based position p > seq_length, else 1.

    positions: numpy int array of 0-based positions -> float32 numpy array of the same shape (computed in float64
    and rounded once, as upstream builds its table from Python floats)."""
    p = np.asarray(positions, dtype=np.float64) + 1.0
    scale = np.where(p > seq_length, np.log(np.maximum(p, 1.0)) / math.log(seq_length), 1.0)
    return scale.astype(np.float32)


# ---- InternLM2 dynamic NTK (HF LlamaDynamicNTKScalingRotaryEmbedding rule) ------------------------------------
def dynamic_ntk_base(base: float, dim: int, seq_len: int, max_position: int, factor: float) -> float:
    """Base used when the sequence grows past max_position: base * ((f*L/max - (f-1)))^(dim/(dim-2))."""
    if seq_len <= max_position:
        return base
    return base * ((factor * seq_len / max_position) - (factor - 1)) ** (dim / (dim - 2))


# ---- Qwen2-VL 2-D vision rotary ------------------------------------------------------------------------------
def vision_rope_2d(grid_thw, head_dim: int, merge: int, theta: float = 10000.0):
    """Per-patch rotary angles for the Qwen2-VL NaViT tower.

    grid_thw: [[t, h, w], ...] per image. Patches are ordered in merge x merge blocks (the order the image
    processor emits), positions restart for every image. Returns float32 numpy [N, head_dim // 2] laid out as
    [row * inv_freq, col * inv_freq] with inv_freq = 1 / theta^(arange(0, d, 2) / d), d = head_dim // 2.
    """
    d = head_dim // 2
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))))
    rows = []
    for t, h, w in np.asarray(grid_thw, dtype=np.int64).tolist():
        hpos = np.broadcast_to(np.arange(h)[:, None], (h, w))
        wpos = np.broadcast_to(np.arange(w)[None, :], (h, w))

        def blocks(a):
            return a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)

        pos = np.stack([blocks(hpos), blocks(wpos)], axis=-1)  # [h*w, 2]
        rows.append(np.tile(pos, (t, 1)))
    pos = np.concatenate(rows, axis=0).astype(np.float32)
    freqs = pos[:, :, None] * inv_freq[None, None, :]  # [N, 2, d/2]
    return freqs.reshape(pos.shape[0], -1).astype(np.float32)
