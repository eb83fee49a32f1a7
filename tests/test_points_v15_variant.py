"""POINTS-1.5 against a second upstream fixture with other sizes than the public one (tests/fixtures/points_v15_variant:
4:1 GQA with head_dim 12, ViT head_dim 24, three images hitting every smart_resize branch, multi-turn, 3 shards with a
wrong index; see its README.md)."""
import json
import os

import numpy as np
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
