"""Shared layers against independent numpy computations (float64 references), odd sizes included."""
import math

import numpy as np
import paddle
import pytest

from paddlevl import layers as L

RTOL = 1e-5


def close(a, b, tol=RTOL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)
    assert err <= tol, f"relative error {err:.3g} > {tol}"


@pytest.mark.parametrize("shape,eps", [((3, 37), 1e-6), ((2, 5, 64), 1e-5), ((1, 1, 7), 1e-6)])
def test_rms_norm(shape, eps):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32) * 0.01
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    n = L.RMSNorm(shape[-1], eps)
    n.weight.set_value(w)
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * w
    close(n(paddle.to_tensor(x)).numpy(), ref)


def test_layer_norm_uses_given_eps():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 33)).astype(np.float32) * 1e-3
    n = L.LayerNorm(33, 1e-6)
    xd = x.astype(np.float64)
    ref = (xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + 1e-6)
    close(n(paddle.to_tensor(x)).numpy(), ref)


def np_rope(x, pos, base, rot=None):
    d = x.shape[-1]
    rot = d if rot is None else rot
    inv = 1.0 / base ** (np.arange(0, rot, 2) / rot)
    ang = pos[..., None] * inv  # [B, L, rot/2]
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    xr, xp = x[..., :rot].astype(np.float64), x[..., rot:]
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
    out = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    return np.concatenate([out, xp], -1)


@pytest.mark.parametrize("rot", [None, 6])
def test_rotary_rotate_half(rot):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 9, 3, 10)).astype(np.float32)
    pos = np.stack([np.arange(9), np.arange(4, 13)]).astype(np.int64)
    r = x.shape[-1] if rot is None else rot
    cos, sin = L.rope_cos_sin(paddle.to_tensor(pos), L.rope_inv_freq(r, 10000.0))
    got = L.apply_rotary(paddle.to_tensor(x), cos, sin).numpy()
    close(got, np_rope(x, pos, 10000.0, rot), 1e-5)


def test_qwen_ntk_and_logn():
    # alpha = 2^ceil(log2(L/S)+1) - 1, at least 1
    assert [L.qwen_ntk_alpha(n, 256) for n in (10, 256, 257, 512, 513, 1024, 1025)] == [1, 1, 3, 3, 7, 7, 15]
    s = L.logn_scale(np.array([0, 255, 256, 300]), 256)
    np.testing.assert_allclose(s, [1, 1, math.log(257, 256), math.log(301, 256)], rtol=1e-7)
    assert L.ntk_scaled_base(10000.0, 3, 64) == pytest.approx(10000.0 * 3 ** (64 / 62))


