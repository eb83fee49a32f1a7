"""POINTS-1.5 preprocessing and prompt building against the upstream fixture; bad image inputs."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from paddlevl.models.points.processing_v15 import (ImageError, ImageProcessorV15, construct_prompt, load_image,
                                                   smart_resize)
from paddlevl.models.points.tokenizer import QwenTokenizer

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "points_v15")
SRC = os.path.join(FIX, "source")
with open(os.path.join(FIX, "points_v15_tokenizer_golden.json"), encoding="utf-8") as _f:
    GOLDEN = json.load(_f)
REAL_MIN, REAL_MAX = 3136, 12845056  # the release preprocessor_config.json


@pytest.fixture(scope="module")
def proc():
    return ImageProcessorV15.from_dir(SRC)


@pytest.fixture(scope="module")
def inputs():
    with np.load(os.path.join(FIX, "inputs.npz")) as z:
        return {k: z[k] for k in z.files}


def _messages():
    with open(os.path.join(FIX, "inputs", "messages.json"), encoding="utf-8") as f:
        return json.load(f)


def test_processor_config_read_from_file(proc):
    with open(os.path.join(SRC, "preprocessor_config.json")) as f:
        cfg = json.load(f)
    assert (proc.min_pixels, proc.max_pixels) == (cfg["min_pixels"], cfg["max_pixels"])
    assert list(proc.image_mean) == cfg["image_mean"] and list(proc.image_std) == cfg["image_std"]
    assert proc.resample == cfg["resample"] and proc.rescale_factor == cfg["rescale_factor"]


def test_reproduces_inputs_npz(proc, inputs):
    p = construct_prompt(_messages(), proc, base_dir=FIX)
    pixels = np.concatenate(p.pixel_values)
    assert pixels.dtype == np.float32 and pixels.shape == inputs["pixel_values"].shape
    assert np.abs(pixels - inputs["pixel_values"]).max() <= 1e-6
    np.testing.assert_array_equal(np.asarray(p.grid_thw), inputs["image_grid_thw"])
    with open(os.path.join(FIX, "inputs", "rendered_prompt.txt"), encoding="utf-8") as f:
        assert p.prompt == f.read()
    ids = QwenTokenizer.from_dir(SRC).encode(p.prompt)
    np.testing.assert_array_equal(np.asarray([ids]), inputs["input_ids"])


@pytest.mark.parametrize("conv", GOLDEN["points_chat_prompts"]["conversations"], ids=lambda c: c["name"])
def test_golden_prompts_with_release_pixel_limits(conv):
    """Multi-image and multi-turn prompts rendered by upstream with the release min/max pixels."""
    proc = ImageProcessorV15(min_pixels=REAL_MIN, max_pixels=REAL_MAX)
    images = {k: Image.new("RGB", tuple(wh), (200, 30, 30)) for k, wh in conv["image_sizes_wh"].items()}
    messages = [{"role": m["role"], "content": [dict(it, image=images[it["image"]]) if it["type"] == "image" else it
                                                for it in m["content"]]} for m in conv["messages"]]
    p = construct_prompt(messages, proc)
    assert [list(g) for g in p.grid_thw] == conv["image_grid_thw"]
    assert p.prompt == conv["rendered_prompt"]
    assert [len(x) for x in p.pixel_values] == [t * h * w for t, h, w in conv["image_grid_thw"]]


def test_smart_resize_rounding_rules():
    # Python round is half-to-even: a 70 px side (2.5 x 28) becomes 56, not 84
    assert smart_resize(70, 700, 28, REAL_MIN, REAL_MAX) == (56, 700)
    assert smart_resize(98, 700, 28, REAL_MIN, REAL_MAX) == (112, 700)  # round(3.5) = 4
    # sides under 28 px are accepted (stock Qwen2-VL raises) and grown to min_pixels
    assert smart_resize(1, 1, 28, REAL_MIN, REAL_MAX) == (56, 56)
    assert smart_resize(10, 1000, 28, REAL_MIN, REAL_MAX) == (28, 560)  # h_bar 0 -> min branch, beta 0.56
    # over max_pixels: floor after scaling down
    h, w = smart_resize(4000, 5000, 28, REAL_MIN, REAL_MAX)
    assert h * w <= REAL_MAX and h % 28 == 0 and w % 28 == 0 and (h, w) == (3192, 4004)


def test_fixture_image_patch_layout(proc):
    """Row r of pixel_values = patch (t, block_h, block_w, 2, 2) with columns (C, T, 14, 14)."""
    img = load_image(os.path.join(FIX, "inputs", "image_0.png"))
    pixels, (t, gh, gw) = proc(img)
    rh, rw = gh * 14, gw * 14
    x = np.asarray(img.resize((rw, rh), Image.BICUBIC)).astype(np.float64) / 255
    x = ((x.astype(np.float32) - np.float32(proc.image_mean)) / np.float32(proc.image_std)).transpose(2, 0, 1)
    # patch of the 2x2 block (1, 2), inner (1, 0) -> pixel rows 14*(2*1+1), cols 14*(2*2+0)
    r = (1 * (gw // 2) + 2) * 4 + 1 * 2 + 0
    want = x[:, 14 * 3:14 * 4, 14 * 4:14 * 5]
    got = pixels[r].reshape(3, 2, 14, 14)
    np.testing.assert_array_equal(got[:, 0], want)
    np.testing.assert_array_equal(got[:, 1], want)


# ------------------------------------------------------------------------------------------------ bad inputs
def _rgb(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_unreadable_file(tmp_path, proc):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"this is text, not a picture")
    with pytest.raises(ImageError, match="not_an_image.png"):
        proc(str(bad))
    with pytest.raises(ImageError, match="not found"):
        proc(str(tmp_path / "missing.png"))


def test_truncated_file(tmp_path, proc):
    full = tmp_path / "full.png"
    _rgb(300, 200).save(full)
    data = full.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png"):
        proc(str(cut))


def test_one_pixel_image_works(proc):
    pixels, grid = proc(Image.new("RGB", (1, 1), (255, 0, 0)))
    assert grid == (1, 4, 4) and pixels.shape == (16, 1176)  # grown to 56 x 56 as upstream
    assert np.isfinite(pixels).all()


def test_extreme_aspect_ratio(proc):
    with pytest.raises(ImageError, match="aspect ratio must be smaller than 200"):
        proc(Image.new("RGB", (201 * 28, 28)))
    # exactly 200:1 passes the check (release pixel limits: the tiny fixture max cannot hold such a strip)
    _, grid = ImageProcessorV15(min_pixels=REAL_MIN, max_pixels=REAL_MAX)(Image.new("RGB", (200 * 28, 28)))
    assert grid == (1, 2, 400)
    # a side under 28 px skips the check (POINTS variant) and works
    _, grid = proc(Image.new("RGB", (3000, 10)))
    assert grid[1] >= 2


def test_too_elongated_to_fit_max_pixels_fails_clearly(proc):
    # upstream would hand PIL a zero-height size; we say why
    with pytest.raises(ImageError, match="too elongated"):
        proc(Image.new("RGB", (20000, 20)))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16"])
def test_other_modes_convert_like_pil(mode, proc):
    base = _rgb(90, 60, seed=1)
    img = base.convert(mode) if mode != "I;16" else base.convert("L").convert("I;16")
    if mode == "RGBA":
        img.putalpha(Image.fromarray(np.full((60, 90), 7, dtype=np.uint8)))
    got, grid = proc(img)
    want, grid2 = proc(img.convert("RGB"))  # upstream: Image.open(path).convert('RGB')
    assert grid == grid2
    np.testing.assert_array_equal(got, want)


def test_rgba_file_alpha_is_dropped(tmp_path, proc):
    rgb = _rgb(64, 48, seed=2)
    rgba = rgb.copy()
    rgba.putalpha(0)  # fully transparent: colours are kept, no compositing (as PIL convert / upstream)
    rgba.save(tmp_path / "a.png")
    got, _ = proc(str(tmp_path / "a.png"))
    want, _ = proc(rgb)
    np.testing.assert_array_equal(got, want)


def test_large_image_is_resized_under_max_pixels(proc):
    pixels, (t, gh, gw) = proc(_rgb(1200, 900))
    assert gh * gw * 14 * 14 <= proc.max_pixels and gh % 2 == 0 and gw % 2 == 0
    assert pixels.shape == (gh * gw, 1176)


def test_decompression_bomb_limit_fails_clearly(tmp_path, monkeypatch, proc):
    path = tmp_path / "big.png"
    _rgb(400, 300).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses images over 2x this
    with pytest.raises(ImageError, match="too large"):
        proc(str(path))


def test_unknown_item_type(proc):
    with pytest.raises(ValueError, match="unknown content item type"):
        construct_prompt([{"role": "user", "content": [{"type": "video", "video": "x.mp4"}]}], proc)


def test_text_only_and_string_content(proc):
    p = construct_prompt([{"role": "user", "content": "Hi"}], proc)
    assert p.prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" and p.pixel_values == []
