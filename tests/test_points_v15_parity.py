"""POINTS-1.5 golden parity through the real converter: the release (CustomLlama) key layout of the fixture, and a
renamed copy in the Qwen2 key layout (as POINTS-Reader / sglang load it)."""
import glob
import json
import os
import shutil

import numpy as np
import pytest

from paddlevl.parity import REQUIRED, run_golden

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "points_v15")
RTOL = 1e-4


def _check(rows, outputs, expected_names):
    by = {r.name: r for r in rows}
    for name in REQUIRED:
        assert by[name].status == "pass", (name, by[name])
    bad = [r for r in rows if not r.ok]
    assert not bad, bad
    # every debug array of the fixture is produced and compared, not skipped
    assert {r.name for r in rows if r.status == "pass"} == set(expected_names)


def _expected_names(fixture):
    with np.load(os.path.join(fixture, "expected.npz")) as z:
        return list(z.files)


def test_golden_customllama_layout(tmp_path):
    rows, outputs = run_golden(FIX, rtol=RTOL, workdir=str(tmp_path), out=None)
    _check(rows, outputs, _expected_names(FIX))


# ------------------------------------------------------------------------------------------------ Qwen2 layout
def _qwen2_llm_config(custom: dict) -> dict:
    """The same LLM described with transformers Qwen2Config keys."""
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": custom["hidden_size"], "intermediate_size": custom["ffn_hidden_size"],
        "num_hidden_layers": custom["num_layers"], "num_attention_heads": custom["num_attention_heads"],
        "num_key_value_heads": custom["num_kv_heads"], "rms_norm_eps": custom["layernorm_epsilon"],
        "rope_theta": custom["rotary_emb_base"], "vocab_size": custom["vocab_size"],
        "max_position_embeddings": custom["max_position_embeddings"], "tie_word_embeddings": False,
        "use_sliding_window": False, "rope_scaling": None, "torch_dtype": "bfloat16",
    }


def _rename_to_qwen2(state: dict, llm: dict) -> dict:
    """CustomLlama names -> Qwen2ForCausalLM names, written with torch ops independently of the converter table."""
    import torch

    nkv, heads, hidden = llm["num_kv_heads"], llm["num_attention_heads"], llm["hidden_size"]
    hd, ffn = hidden // heads, llm["ffn_hidden_size"]
    out = {}
    for k, v in state.items():
        if not k.startswith("llm."):
            out[k] = v
            continue
        if k == "llm.lm.embed_in.weight":
            out["llm.model.embed_tokens.weight"] = v
        elif k == "llm.lm.final_layer_norm.weight":
            out["llm.model.norm.weight"] = v
        elif k == "llm.embed_out.weight":
            out["llm.lm_head.weight"] = v
        else:
            parts = k.split(".")  # llm.lm.layers.N.<module>.<name>.<param>
            n, rest, p = parts[3], ".".join(parts[4:-1]), parts[-1]
            pre = f"llm.model.layers.{n}."
            if rest in ("input_layernorm", "post_attention_layernorm"):
                out[pre + rest + "." + p] = v
            elif rest == "attention.query_dense":
                out[pre + "self_attn.q_proj." + p] = v
            elif rest == "attention.key_value_dense":
                kv = v.reshape(nkv, 2, hd, *v.shape[1:])
                out[pre + "self_attn.k_proj." + p] = kv[:, 0].reshape(nkv * hd, *v.shape[1:]).contiguous()
                out[pre + "self_attn.v_proj." + p] = kv[:, 1].reshape(nkv * hd, *v.shape[1:]).contiguous()
            elif rest == "attention.dense":
                out[pre + "self_attn.o_proj." + p] = v
            elif rest == "mlp.dense_h_to_4h":
                up, gate = torch.split(v, [ffn, ffn], dim=0)
                out[pre + "mlp.up_proj." + p] = up.contiguous()
                out[pre + "mlp.gate_proj." + p] = gate.contiguous()
            elif rest == "mlp.dense_4h_to_h":
                out[pre + "mlp.down_proj." + p] = v
            else:
                raise AssertionError(f"unexpected fixture key {k}")
    return out