def test_vision_rope_2d_block_order():
    grid = [[1, 4, 6], [1, 2, 2]]
    got = L.vision_rope_2d(grid, head_dim=16, merge=2)
    inv = 1.0 / 10000 ** (np.arange(0, 8, 2) / 8)
    rows = []
    for _, h, w in grid:
        for bh in range(h // 2):
            for bw in range(w // 2):
                for dh in range(2):
                    for dw in range(2):
                        r, c = 2 * bh + dh, 2 * bw + dw
                        rows.append(np.concatenate([r * inv, c * inv]))
    close(got, np.array(rows), 1e-6)


def np_attention(q, k, v, keep):
    b, l, h, d = q.shape
    g = h // k.shape[2]
    kk, vv = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("blhd,bshd->bhls", q.astype(np.float64), kk) / math.sqrt(d)
    s = np.where(keep, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhls,bshd->blhd", p, vv).reshape(b, l, h * d)


@pytest.mark.parametrize("h,hkv", [(4, 4), (6, 2), (3, 1)])
def test_gqa_attention_with_padding_and_past(h, hkv):
    rng = np.random.default_rng(3)
    b, past, l, d = 2, 3, 5, 7
    s = past + l
    q = rng.standard_normal((b, l, h, d)).astype(np.float32)
    k = rng.standard_normal((b, s, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, s, hkv, d)).astype(np.float32)
    mask = np.ones((b, s), np.int64)
    mask[1, :2] = 0  # left padding on row 1
    keep = L.causal_keep_mask(paddle.to_tensor(mask), l)
    got = L.attention(paddle.to_tensor(q), paddle.to_tensor(k), paddle.to_tensor(v), keep).numpy()
    qpos = np.arange(past, s)[:, None]
    ref_keep = (np.arange(s)[None] <= qpos)[None, None] & (mask[:, None, None, :] == 1)
    close(got, np_attention(q, k, v, ref_keep))


def test_long_queries_run_in_blocks_with_the_same_result(monkeypatch):
    import importlib
    A = importlib.import_module("paddlevl.layers.attention")
    rng = np.random.default_rng(6)
    b, past, l, h, hkv, d = 2, 4, 37, 6, 2, 8
    q = paddle.to_tensor(rng.standard_normal((b, l, h, d)).astype(np.float32))
    k = paddle.to_tensor(rng.standard_normal((b, past + l, hkv, d)).astype(np.float32))
    v = paddle.to_tensor(rng.standard_normal((b, past + l, hkv, d)).astype(np.float32))
    mask = np.ones((b, past + l), np.int64)
    mask[0, :5] = 0
    keep = L.causal_keep_mask(paddle.to_tensor(mask), l)
    bd = L.block_diagonal_mask([20, 17])
    whole, whole_bd = L.attention(q, k, v, keep).numpy(), L.attention(q, q, q, bd).numpy()
    monkeypatch.setattr(A, "MAX_SCORE_ELEMENTS", b * h * (past + l) * 5)  # blocks of 5 query rows
    close(L.attention(q, k, v, keep).numpy(), whole, 1e-6)
    close(L.attention(q, q, q, bd).numpy(), whole_bd, 1e-6)


def test_block_diagonal_mask():
    m = L.block_diagonal_mask([2, 3]).numpy()[0, 0]
    assert m[:2, :2].all() and m[2:, 2:].all() and not m[:2, 2:].any() and not m[2:, :2].any()


def test_mlps():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 11)).astype(np.float32)
    m = L.SwiGLU(11, 13)
    wg, wu, wd = (m.gate_proj.weight.numpy().astype(np.float64), m.up_proj.weight.numpy(),
                  m.down_proj.weight.numpy())
    g = x @ wg
    close(m(paddle.to_tensor(x)).numpy(), (g / (1 + np.exp(-g)) * (x @ wu)) @ wd)
    for act, f in [("quick_gelu", lambda z: z / (1 + np.exp(-1.702 * z))),
                   ("gelu", lambda z: 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2))))]:
        m = L.GeluMLP(11, 17, act=act)
        h = x @ m.fc1.weight.numpy().astype(np.float64) + m.fc1.bias.numpy()
        close(m(paddle.to_tensor(x)).numpy(), f(h) @ m.fc2.weight.numpy() + m.fc2.bias.numpy())


def test_vit_block_and_clip_tower_shapes_and_math():
    rng = np.random.default_rng(5)
    cfg = L.CLIPVisionConfig(hidden_size=12, intermediate_size=20, num_attention_heads=3, num_hidden_layers=2,
                             image_size=28, patch_size=14, layer_norm_eps=1e-5)
    tower = L.CLIPVisionTower(cfg)
    px = rng.standard_normal((2, 3, 28, 28)).astype(np.float32)
    states = tower(paddle.to_tensor(px))
    assert len(states) == 3 and list(states[-1].shape) == [2, 5, 12]
    # embeddings by hand: conv as patch matmul in (C, ky, kx) order, CLS first, + positions
    w = tower.embeddings.patch_embedding.weight.numpy().reshape(12, -1).astype(np.float64)
    patches = px.reshape(2, 3, 2, 14, 2, 14).transpose(0, 2, 4, 1, 3, 5).reshape(2, 4, -1)
    emb = np.concatenate([np.broadcast_to(tower.embeddings.class_embedding.numpy(), (2, 1, 12)), patches @ w.T], 1)
    emb = emb + tower.embeddings.position_embedding.weight.numpy()[None]
    close(tower.embeddings(paddle.to_tensor(px)).numpy(), emb)
    # one block by hand
    blk = tower.encoder.layers[0]
    x = rng.standard_normal((2, 5, 12)).astype(np.float32)

    def ln(z, n):
        return (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-5) * n.weight.numpy() + n.bias.numpy()

    def lin(z, m):
        return z @ m.weight.numpy().astype(np.float64) + m.bias.numpy()

    a = blk.self_attn
    h = ln(x.astype(np.float64), blk.layer_norm1)
    q, k, v = (lin(h, m).reshape(2, 5, 3, 4) for m in (a.q_proj, a.k_proj, a.v_proj))
    y = x + lin(np_attention(q, k, v, np.ones((1, 1, 5, 5), bool)), a.out_proj)
    z = lin(ln(y, blk.layer_norm2), blk.mlp.fc1)
    ref = y + lin(z / (1 + np.exp(-1.702 * z)), blk.mlp.fc2)
    close(blk(paddle.to_tensor(x)).numpy(), ref)
