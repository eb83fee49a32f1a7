"""InternLM-XComposer-2.5 inputs without a model: tokenizer, chat template, HD preprocessing, bad images.

Ground truth: tests/fixtures/ixc2d5 (copied from shared/fixtures/ixc2d5 and shared/fixtures/tokenizers, see
PROVENANCE.md), all produced by the upstream torch / transformers code."""
import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from paddlevl.models.internlm_xc2d5 import processing as P
from paddlevl.models.internlm_xc2d5.tokenizer import InternLM2Tokenizer, MappedVocabTokenizer

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "ixc2d5")


@pytest.fixture(scope="module")
def tok():
    return InternLM2Tokenizer(os.path.join(FIX, "internlm2_tokenizer.model"))


@pytest.fixture(scope="module")
def golden():
    with open(os.path.join(FIX, "ixc2d5_tokenizer_golden.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def inputs():
    return dict(np.load(os.path.join(FIX, "inputs.npz")))


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(os.path.join(FIX, "expected.npz")))


# ------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_golden_strings(tok, golden):
    assert len(golden["strings"]) >= 40
    for s in golden["strings"]:
        t = s["text"]
        assert tok.encode(t, add_special_tokens=False) == s["ids"], t
        assert tok.encode(t) == s["ids_add_special_tokens"], t
        assert tok.tokenize(t) == s["tokens"], t
        assert tok.decode(s["ids"]) == s["decoded"], t
        assert tok.decode(s["ids"], skip_special_tokens=True) == s["decoded_skip_special_tokens"], t


def test_tokenizer_special_ids(tok, golden):
    want = golden["tokenizer"]["special_ids"]
    assert tok.vocab_size == golden["tokenizer"]["vocab_size"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (want["<s>"], want["</s>"], want["pad(</s>)"])
    assert tok.im_start_id == want["[UNUSED_TOKEN_146]"] and tok.im_end_id == want["[UNUSED_TOKEN_145]"]
    # settings the upstream tokenizer relies on
    assert tok.encode("hello", False) != tok.encode(" hello", False)  # no dummy prefix
    assert all(tok.id_to_piece(i).startswith("<0x") for i in tok.encode("𠀀", False))  # byte fallback


def test_tokenizer_from_dir_reads_config(tmp_path):
    import shutil
    shutil.copy(os.path.join(FIX, "internlm2_tokenizer.model"), tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_bos_token": False}))
    t = InternLM2Tokenizer.from_dir(str(tmp_path))
    assert t.encode("Hello world") == [9843, 2028]
    # transformers 4.33: an AddedToken special token strips only where its lstrip/rstrip flags say, a plain
    # string one strips both sides
    assert t.tokenize("x <s> y") == ["x", "▁", "<s>", "▁y"]
    assert t.tokenize("x </s> y") == ["x", "</s>", "y"]
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        InternLM2Tokenizer.from_dir(str(tmp_path / "nowhere"))


def test_mapped_vocab_tokenizer(tok):
    m = MappedVocabTokenizer.from_json(tok, os.path.join(FIX, "tiny_vocab.json"))
    with open(os.path.join(FIX, "manifest.json"), encoding="utf-8") as f:
        segs = json.load(f)["inputs_built"]["text_segments"]
    for s in segs:
        assert m.encode(s["text"], s["add_special_tokens"]) == s["tiny_ids"]
        assert tok.encode(s["text"], s["add_special_tokens"]) == s["real_ids"]
    assert m.im_end_id == m.vocab_size - 2 and m.im_start_id == m.vocab_size - 1
    with pytest.raises(KeyError, match="not in the reduced vocabulary"):
        m.encode("zebra")


# ------------------------------------------------------------------------------------------- chat template
def _synthetic(size_wh, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size_wh[1], size_wh[0], 3), dtype=np.uint8))


def _compact_ids(ci):
    out = []
    for s in ci.segments:
        out.extend(s.ids if s.kind == "text" else [-1])
    return out


def test_chat_renderings_golden(tok, golden):
    meta = P.DEFAULT_META_INSTRUCTION
    seen = 0
    for r in golden["chat_renderings"]:
        call = r["call"]
        hist = [tuple(h) for h in call["history"]]
        m = meta if call["use_meta"] else ""
        if call["images"] is None:  # chat(image=None) -> build_inputs
            assert P.text_only_ids(tok, call["query"], hist, m) == r["ids"], r["name"]
            seen += 1
            continue
        imgs = [_synthetic(i["size_wh"], k) for k, i in enumerate(call["images"])]
        prompt = P.build_prompt(call["query"], hist, m)
        if len(imgs) == 1 and P.IMAGE_PLACEHOLDER not in prompt:
            prompt = P.IMAGE_PLACEHOLDER + prompt
        assert prompt == r["prompt"], r["name"]
        ci = P.interleave(tok, call["query"], imgs, hist, m, hd_num=call["hd_num"])
        assert _compact_ids(ci) == r["ids"], r["name"]
        assert [s.num_tokens for s in ci.segments if s.kind == "image"] == r["image_token_counts"]
        assert ci.total_len == r["total_len"] == ci.input_ids().shape[1]
        img_segs = [s for s in r["segments"] if s["type"] == "image"]
        for want, got in zip(img_segs, ci.images):
            assert ci.hd_num == want["hd_num"]
            assert list(got.tiles_hw) == want["tiles_hw"]
            assert [got.hd_image.shape[1], got.hd_image.shape[0]] == want["hd_size_wh"]
        seen += 1
    assert seen == len(golden["chat_renderings"]) >= 6


def test_fixture_interleaved_ids_and_im_mask(tok, inputs):
    m = MappedVocabTokenizer.from_json(tok, os.path.join(FIX, "tiny_vocab.json"))
    with open(os.path.join(FIX, "inputs", "messages.json"), encoding="utf-8") as f:
        msg = json.load(f)
    imgs = [os.path.join(FIX, p) for p in msg["images"]]
    ci = P.interleave(m, msg["query"], imgs, [tuple(h) for h in msg["history"]],
                      msg["meta_instruction"] if msg["use_meta"] else "", msg["hd_num_argument"])
    np.testing.assert_array_equal(ci.input_ids(), inputs["input_ids"])
    np.testing.assert_array_equal(ci.im_mask(), inputs["im_mask"])
    real = P.interleave(tok, msg["query"], imgs, [tuple(h) for h in msg["history"]],
                        msg["meta_instruction"] if msg["use_meta"] else "", msg["hd_num_argument"])
    np.testing.assert_array_equal(real.input_ids(), inputs["input_ids_real"])
    for k, img in enumerate(ci.images):
        np.testing.assert_array_equal(img.hd_image, inputs[f"image_hd_{k}"])
        assert np.abs(img.pixel_values - inputs[f"pixel_values_{k}"]).max() <= 1e-6
        np.testing.assert_array_equal(np.asarray(img.tiles_hw), inputs[f"image_tiles_hw_{k}"])


# ------------------------------------------------------------------------------------------- HD / crops
def test_global_view_matches_fixture(inputs, expected):
    k = 0
    while f"pixel_values_{k}" in inputs:
        crops, (h, w) = P.vit_crops(inputs[f"pixel_values_{k}"])
        assert crops.shape == (1 + h * w, 3, 560, 560)
        if f"vit_global_input_{k}_stride8" in expected:
            assert np.abs(crops[:1, :, ::8, ::8] - expected[f"vit_global_input_{k}_stride8"]).max() <= 1e-6
        # tiles are plain row-major crops of the normalised tensor
        px = inputs[f"pixel_values_{k}"]
        np.testing.assert_array_equal(crops[1 + w], px[0, :, 560:1120, 0:560]) if h > 1 else None
        np.testing.assert_array_equal(crops[h * w], px[0, :, -560:, -560:])
        k += 1
    assert k >= 1


def test_bicubic_against_torch_when_available():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    for hw in [(560, 1120), (1680, 1120), (300, 700), (1000, 777), (2240, 560)]:
        x = (rng.standard_normal((1, 3) + hw) * 1.5).astype(np.float32)
        ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(560, 560), mode="bicubic").numpy()
        assert np.abs(P.bicubic_resize(x, 560, 560) - ref).max() <= 1e-6


