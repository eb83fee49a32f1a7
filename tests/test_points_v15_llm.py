"""The shared POINTS LLM (llm.py) and the LLM rule table: config parsing of both layouts, the CustomLlama
low-precision attention scale, KV-cache decoding and left padding, fused-layout rules."""
import json
import math
import os

import numpy as np
import paddle
import pytest

from paddlevl.models.points.llm import PointsLLM, PointsLLMConfig

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "points_v15")
with open(os.path.join(FIX, "source", "config.json"), encoding="utf-8") as _f:
    CONFIG = json.load(_f)
LLM = CONFIG["llm_config"]


def test_config_from_both_layouts():
    custom = PointsLLMConfig.from_dict(CONFIG)
    assert (custom.num_layers, custom.num_kv_heads, custom.ffn_hidden_size) == (
        LLM["num_layers"], LLM["num_kv_heads"], LLM["ffn_hidden_size"])
    assert custom.rms_eps == LLM["layernorm_epsilon"] and custom.rope_base == LLM["rotary_emb_base"]
    assert custom.qkv_bias and not custom.out_bias and not custom.mlp_fc1_bias and custom.layout == "customllama"
    qwen2 = PointsLLMConfig.from_dict({
        "model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 96, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "vocab_size": 4160, "hidden_act": "silu"})
    assert (qwen2.num_layers, qwen2.num_kv_heads, qwen2.ffn_hidden_size, qwen2.rms_eps, qwen2.rope_base) == (
        3, 2, 96, 1e-6, 1e6)
    assert qwen2.layout == "qwen2" and qwen2.qkv_bias and not qwen2.out_bias
    with pytest.raises(NotImplementedError, match="rope_scaling"):
        PointsLLMConfig.from_dict({"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 1,
                                   "num_attention_heads": 4, "intermediate_size": 8, "rms_norm_eps": 1e-6,
                                   "vocab_size": 10, "rope_scaling": {"type": "yarn", "factor": 4}})
    with pytest.raises(NotImplementedError, match="swiglu"):
        PointsLLMConfig.from_dict({**LLM, "hidden_act": "gelu"})


def test_lowp_scale_matches_torch():
    torch = pytest.importorskip("torch")
    for hd in (16, 80, 128):
        cfg = PointsLLMConfig.from_dict({**LLM, "hidden_size": hd * 2, "num_attention_heads": 2, "num_kv_heads": 1})
        attn = PointsLLM(cfg).model.layers[0].self_attn
        for pd_dtype, t_dtype in ((paddle.bfloat16, torch.bfloat16), (paddle.float16, torch.float16)):
            nf = torch.sqrt(torch.tensor(hd, dtype=torch.float32)).to(t_dtype)
            want = (torch.tensor(1.0, dtype=t_dtype) / nf).float().item()
            assert attn.scale_for(pd_dtype) == want
        assert attn.scale_for(paddle.float32) == pytest.approx(1 / math.sqrt(hd), rel=1e-7)
    # sqrt(128) is not a bf16 number: the quirk really changes the scale
    cfg = PointsLLMConfig.from_dict({**LLM, "hidden_size": 256, "num_attention_heads": 2, "num_kv_heads": 1})
    attn = PointsLLM(cfg).model.layers[0].self_attn
    assert attn.scale_for(paddle.bfloat16) != attn.scale_for(paddle.float32)


@pytest.fixture(scope="module")
def lm():
    paddle.seed(0)
    cfg = PointsLLMConfig.from_dict(LLM)
    model = PointsLLM(cfg)
    rng = np.random.default_rng(0)
    model.set_state_dict({k: paddle.to_tensor((rng.standard_normal(v.shape) * 0.2).astype(np.float32))
                          for k, v in model.state_dict().items()})
    model.eval()
    return model


def test_kv_cache_decode_equals_full_forward(lm):
    ids = paddle.to_tensor(np.random.default_rng(1).integers(0, 4000, (2, 9)), dtype="int64")
    with paddle.no_grad():
        full = lm(ids).numpy()
        cache = lm.new_cache()
        emb = lm.embed(ids)
        pre = lm.forward_embeds(emb[:, :6], paddle.ones([2, 6], dtype="int64"), None, cache).numpy()
        steps = [lm.forward_embeds(emb[:, i:i + 1], paddle.ones([2, i + 1], dtype="int64"),
                                   paddle.full([2, 1], i, dtype="int64"), cache).numpy() for i in range(6, 9)]
    got = np.concatenate([pre] + steps, axis=1)
    assert np.abs(got - full).max() <= 1e-5 * np.abs(full).max()


def test_left_padding_positions(lm):
    ids = np.random.default_rng(2).integers(0, 4000, (1, 7))
    padded = np.concatenate([np.zeros((1, 3), dtype=np.int64), ids], axis=1)
    mask = np.concatenate([np.zeros((1, 3)), np.ones((1, 7))], axis=1).astype(np.int64)
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with paddle.no_grad():
        alone = lm(paddle.to_tensor(ids)).numpy()
        pad = lm(paddle.to_tensor(padded), paddle.to_tensor(mask), paddle.to_tensor(pos)).numpy()[:, 3:]
    assert np.abs(pad - alone).max() <= 1e-5 * np.abs(alone).max()


def test_fused_qkv_rule_for_customllama_without_gqa():
    """CustomLlama with num_kv_heads == heads stores one query_key_value [3H, H]: per head [Q_h; K_h; V_h]."""
    from convert.rules.points import llm_rules

    heads, hd, hidden = 4, 8, 32
    cfg = {**LLM, "hidden_size": hidden, "num_attention_heads": heads, "num_kv_heads": heads}
    key = "llm.lm.layers.0.attention.query_key_value.weight"
    rules = [r for r in llm_rules(cfg, [key]) if r.match(key)]
    assert len(rules) == 1
    w = np.arange(3 * hidden * hidden, dtype=np.float32).reshape(3 * hidden, hidden)
    outs = rules[0].op.apply(w, "float32")
    names = rules[0].target_names(rules[0].match(key))
    per_head = w.reshape(heads, 3, hd, hidden)  # upstream: qkv.view(..., heads, 3 * hd) then slices of hd
    for i, (name, (arr, _)) in enumerate(zip(names, outs)):
        assert name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")[i])
        np.testing.assert_array_equal(arr, per_head[:, i].reshape(heads * hd, hidden).T)


def test_kv_interleave_rule():
    from convert.rules.points import llm_rules

    nkv, hd, hidden = LLM["num_kv_heads"], LLM["hidden_size"] // LLM["num_attention_heads"], LLM["hidden_size"]
    key = "llm.lm.layers.2.attention.key_value_dense.bias"
    rule = next(r for r in llm_rules(LLM, [key]) if r.match(key))
    b = np.arange(2 * nkv * hd, dtype=np.float32)
    (k, _), (v, _) = rule.op.apply(b, "float32")
    np.testing.assert_array_equal(k, b.reshape(nkv, 2, hd)[:, 0].reshape(-1))
    np.testing.assert_array_equal(v, b.reshape(nkv, 2, hd)[:, 1].reshape(-1))
    assert rule.target_names(rule.match(key)) == ["llm.model.layers.2.self_attn.k_proj.bias",
                                                  "llm.model.layers.2.self_attn.v_proj.bias"]


def test_tied_head():
    from convert.rules.points import llm_rules

    cfg = PointsLLMConfig.from_dict({**LLM, "tie_word_embeddings": True})
    model = PointsLLM(cfg)
    assert "lm_head.weight" not in model.state_dict()
    h = paddle.to_tensor(np.random.default_rng(3).standard_normal((1, 2, cfg.hidden_size)).astype(np.float32))
    want = h.numpy() @ model.model.embed_tokens.weight.numpy().T
    np.testing.assert_allclose(model.logits(h).numpy(), want, rtol=1e-5, atol=1e-5)
    key = "llm.embed_out.weight"
    rule = next(r for r in llm_rules({**LLM, "tie_word_embeddings": True}, [key]) if r.match(key))
    assert rule.targets == () and "tied" in rule.op.reason
    rule = next(r for r in llm_rules(LLM, [key]) if r.match(key))
    assert rule.targets == ("llm.lm_head.weight",)
