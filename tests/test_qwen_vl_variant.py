"""Qwen-VL on a second upstream fixture with other sizes and layouts (tests/fixtures/qwen_vl_variant, see its
README): 8 x 8 patch grid (positional tables downsampled), 3 layers, 2 heads, NTK alpha 7, two images plus a history
turn, a non-ASCII image path, sharded safetensors, and a repetition penalty in generation_config.json.
Also the golden hook's handling of the other inputs.npz / expected.npz layouts the fixture format allows."""
import json
import os

import numpy as np

from paddlevl.models.qwen_vl.chat_format import make_context
from paddlevl.models.qwen_vl.config import parse_config
from paddlevl.models.qwen_vl.golden import _as_layout, _pixel_values
from paddlevl.models.qwen_vl.processing import QwenVLProcessor
from paddlevl.models.qwen_vl.tokenizer import QWenTokenizer
from paddlevl.parity import REQUIRED, run_golden

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "qwen_vl_variant")
SRC = os.path.join(FIX, "source")


def test_variant_golden_parity(tmp_path):
    rows, outputs = run_golden(FIX, rtol=1e-4, workdir=str(tmp_path), out=None)
    status = {r.name: r.status for r in rows}
    assert all(status[k] == "pass" for k in REQUIRED), status
    assert all(s == "pass" for s in status.values()), status  # vit features, text-only and step logits too
    with np.load(os.path.join(FIX, "expected.npz")) as z:
        assert outputs["greedy_ids"].tolist() == z["greedy_ids"].tolist()


def test_variant_fixture_exercises_what_it_claims():
    with open(os.path.join(SRC, "config.json")) as f:
        cfg = parse_config(json.load(f))
    with open(os.path.join(SRC, "generation_config.json")) as f:
        # the greedy reference is generate(generation_config=<this file>): without the penalty ids 2..8 differ
        assert json.load(f)["repetition_penalty"] != 1.0
    with np.load(os.path.join(FIX, "inputs.npz")) as z:
        seq_len, n_images = z["input_ids"].shape[1], z["pixel_values"].shape[0]
    assert cfg.visual.grid not in (16, 32) and n_images == 2
    assert 2 * cfg.seq_length < seq_len <= 4 * cfg.seq_length  # NTK alpha 7
    assert cfg.visual.image_size % cfg.visual.patch_size  # the conv drops the remainder
    assert not any(f.endswith(".bin") for f in os.listdir(SRC))


def test_variant_preprocessing_reproduces_inputs():
    tok = QWenTokenizer.from_pretrained(SRC)
    with open(os.path.join(SRC, "config.json")) as f:
        cfg = parse_config(json.load(f))
    with open(os.path.join(FIX, "inputs", "messages.json"), encoding="utf-8") as f:
        msg = json.load(f)
    with np.load(os.path.join(FIX, "inputs.npz")) as z:
        inputs = {k: z[k] for k in z.files}
    query = tok.from_list_format(msg["query_list_format"])
    assert query == msg["query"]
    history = [(tok.from_list_format(q), r) for q, r in msg["history"]]
    assert history == [tuple(h) for h in msg["history_rendered"]]
    raw, ids = make_context(tok, query, history, msg["system"])
    with open(os.path.join(FIX, "inputs", "prompt.txt"), encoding="utf-8") as f:
        assert raw == f.read()
    assert ids == inputs["input_ids"][0].tolist()
    _, text_ids = make_context(tok, msg["text_only_query"], [], msg["system"])
    assert text_ids == inputs["text_only_input_ids"][0].tolist()
    out = QwenVLProcessor(tok, cfg.visual.image_size, cfg.visual.image_start_id, base_dir=FIX)(ids)
    assert out["image_paths"] == [el["image"] for el in msg["query_list_format"] if "image" in el]
    assert np.array_equal(out["image_spans"][:, 1:], inputs["image_spans"])
    assert out["pixel_values"].shape == inputs["pixel_values"].shape
    assert np.abs(out["pixel_values"] - inputs["pixel_values"]).max() <= 1e-6


def test_pixel_values_in_every_layout():
    px = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    assert np.array_equal(_pixel_values({"pixel_values": px}, 4), px)
    assert np.array_equal(_pixel_values({"pixel_values": px[0]}, 4), px[:1])
    per_image = {"pixel_values_0": px[:1], "pixel_values_1": px[1]}  # [1, 3, S, S] or [3, S, S] per image
    assert np.array_equal(_pixel_values(per_image, 4), px)
    assert _pixel_values({"input_ids": np.zeros((1, 3))}, 4).shape == (0, 3, 4, 4)


def test_outputs_take_the_fixture_layout_only_when_axes_are_singletons():
    a = np.arange(24, dtype=np.float32).reshape(1, 4, 6)
    assert _as_layout(a, (4, 6)).shape == (4, 6)
    assert _as_layout(a, None) is a
    assert _as_layout(a, (1, 4, 6)) is a
    assert _as_layout(a, (6, 4)).shape == (1, 4, 6)  # a real mismatch stays visible to the comparison


def test_step_logits_after_a_stop_word_carry_the_forced_eos(tmp_path):
    """HF generate records each step's logits after upstream's StopWordsLogitsProcessor edited them in place: once
    <|im_end|> is generated, the next recorded row has 2^15 at <|endoftext|> (checked against the upstream code on
    a fixture whose greedy decode stops early). Here <|im_end|>'s lm_head column is made to beat the first greedy
    token, so the decode is [<|im_end|>, <|endoftext|>] and stops."""
    import paddle

    from convert.engine import convert
    from paddlevl.checkpoint import load_model
    from paddlevl.models.qwen_vl.golden import golden

    dst = str(tmp_path / "converted")
    convert(SRC, dst, progress=False)
    model = load_model(dst, dtype="float32")
    tok = QWenTokenizer.from_pretrained(SRC)
    with np.load(os.path.join(FIX, "inputs.npz")) as z:
        inputs = {k: z[k] for k in z.files}
    with np.load(os.path.join(FIX, "expected.npz")) as z:
        first = int(z["greedy_ids"][0, 0])
    w = model.lm_head.weight.numpy()  # [H, V]
    w[:, tok.im_end_id] = 1.5 * w[:, first]
    model.lm_head.weight.set_value(paddle.to_tensor(w))
    out = golden(model, FIX, inputs)
    assert out["greedy_ids"].tolist() == [[tok.im_end_id, tok.eod_id]]
    steps = out["greedy_step_logits"]
    assert steps.shape == (1, 2, w.shape[1])
    assert steps[0, 1, tok.eod_id] == 2.0 ** 15 and steps[0, 0, tok.eod_id] < 100


def test_golden_stop_words_follow_the_chat_format():
    """The greedy reference uses the stop words upstream chat() builds for generation_config's chat_format."""
    from paddlevl.models.qwen_vl.golden import _eod_and_stop_words

    tok = QWenTokenizer.from_pretrained(SRC)
    eod, chatml = _eod_and_stop_words(FIX, tok.img_start_id, "chatml")
    assert eod == tok.eod_id and chatml == [[tok.im_end_id], [tok.im_start_id]]
    _, raw = _eod_and_stop_words(FIX, tok.img_start_id, "raw")
    assert raw == [tok.encode("Human:"), [tok.eod_id]]
