"""Qwen-VL preprocessing: our tokenizer + chat template + image transform reproduce the fixture's inputs.npz from
inputs/ (the prompt names its image relative to the fixture root), and bad inputs fail clearly or work as upstream."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from paddlevl.models.qwen_vl.chat_format import make_context
from paddlevl.models.qwen_vl.config import parse_config
from paddlevl.models.qwen_vl.processing import (ImageLoadError, QwenVLProcessor, find_image_spans, image_transform,
                                                load_image)
from paddlevl.models.qwen_vl.tokenizer import QWenTokenizer

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "qwen_vl")
SRC = os.path.join(FIX, "source")


@pytest.fixture(scope="module")
def tok():
    return QWenTokenizer.from_pretrained(SRC)


@pytest.fixture(scope="module")
def cfg():
    with open(os.path.join(SRC, "config.json")) as f:
        return parse_config(json.load(f))


@pytest.fixture(scope="module")
def inputs():
    with np.load(os.path.join(FIX, "inputs.npz")) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def messages():
    with open(os.path.join(FIX, "inputs", "messages.json"), encoding="utf-8") as f:
        return json.load(f)


def test_special_ids_follow_the_vocabulary(tok, cfg):
    manifest = json.load(open(os.path.join(FIX, "manifest.json")))
    for name, i in manifest["config_summary"]["special ids"].items():
        assert tok.special_tokens[name] == i
    assert tok.img_start_id == cfg.visual.image_start_id
    assert len(tok) <= cfg.vocab_size


def test_prompt_and_ids(tok, messages, inputs):
    query = tok.from_list_format(messages["query_list_format"])
    assert query == messages["query"]
    raw, ids = make_context(tok, query, messages["history"], messages["system"])
    with open(os.path.join(FIX, "inputs", "prompt.txt"), encoding="utf-8") as f:
        assert raw == f.read()
    assert ids == inputs["input_ids"][0].tolist()
    _, text_ids = make_context(tok, messages["text_only_query"], [], messages["system"])
    assert text_ids == inputs["text_only_input_ids"][0].tolist()


def test_pixels_and_spans(tok, cfg, messages, inputs):
    _, ids = make_context(tok, messages["query"], [], messages["system"])
    proc = QwenVLProcessor(tok, cfg.visual.image_size, cfg.visual.image_start_id, base_dir=FIX)
    out = proc(ids)
    assert out["image_paths"] == ["inputs/image1.png"]
    assert np.array_equal(out["image_spans"][:, 1:], inputs["image_spans"])
    assert np.array_equal(out["input_ids"], inputs["input_ids"])
    assert np.array_equal(out["attention_mask"], inputs["attention_mask"])
    assert out["pixel_values"].dtype == np.float32
    assert out["pixel_values"].shape == inputs["pixel_values"].shape
    assert np.abs(out["pixel_values"] - inputs["pixel_values"]).max() <= 1e-6


def test_relative_path_uses_cwd(tok, cfg, messages, inputs, monkeypatch):
    monkeypatch.chdir(FIX)  # upstream opens the path relative to the working directory
    _, ids = make_context(tok, messages["query"], [], messages["system"])
    out = QwenVLProcessor(tok, cfg.visual.image_size)(ids)
    assert np.abs(out["pixel_values"] - inputs["pixel_values"]).max() <= 1e-6


def test_several_images_in_order(tok, cfg, tmp_path):
    paths = []
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        p = tmp_path / f"im{i}.png"
        Image.new("RGB", (30 + 10 * i, 20), color).save(p)
        paths.append(str(p))
    q = tok.from_list_format([{"image": p} for p in paths] + [{"text": "compare"}])
    _, ids = make_context(tok, q, [("Picture 1:<img>%s</img>\nfirst" % paths[2], "ok")], "sys")
    out = QwenVLProcessor(tok, cfg.visual.image_size)(ids)
    assert out["image_paths"] == [paths[2]] + paths
    assert out["pixel_values"].shape[0] == 4 and len(out["image_spans"]) == 4
    # channel means identify the picture: blue, red, green, blue
    means = out["pixel_values"].mean(axis=(2, 3)).argmax(axis=1).tolist()
    assert means == [2, 0, 1, 2]
    for row, a, b in out["image_spans"].tolist():
        assert row == 0 and b - a == 257 and ids[a] == tok.img_start_id and ids[b] == tok.img_end_id


@pytest.mark.parametrize("mode", ["RGBA", "L", "CMYK", "P", "I;16"])
def test_other_modes_convert_like_upstream(tmp_path, mode):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8))
    img = rgb.convert(mode) if mode not in ("RGBA", "I;16") else (
        Image.fromarray(rng.integers(0, 255, (37, 53, 4), dtype=np.uint8), "RGBA") if mode == "RGBA"
        else Image.fromarray(rng.integers(0, 65535, (37, 53), dtype=np.uint16)))
    ext = "tif" if mode in ("CMYK", "I;16") else "png"
    path = tmp_path / f"x.{ext}"
    img.save(path)
    loaded = load_image(str(path))
    assert loaded.mode == "RGB" and loaded.size == (53, 37)
    want = Image.open(path).convert("RGB")  # upstream: Image.open(path).convert("RGB"), alpha simply dropped
    assert np.array_equal(np.asarray(loaded), np.asarray(want))
    x = image_transform(loaded, 28)
    assert x.shape == (3, 28, 28) and x.dtype == np.float32


def test_missing_image_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="image file not found.*nope.png"):
        load_image(str(tmp_path / "nope.png"))


def test_non_image_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(str(p))
    p2 = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
    p2.write_bytes((tmp_path / "full.png").read_bytes()[:60])
    with pytest.raises(ImageLoadError):
        load_image(str(p2))


def test_url_without_network_is_a_clear_error():
    with pytest.raises(ImageLoadError, match="cannot download image"):
        load_image("http://127.0.0.1:9/x.png", timeout=2)


def test_path_length_limits(tok, cfg, tmp_path):
    proc = QwenVLProcessor(tok, cfg.visual.image_size)
    ok = "a" * 254
    _, ids = make_context(tok, f"<img>{ok}</img>", [], "")
    assert proc.images_from_ids([ids])[0] == [ok]
    for n in (255, 256):  # the tokenizer accepts them, the upstream model cannot read them
        _, ids = make_context(tok, f"<img>{'a' * n}</img>", [], "")
        with pytest.raises(ValueError, match="at most 254 bytes"):
            proc.images_from_ids([ids])
    with pytest.raises(ValueError, match="too long"):
        make_context(tok, f"<img>{'a' * 257}</img>", [], "")


def test_unclosed_image_tag(tok):
    with pytest.raises(ValueError, match="Unclosed image token"):
        make_context(tok, "Picture 1:<img>a.png\nwhat?", [], "")
    with pytest.raises(ValueError, match="unbalanced image tags"):
        find_image_spans([1, tok.img_start_id, 2], tok.img_start_id)