@pytest.mark.parametrize("wh,hd,new_wh,tiles", [
    ((840, 360), 4, (1120, 479), (1, 2)),      # float rounding: 479 (exact integer maths would say 480)
    ((360, 840), 4, (479, 1120), (2, 1)),      # portrait: transposed, padded on the right
    ((10, 10), 24, (560, 560), (1, 1)),        # tiny image: upscaled to one tile
    ((1, 1), 24, (560, 560), (1, 1)),
    ((2000, 500), 24, (2240, 560), (1, 4)),
    ((6000, 100), 24, (6160, 102), (1, 11)),   # extreme aspect ratio still works (capped at ceil(w / 560))
    ((5000, 5000), 6, (1120, 1120), (2, 2)),
    ((1234, 777), 1, (560, 352), (1, 1)),
])
def test_hd_transform_sizes(wh, hd, new_wh, tiles):
    img = _synthetic(wh)
    new_w, new_h, transposed = P.hd_scale(*wh, hd)
    assert transposed == (wh[0] < wh[1])
    assert ((new_h, new_w) if transposed else (new_w, new_h)) == new_wh
    out = np.asarray(P.hd_transform(img, hd))
    assert (out.shape[0] // 560, out.shape[1] // 560) == tiles and out.shape[0] % 560 == 0 == out.shape[1] % 560
    assert tiles[0] * tiles[1] <= max(hd, 1)
    if transposed:  # white padding on the right
        assert new_wh[0] < out.shape[1] and (out[:, new_wh[0]:] == 255).all()
    elif new_wh[1] < out.shape[0]:  # white padding at the bottom
        assert (out[new_wh[1]:] == 255).all()


def test_hd_transform_pixels_match_pil_bilinear():
    img = _synthetic((840, 360), seed=5)
    out = np.asarray(P.hd_transform(img, 4))
    ref = np.asarray(img.resize((1120, 479), Image.BILINEAR))
    np.testing.assert_array_equal(out[:479], ref)
    port = np.asarray(P.hd_transform(img.transpose(Image.TRANSPOSE), 4))
    np.testing.assert_array_equal(port, out.transpose(1, 0, 2))


def test_multi_image_forces_hd_num_6(tok):
    imgs = [_synthetic((3000, 2000)), _synthetic((800, 800))]
    ci = P.interleave(tok, "a <ImageHere> b <ImageHere>", imgs, hd_num=24)
    assert ci.hd_num == 6
    for img in ci.images:
        assert img.tiles_hw[0] * img.tiles_hw[1] <= 6
    assert P.interleave(tok, "x", [imgs[0]], hd_num=24).images[0].tiles_hw == (4, 6)


def test_image_modes_converted(tmp_path):
    base = _synthetic((600, 400), seed=7)
    ref = P.process_image(base, 6).pixel_values
    for mode in ("RGBA", "L", "P", "LA", "CMYK"):
        path = tmp_path / f"im_{mode}.png" if mode != "CMYK" else tmp_path / "im.jpg"
        base.convert(mode).save(path)
        got = P.process_image(str(path), 6)
        assert got.pixel_values.shape == ref.shape and got.pixel_values.dtype == np.float32
        want = P.normalize(np.asarray(P.hd_transform(Image.open(path).convert("RGB"), 6)))
        np.testing.assert_array_equal(got.pixel_values, want)


def test_bad_images(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        P.process_image(str(tmp_path / "missing.png"), 24)
    good = tmp_path / "good.png"
    _synthetic((300, 200)).save(good)
    data = good.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="trunc.png"):
        P.process_image(str(tmp_path / "trunc.png"), 24)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="text.png"):
        P.process_image(str(tmp_path / "text.png"), 24)
    with pytest.raises(ValueError, match="aspect ratio too extreme"):
        P.process_image(_synthetic((20000, 1)), 24)
    with pytest.raises(ValueError, match="hd_num=0"):
        P.process_image(_synthetic((100, 100)), 0)
    with pytest.raises(ValueError, match="multiples of the 560"):
        P.process_image(np.zeros((1, 3, 500, 560), np.float32), 24)


