"""POINTS-1.5 against a second upstream fixture with other sizes than the public one (tests/fixtures/points_v15_variant:
4:1 GQA with head_dim 12, ViT head_dim 24, three images hitting every smart_resize branch, multi-turn, 3 shards with a
wrong index; see its README.md)."""
import json
import os

import numpy as np
import paddle
import pytest

from paddlevl.parity import REQUIRED, run_golden

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "points_v15_variant")
SRC = os.path.join(FIX, "source")


@pytest.fixture(scope="module")
def inputs():
    with np.load(os.path.join(FIX, "inputs.npz")) as z:
        return {k: z[k] for k in z.files}


def test_fixture_differs_from_public_one(inputs):
    with open(os.path.join(SRC, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    llm, vit = cfg["llm_config"], cfg["vision_config"]
    assert llm["hidden_size"] // llm["num_attention_heads"] != 16
    assert llm["num_attention_heads"] // llm["num_kv_heads"] == 4
    assert vit["embed_dim"] // vit["num_heads"] == 24
    assert len(inputs["image_grid_thw"]) == 3
    with open(os.path.join(SRC, "model.safetensors.index.json"), encoding="utf-8") as f:
        assert len(set(json.load(f)["weight_map"].values())) == 3


def test_golden_every_row_passes(tmp_path):
    rows, _ = run_golden(FIX, rtol=1e-4, workdir=str(tmp_path), out=None)
    by = {r.name: r for r in rows}
    for name in REQUIRED:
        assert by[name].status == "pass", by[name]
    with np.load(os.path.join(FIX, "expected.npz")) as z:
        names = set(z.files)
    assert {r.name for r in rows if r.status == "pass"} == names, [r for r in rows if not r.ok]


def test_wrong_index_is_reported_and_ignored():
    from convert.readers import open_source

    with open_source(SRC) as src:
        assert any("is wrong about" in n for n in src.notes), src.notes
        with open(os.path.join(SRC, "model.safetensors.index.json"), encoding="utf-8") as f:
            assert set(src.keys()) == set(json.load(f)["weight_map"])


def test_preprocessing_and_prompt_reproduce_inputs(inputs):
    from paddlevl.models.points.processing_v15 import ImageProcessorV15, construct_prompt
    from paddlevl.models.points.tokenizer import QwenTokenizer

    with open(os.path.join(FIX, "inputs", "messages.json"), encoding="utf-8") as f:
        messages = json.load(f)
    p = construct_prompt(messages, ImageProcessorV15.from_dir(SRC), base_dir=FIX)
    np.testing.assert_array_equal(np.asarray(p.grid_thw), inputs["image_grid_thw"])
    pixels = np.concatenate(p.pixel_values)
    assert pixels.shape == inputs["pixel_values"].shape
    assert np.abs(pixels - inputs["pixel_values"]).max() <= 1e-6
    with open(os.path.join(FIX, "inputs", "rendered_prompt.txt"), encoding="utf-8") as f:
        assert p.prompt == f.read()
    np.testing.assert_array_equal(np.asarray([QwenTokenizer.from_dir(SRC).encode(p.prompt)]), inputs["input_ids"])


# ------------------------------------------------------------------------------------------------ golden options
def _copy_with_generation(tmp_path, generation=None, llm_extra=None):
    """The variant fixture's manifest + source/config.json, with other generation options (weights not copied)."""
    dst = tmp_path / "fx"
    (dst / "source").mkdir(parents=True)
    with open(os.path.join(FIX, "manifest.json"), encoding="utf-8") as f:
        man = json.load(f)
    if generation is not None:
        man["inputs_built"]["generation"] = generation
    with open(dst / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(man, f)
    with open(os.path.join(SRC, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["llm_config"].update(llm_extra or {})
    with open(dst / "source" / "config.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    return str(dst)


def test_golden_generation_options(tmp_path):
    """llm.generate() runs under llm_config's generation attributes overridden by what chat() passed; options the
    decode loop does not implement are refused instead of silently ignored."""
    from paddlevl.models.points.golden_v15 import _fixture_generation

    opts = _fixture_generation(FIX)
    assert opts["repetition_penalty"] == 0.7 and opts["max_new_tokens"] == 8
    fx = _copy_with_generation(tmp_path / "a", {"max_new_tokens": 4}, {"repetition_penalty": 1.25})
    assert _fixture_generation(fx)["repetition_penalty"] == 1.25
    fx = _copy_with_generation(tmp_path / "b", {"repetition_penalty": 1.1}, {"repetition_penalty": 1.25})
    assert _fixture_generation(fx)["repetition_penalty"] == 1.1
    for bad in ({"no_repeat_ngram_size": 2}, {"num_beams": 2}, {"do_sample": True}):
        fx = _copy_with_generation(tmp_path / str(len(os.listdir(tmp_path))), bad)
        with pytest.raises(NotImplementedError, match=next(iter(bad))):
            _fixture_generation(fx)


@pytest.fixture(scope="module")
def variant_model(tmp_path_factory):
    from convert.engine import convert
    from paddlevl.checkpoint import load_model

    dst = str(tmp_path_factory.mktemp("pv15v") / "converted")
    convert(SRC, dst, progress=False)
    return load_model(dst, dtype="float32")


def test_golden_text_only_inputs(variant_model, tmp_path, inputs):
    """A prompt without images (upstream generate() with an empty grid): no vision arrays, image_embeds [0, H],
    logits of the plain token embeddings; the step count falls back to expected.npz's greedy_ids width."""
    import shutil

    from paddlevl.models.points.golden_v15 import golden
    from paddlevl.models.points.tokenizer import QwenTokenizer

    fx = _copy_with_generation(tmp_path, {"eos_token_id": int(inputs["eos_token_id"])})
    shutil.copy(os.path.join(FIX, "expected.npz"), os.path.join(fx, "expected.npz"))
    ids = np.asarray([QwenTokenizer.from_dir(SRC).encode("<|im_start|>user\nHi there<|im_end|>\n"
                                                         "<|im_start|>assistant\n")], dtype=np.int64)
    out = golden(variant_model, fx, {"input_ids": ids, "image_token_id": inputs["image_token_id"],
                                     "eos_token_id": inputs["eos_token_id"]})
    assert out["image_embeds"].shape == (0, variant_model.config.llm.hidden_size)
    assert "vision_tower_out" not in out
    want = variant_model.llm(paddle.to_tensor(ids)).numpy()
    assert np.abs(out["logits"] - want).max() <= 1e-5 * np.abs(want).max()
    assert out["greedy_ids"].shape[1] <= 8 and out["greedy_step_logits"].shape[0] == out["greedy_ids"].shape[1]
    with np.load(os.path.join(FIX, "expected.npz")) as z:
        if out["greedy_ids"][0, -1] != int(inputs["eos_token_id"]):
            assert out["greedy_ids"].shape == z["greedy_ids"].shape


def test_golden_per_image_and_singleton_layouts(tmp_path):
    """expected.npz may hold one array per image (image_embeds_0, vision_tower_out_1, ...) and step logits with a
    batch axis ([steps, 1, V]): the same upstream values, split/reshaped, must pass too."""
    import shutil

    dst = tmp_path / "fx"
    shutil.copytree(FIX, dst)
    with np.load(os.path.join(FIX, "expected.npz")) as z:
        exp = {k: z[k] for k in z.files}
    with np.load(os.path.join(FIX, "inputs.npz")) as z:
        grid = z["image_grid_thw"]
    patches = [int(t * h * w) for t, h, w in grid]
    for name, sizes in (("image_embeds", [n // 4 for n in patches]), ("vision_tower_out", patches)):
        for k, part in enumerate(np.split(exp.pop(name), np.cumsum(sizes)[:-1])):
            exp[f"{name}_{k}"] = part
    exp["greedy_step_logits"] = exp["greedy_step_logits"][:, None]
    np.savez(dst / "expected.npz", **exp)
    rows, _ = run_golden(str(dst), rtol=1e-4, workdir=str(tmp_path), out=None)
    assert {r.name for r in rows if r.status == "pass"} == set(exp), [r for r in rows if not r.ok]
    assert {"image_embeds_2", "vision_tower_out_0"} <= {r.name for r in rows}