@pytest.fixture(scope="module")
def qwen2_fixture(tmp_path_factory):
    pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    dst = tmp_path_factory.mktemp("points_v15_qwen2")
    for name in ("manifest.json", "inputs.npz", "expected.npz"):
        shutil.copy(os.path.join(FIX, name), dst / name)
    shutil.copytree(os.path.join(FIX, "inputs"), dst / "inputs")
    src, out_src = os.path.join(FIX, "source"), dst / "source"
    out_src.mkdir()
    for f in os.listdir(src):
        if not (f.endswith(".safetensors") or f.endswith(".index.json") or f == "config.json"):
            shutil.copy(os.path.join(src, f), out_src / f)
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    state = {}
    for f in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
        state.update(load_file(f))
    renamed = _rename_to_qwen2(state, cfg["llm_config"])
    cfg["llm_config"] = _qwen2_llm_config(cfg["llm_config"])
    with open(out_src / "config.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    # two shards (another file layout than the release's four) + index
    keys = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: renamed[k] for k in ks}, str(out_src / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in ks})
    with open(out_src / "model.safetensors.index.json", "w", encoding="utf-8") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(dst), keys


def test_qwen2_copy_has_no_customllama_names(qwen2_fixture):
    _, keys = qwen2_fixture
    assert any(k.startswith("llm.model.layers.0.self_attn.k_proj") for k in keys)
    assert not any(k.startswith("llm.lm.") for k in keys) and "llm.lm_head.weight" in keys


def test_golden_qwen2_layout(qwen2_fixture, tmp_path):
    fixture, _ = qwen2_fixture
    rows, outputs = run_golden(fixture, rtol=RTOL, workdir=str(tmp_path), out=None)
    _check(rows, outputs, _expected_names(fixture))


def test_layout_detection_and_merger_drop(qwen2_fixture):
    from convert.ops import drop
    from convert.rules.points import detect_llm_layout, v15_rules
    from safetensors import safe_open

    def keys_of(folder):
        ks = []
        for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
            with safe_open(f, "np") as h:
                ks += list(h.keys())
        return ks

    with open(os.path.join(FIX, "source", "config.json")) as f:
        cfg = json.load(f)
    release = keys_of(os.path.join(FIX, "source"))
    assert detect_llm_layout(cfg["llm_config"], release) == "customllama"
    assert detect_llm_layout(cfg["llm_config"], qwen2_fixture[1]) == "qwen2"
    rules = v15_rules(cfg, release)
    merger = [k for k in release if k.startswith("vision_encoder.merger.")]
    assert merger, "the release layout carries the unused vision merger"
    for k in merger:
        hit = [r for r in rules if r.match(k)]
        assert len(hit) == 1 and type(hit[0].op) is type(drop("x")) and "never used" in hit[0].op.reason
    with pytest.raises(ValueError, match="mixes"):
        detect_llm_layout(cfg["llm_config"], release + ["llm.model.norm.weight"])


def test_golden_with_query_chunked_vision_attention(tmp_path, monkeypatch):
    """Large images attend in query chunks (bounded memory); force tiny chunks on the fixture."""
    import paddlevl.models.points.modeling_v15 as m

    monkeypatch.setattr(m, "SCORE_BUDGET", 2 * 60 * 16)  # chunks of 16 queries (2 heads, 60-patch image)
    rows, outputs = run_golden(FIX, rtol=RTOL, workdir=str(tmp_path), out=None)
    _check(rows, outputs, _expected_names(FIX))


def test_golden_accepts_per_image_input_arrays(tmp_path):
    """Fixtures may store one array per image (pixel_values_0, image_grid_thw_0, ...)."""
    dst = tmp_path / "fx"
    shutil.copytree(FIX, dst, ignore=shutil.ignore_patterns("fullsize_*", "*_tokenizer_golden.json"))
    with np.load(os.path.join(FIX, "inputs.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    grid = arrays.pop("image_grid_thw")
    pixels = arrays.pop("pixel_values")
    start = 0
    for k, (t, h, w) in enumerate(grid.tolist()):
        arrays[f"pixel_values_{k}"] = pixels[start:start + t * h * w]
        arrays[f"image_grid_thw_{k}"] = grid[k:k + 1]
        start += t * h * w
    np.savez(dst / "inputs.npz", **arrays)
    rows, outputs = run_golden(str(dst), rtol=RTOL, workdir=str(tmp_path), out=None)
    _check(rows, outputs, _expected_names(FIX))
