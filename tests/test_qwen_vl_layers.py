"""Qwen-VL building blocks checked against torch directly: the positional-table resize (torch F.interpolate bicubic,
align_corners=False, as upstream get_abs_pos) for several grids, and the per-head in_proj regroup of the ViT."""
import numpy as np
import paddle
import pytest
import torch
import torch.nn.functional as F

from paddlevl.models.qwen_vl.modeling import bicubic_matrix, resize_pos_table


@pytest.mark.parametrize("src,dst", [(16, 32), (16, 24), (16, 28), (16, 9), (16, 16), (8, 31)])
def test_resize_matches_torch_bicubic(src, dst):
    rng = np.random.default_rng(src * 100 + dst)
    table = rng.standard_normal((src * src, 5)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(table).reshape(1, src, src, -1).permute(0, 3, 1, 2), size=(dst, dst),
                         mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2).numpy()
    got = resize_pos_table(paddle.to_tensor(table), dst).numpy()
    assert got.shape == (dst * dst, 5)
    assert np.abs(got - want).max() <= 2e-6 * max(1.0, np.abs(want).max())
    m = bicubic_matrix(src, dst)
    assert np.allclose(m.sum(axis=1), 1.0, atol=1e-6)  # interpolation weights sum to one


def test_vit_in_proj_regroup_matches_per_head_split():
    """Upstream VisualAttention views in_proj output as [.., heads, 3*hd] and splits q|k|v inside each head;
    the converter's regroup(heads, [hd]*3) must give the same q, k, v."""
    from convert.ops import regroup

    heads, hd, width = 4, 6, 24
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3 * width, width)).astype(np.float32)
    x = rng.standard_normal((7, width)).astype(np.float32)
    mixed = (x @ w.T).reshape(7, heads, 3 * hd)
    q_ref, k_ref, v_ref = (mixed[..., i * hd:(i + 1) * hd].reshape(7, width) for i in range(3))
    parts = [a for a, _ in regroup(heads, [hd, hd, hd]).apply(w, "float32")]
    for part, ref in zip(parts, (q_ref, k_ref, v_ref)):
        assert np.allclose(x @ part.T, ref, atol=1e-5)


def _visual_cfg(**kw):
    from paddlevl.models.qwen_vl.config import QwenVisualConfig

    base = dict(image_size=56, patch_size=14, width=24, layers=1, heads=2, mlp_ratio=2.0, output_dim=256,
                image_start_id=600)
    return QwenVisualConfig(**dict(base, **kw))


@pytest.mark.parametrize("output_dim,heads", [(192, 1), (320, 2), (256, 2)])
def test_resampler_heads_are_output_dim_floordiv_128(output_dim, heads):
    """Upstream Resampler = torch nn.MultiheadAttention(output_dim, output_dim // 128): for 192 one head of 192,
    for 320 two heads of 160. Ours, with the same weights, against torch's MultiheadAttention."""
    from paddlevl.models.qwen_vl.modeling import Resampler

    cfg = _visual_cfg(output_dim=output_dim, image_size=100)  # 100 // 14 -> 7 x 7 tokens
    assert cfg.pool_heads == heads and cfg.grid == 7
    paddle.seed(3)
    ours = Resampler(cfg)
    rng = np.random.default_rng(output_dim)
    params = {k: rng.standard_normal(p.shape).astype(np.float32) * (0.3 if p.ndim == 2 else 1.0)
              for k, p in ours.state_dict().items()}
    ours.set_state_dict({k: paddle.to_tensor(v) for k, v in params.items()})
    x = rng.standard_normal((2, cfg.grid * cfg.grid, cfg.width)).astype(np.float32)
    got = ours(paddle.to_tensor(x)).numpy()

    t = {k: torch.from_numpy(v) for k, v in params.items()}
    mha = torch.nn.MultiheadAttention(output_dim, output_dim // 128)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([t[f"attn.{n}_proj.weight"].T for n in "qkv"]))
        mha.in_proj_bias.copy_(torch.cat([t[f"attn.{n}_proj.bias"] for n in "qkv"]))
        mha.out_proj.weight.copy_(t["attn.out_proj.weight"].T)
        mha.out_proj.bias.copy_(t["attn.out_proj.bias"])

        def ln(v, name):
            return F.layer_norm(v, (output_dim,), t[name + ".weight"], t[name + ".bias"], eps=1e-6)

        kv = ln(torch.from_numpy(x) @ t["kv_proj.weight"], "ln_kv").permute(1, 0, 2)  # [S, N, H]
        key_pos = F.interpolate(t["pos_embed"].reshape(1, 16, 16, -1).permute(0, 3, 1, 2), size=(7, 7),
                                mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(49, -1)
        q = (ln(t["query"], "ln_q") + t["pos_embed"]).unsqueeze(1).repeat(1, 2, 1)
        want = mha(q, kv + key_pos.unsqueeze(1), kv)[0].permute(1, 0, 2).numpy()
    assert got.shape == want.shape == (2, 256, output_dim)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_config_accepts_what_upstream_runs_and_refuses_what_it_cannot():
    from paddlevl.models.qwen_vl.config import parse_config

    good = {"vocab_size": 640, "hidden_size": 192, "num_hidden_layers": 1, "num_attention_heads": 3,
            "kv_channels": 64, "intermediate_size": 256,
            "visual": {"image_size": 100, "patch_size": 14, "width": 40, "layers": 1, "heads": 4,
                       "mlp_ratio": 2.5, "output_dim": 192, "image_start_id": 600}}
    cfg = parse_config(good)
    assert cfg.visual.grid == 7 and cfg.visual.pool_heads == 1
    small = dict(good, hidden_size=64, num_attention_heads=1, visual=dict(good["visual"], output_dim=64))
    with pytest.raises(ValueError, match="resampler has output_dim // 128 = 0 heads"):
        parse_config(small)  # torch MultiheadAttention with 0 heads cannot be built upstream either
    for bad, msg in [({"patch_size": 128}, "smaller than patch_size"), ({"heads": 3}, "not divisible")]:
        with pytest.raises(ValueError, match=msg):
            parse_config(dict(good, visual=dict(good["visual"], **bad)))
