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
