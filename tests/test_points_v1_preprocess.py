"""POINTS 1.0: CATTY splitting, CLIP preprocessing and the chat prompt against the upstream fixture."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from paddlevl.models.points.catty_v1 import catty_plan, grid_candidates, split_image, split_image_with_catty
from paddlevl.models.points.processing_v1 import (CLIPImageProcessor, PointsV1Processor, build_prompt, load_image)
from paddlevl.models.points.tokenizer import QwenTokenizer

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "points_qwen2_5")
SRC = os.path.join(FIX, "source")


def _vision_config():
    with open(os.path.join(SRC, "config.json")) as f:
        return json.load(f)["vision_config"]


def _processor():
    vc = _vision_config()
    grid = vc["image_size"] // vc["patch_size"]
    return PointsV1Processor(QwenTokenizer.from_dir(SRC), CLIPImageProcessor.from_dir(SRC), vc["image_size"],
                             (grid // 2) ** 2)


with open(os.path.join(FIX, "catty_golden.json")) as _f:
    CATTY_CASES = json.load(_f)["cases"]


@pytest.mark.parametrize("case", CATTY_CASES, ids=lambda c: f"{c['image_size'][0]}x{c['image_size'][1]}-M{c['max_splits']}")
def test_catty_matches_upstream(case):
    plan = catty_plan(*case["image_size"], image_size=336, max_splits=case["max_splits"])
    assert (list(plan.stretched_to) if plan.stretched_to else None) == case["stretched_to"]
    assert list(plan.best_slices) == case["best_slices"]
    assert list(plan.resized_to) == case["resized_to"]
    assert [list(b) for b in plan.crop_boxes] == case["crop_boxes"]
    assert plan.num_crops == case["num_crops_with_thumbnail"]


def test_catty_crops_are_pixels_of_the_resized_image():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (500, 700, 3), dtype=np.uint8))
    case = next(c for c in CATTY_CASES if c["image_size"] == [700, 500] and c["max_splits"] == 8)
    crops = split_image_with_catty(img, 336, 8)
    resized = np.asarray(img.resize(tuple(case["resized_to"]), resample=Image.BILINEAR))
    assert len(crops) == case["num_crops_with_thumbnail"]
    for crop, (x0, y0, x1, y1) in zip(crops, case["crop_boxes"]):
        np.testing.assert_array_equal(np.asarray(crop), resized[y0:y1, x0:x1])
    thumb = Image.fromarray(resized).resize((336, 336), resample=Image.BILINEAR)
    np.testing.assert_array_equal(np.asarray(crops[-1]), np.asarray(thumb))  # thumbnail of the RESIZED image, last


def test_catty_without_resize_refuses_extreme_aspect():
    with pytest.raises(ValueError, match="aspect ratio"):
        catty_plan(3000, 200, 336, 8, do_resize=False)


def test_grid_candidates_order():
    table = grid_candidates(8)
    assert list(table)[:4] == [1.0, 0.5, 2.0, 1 / 3]
    assert table[1.0] == [(1, 1), (2, 2)] and table[2.0] == [(2, 1), (4, 2)]


def test_split_image_non_catty():
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (360, 900, 3), dtype=np.uint8))
    crops = split_image(img, 336, 8)
    # ratio 2.5 is as far from 2 as from 3: the first ratio inserted (2.0) wins; area picks (2, 1) over (4, 2)
    resized = np.asarray(img.resize((672, 336), resample=Image.BILINEAR))
    assert len(crops) == 3
    np.testing.assert_array_equal(np.asarray(crops[0]), resized[:, :336])
    np.testing.assert_array_equal(np.asarray(crops[1]), resized[:, 336:])
    # here the thumbnail is of the ORIGINAL image
    np.testing.assert_array_equal(np.asarray(crops[2]), np.asarray(img.resize((336, 336), resample=Image.BILINEAR)))


def test_pixel_values_and_input_ids_from_inputs():
    ref = np.load(os.path.join(FIX, "inputs.npz"))
    with open(os.path.join(FIX, "inputs", "prompt.txt")) as f:
        prompt = f.read()
    with open(os.path.join(FIX, "inputs", "messages.json")) as f:
        msg = json.load(f)
    proc = _processor()
    out = proc(os.path.join(FIX, "inputs", msg["image"]), prompt, catty=msg["catty"], max_splits=msg["max_splits"])
    assert out.pixel_values.shape == ref["pixel_values"].shape
    assert np.abs(out.pixel_values - ref["pixel_values"]).max() <= 1e-6
    np.testing.assert_array_equal(out.input_ids, ref["input_ids"])
    np.testing.assert_array_equal(out.attention_mask, ref["attention_mask"])
    assert proc.image_token_id == int(ref["image_token_id"]) and proc.eos_token_id == int(ref["eos_token_id"])


def test_prompt_layout():
    text = build_prompt("hi", 2, 3)
    assert text == "<|im_start|>user\n" + "<|image_pad|>" * 6 + "hi<|im_end|>\n<|im_start|>assistant\n"


def test_clip_processor_general_path_resize_and_crop():
    """A non-square input goes through shortest-edge resize (BICUBIC) and a center crop like CLIPImageProcessor."""
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8))
    p = CLIPImageProcessor(size=20, crop_size=(20, 20))
    x = p.preprocess([img])
    resized = np.asarray(img.resize((35, 20), resample=Image.BICUBIC))  # int(20 * 70 / 40) = 35
    crop = resized[:, 7:27]
    want = ((crop.astype(np.float64) / 255).astype(np.float32) - np.float32(p.image_mean)) / np.float32(p.image_std)
    np.testing.assert_allclose(x[0], want.transpose(2, 0, 1), atol=1e-6)


# ----------------------------------------------------------------------------------------------- bad input
def _run(proc, img):
    out = proc(img, "What is this?")
    assert out.pixel_values.shape[1:] == (3, proc.image_size, proc.image_size)
    assert np.isfinite(out.pixel_values).all()
    assert int((out.input_ids == proc.image_token_id).sum()) == out.num_crops * proc.tokens_per_crop
    return out


def test_one_pixel_image_is_upscaled():
    out = _run(_processor(), Image.new("RGB", (1, 1), (200, 100, 50)))
    assert out.num_crops == 2  # one tile + thumbnail


@pytest.mark.parametrize("size", [(3000, 1), (1, 3000), (5000, 20)])
def test_extreme_aspect_is_stretched(size):
    out = _run(_processor(), Image.new("RGB", size, (1, 2, 3)))
    assert out.num_crops == 9  # stretched to 8:1 -> 8 tiles + thumbnail


@pytest.mark.parametrize("mode", ["RGBA", "L", "CMYK", "P", "LA", "1"])
def test_other_modes_are_converted_per_crop(mode):
    rng = np.random.default_rng(2)
    rgb = Image.fromarray(rng.integers(0, 256, (120, 200, 3), dtype=np.uint8))
    img = rgb.convert(mode)
    proc = _processor()
    out = _run(proc, img)
    # upstream order: CATTY on the image as given, then each crop converted to RGB by the processor
    want = proc.image_processor.preprocess([c.convert("RGB") for c in split_image_with_catty(img, 336, 8)])
    np.testing.assert_array_equal(out.pixel_values, want)


def test_truncated_image_file(tmp_path):
    with open(os.path.join(FIX, "inputs", "image.png"), "rb") as f:
        data = f.read()
    bad = tmp_path / "cut.png"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png"):
        load_image(str(bad))


def test_not_an_image_and_missing_file(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="notes.png"):
        load_image(str(bad))
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        load_image(str(tmp_path / "nothere.png"))


def test_prompt_with_image_token_is_refused():
    with pytest.raises(ValueError, match="image_pad"):
        _processor()(Image.new("RGB", (336, 336)), "look <|image_pad|> here")


def test_image_over_the_pixel_limit_is_refused(tmp_path, monkeypatch):
    """PIL's decompression-bomb guard (2x Image.MAX_IMAGE_PIXELS) surfaces as a clear error naming the file."""
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="big.png"):
        load_image(str(path))
