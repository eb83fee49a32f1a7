"""InternLM-XComposer-2.5 on a second upstream fixture with other dimensions and inputs (tests/fixtures/ixc2d5_variant,
see its README.md / PROVENANCE.md): two images (hd_num 6 rule, a portrait one padded on the right), markers and a
history turn, GQA g=3 with head_dim 8 and biases, dynamic NTK active (factor 3), another CLIP width, one .bin file."""
import json
import os

import numpy as np
import pytest

from paddlevl.models.internlm_xc2d5 import processing as P
from paddlevl.models.internlm_xc2d5.tokenizer import InternLM2Tokenizer, MappedVocabTokenizer

HERE = os.path.join(os.path.dirname(__file__), "fixtures")
FIX = os.path.join(HERE, "ixc2d5_variant")
TOKENIZER = os.path.join(HERE, "ixc2d5", "internlm2_tokenizer.model")


def _json(*parts):
    with open(os.path.join(FIX, *parts), encoding="utf-8") as f:
        return json.load(f)


def test_variant_parity_every_row_passes():
    from paddlevl.parity import run_golden
    rows, _ = run_golden(FIX, out=None)
    names = {r.name for r in rows}
    assert names >= {"logits", "image_embeds", "greedy_ids", "greedy_step_logits", "greedy_ids_rep_penalty_1005",
                     "greedy_ids_real", "image_token_counts"}
    assert all(r.status == "pass" for r in rows), [(r.name, r.status, r.max_rel) for r in rows]


def test_variant_exercises_what_the_public_fixture_does_not():
    cfg = _json("source", "config.json")
    with np.load(os.path.join(FIX, "inputs.npz")) as z:
        seq = z["input_ids"].shape[1]
        tiles = [tuple(z[f"image_tiles_hw_{k}"]) for k in range(2)]
    assert seq > cfg["max_position_embeddings"] and cfg["rope_scaling"]["type"] == "dynamic"  # NTK active
    assert cfg["num_attention_heads"] // cfg["num_key_value_heads"] == 3 and cfg["bias"] is True
    assert tiles == [(2, 1), (1, 2)]  # portrait (right padding) and landscape


def test_variant_preprocessing_and_ids_match_upstream():
    real = InternLM2Tokenizer(TOKENIZER)
    tok = MappedVocabTokenizer.from_json(real, os.path.join(FIX, "tiny_vocab.json"))
    msg = _json("inputs", "messages.json")
    imgs = [os.path.join(FIX, p) for p in msg["images"]]
    hist = [tuple(h) for h in msg["history"]]
    with np.load(os.path.join(FIX, "inputs.npz")) as z:
        inputs = {k: z[k] for k in z.files}
    ci = P.interleave(tok, msg["query"], imgs, hist, "", msg["hd_num_argument"])
    assert ci.hd_num == 6  # two images: upstream forces hd_num 6 whatever the caller passed
    np.testing.assert_array_equal(ci.input_ids(), inputs["input_ids"])
    np.testing.assert_array_equal(ci.im_mask(), inputs["im_mask"])
    np.testing.assert_array_equal(P.interleave(real, msg["query"], imgs, hist, "", msg["hd_num_argument"])
                                  .input_ids(), inputs["input_ids_real"])
    assert len(ci.images) == 2
    for k, img in enumerate(ci.images):
        np.testing.assert_array_equal(img.hd_image, inputs[f"image_hd_{k}"])
        assert np.abs(img.pixel_values - inputs[f"pixel_values_{k}"]).max() <= 1e-6
        np.testing.assert_array_equal(np.asarray(img.tiles_hw), inputs[f"image_tiles_hw_{k}"])
    # the portrait image is padded on the right with white: the last columns of the HD image are 255
    assert (inputs["image_hd_0"][:, -8:] == 255).all() and not (inputs["image_hd_0"][-8:, :] == 255).all()