def test_too_many_images_truncated_like_upstream(tok):
    imgs = [_synthetic((1680, 1120), seed=i) for i in range(7)]  # 6 tiles each at hd_num 6 -> 2861 tokens
    with pytest.warns(UserWarning, match="max_length"):
        ci = P.interleave(tok, "".join("<ImageHere>" for _ in imgs) + "compare", imgs, max_length=16384)
    assert ci.input_ids().shape[1] == 16384
    assert len(ci.images) == 6  # upstream stops encoding once the running length passed max_length


def test_marker_count_mismatch_warns_like_upstream(tok):
    imgs = [_synthetic((300, 300), 0), _synthetic((300, 300), 1)]
    with pytest.warns(UserWarning, match="1 <ImageHere> marker"):
        ci = P.interleave(tok, "only one <ImageHere> here", imgs)
    kinds = [s.kind for s in ci.segments]
    assert kinds == ["text", "image", "text", "image"]  # image k after part k, as upstream
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        P.interleave(tok, "no marker", [imgs[0]])  # a single image without a marker is the normal case


def test_vit_crops_tiles_row_major():
    rng = np.random.default_rng(11)
    px = rng.standard_normal((1, 3, 2 * 560, 3 * 560)).astype(np.float32)
    crops, (h, w) = P.vit_crops(px)
    assert (h, w) == (2, 3) and crops.shape == (7, 3, 560, 560)
    for r in range(h):
        for c in range(w):
            np.testing.assert_array_equal(crops[1 + r * w + c], px[0, :, r * 560:(r + 1) * 560, c * 560:(c + 1) * 560])
    np.testing.assert_array_equal(crops[0], P.bicubic_resize(px, 560, 560)[0])
