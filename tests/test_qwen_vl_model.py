"""Qwen-VL model parity with the upstream torch fixture, through the real converter and loader, plus chat,
streaming, stop words, NTK state, the chat session / Appflow and the examples."""
import io
import json
import os

import numpy as np
import paddle
import pytest
from PIL import Image

from paddlevl.models.qwen_vl.chat import ChatConfig, StopWordsProcessor, chat, chat_stream
from paddlevl.models.qwen_vl.golden import golden
from paddlevl.models.qwen_vl.modeling import NTK_STATE
from paddlevl.models.qwen_vl.processing import ImageLoadError
from paddlevl.models.qwen_vl.tokenizer import QWenTokenizer

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "qwen_vl")
MANIFEST = json.load(open(os.path.join(FIX, "manifest.json"), encoding="utf-8"))
RTOL = 1e-4  # max|diff| / max|ref|
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _example(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"qwen_vl_example_{name}", os.path.join(EXAMPLES, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from convert.engine import convert

    dst = str(tmp_path_factory.mktemp("qwen_vl") / "converted")
    convert(os.path.join(FIX, "source"), dst, progress=False)
    return dst


@pytest.fixture(scope="module")
def model(folder):
    from paddlevl.checkpoint import load_model

    m = load_model(folder, dtype="float32")
    m.eval()
    return m


@pytest.fixture(scope="module")
def tok(folder):
    return QWenTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def inputs():
    with np.load(os.path.join(FIX, "inputs.npz")) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def expected():
    with np.load(os.path.join(FIX, "expected.npz")) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def outputs(model, inputs):
    return golden(model, FIX, inputs)


def test_converted_folder(folder):
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["paddlevl"]["family"] == "qwen_vl"
    for name in ("qwen.tiktoken", "generation_config.json"):
        assert os.path.isfile(os.path.join(folder, name)), name


@pytest.mark.parametrize("name", ["logits", "image_embeds", "vit_features", "text_only_logits", "greedy_step_logits"])
def test_parity(outputs, expected, name):
    got, ref = outputs[name], expected[name]
    assert got.shape == ref.shape
    rel = np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max()
    assert rel <= RTOL, f"{name}: max|diff|/max|ref| = {rel:.3e}"


def test_greedy_ids(outputs, expected):
    assert outputs["greedy_ids"].tolist() == expected["greedy_ids"].tolist()


def test_ntk_alpha_fixed_at_prefill(model, inputs):
    """The fixture prompt (324 > seq_length 256) prefills with alpha 3; decode steps reuse it."""
    assert model.ntk_alpha(inputs["input_ids"].shape[1]) == MANIFEST["inputs"]["ntk_alpha_prefill"]
    assert model.ntk_alpha(inputs["text_only_input_ids"].shape[1]) == 1
    cache = model.new_cache()
    ids = paddle.to_tensor(inputs["text_only_input_ids"])
    with paddle.no_grad():
        model.forward_embeds(model.embed(ids), None, None, cache)
        assert cache.state[NTK_STATE] == 1
        # grow far past seq_length one token at a time: alpha stays the prefill's
        for _ in range(3):
            model.forward_embeds(model.embed(ids[:, :1]), None, None, cache)
    assert cache.state[NTK_STATE] == 1 and cache.seq_len == ids.shape[1] + 3


def _chat_config(folder):
    return ChatConfig.from_folder(folder)


def test_chat_equals_upstream_greedy_response(model, tok, folder):
    query = MANIFEST["inputs"]["query"]
    response, history = chat(model, tok, query, [], chat_config=_chat_config(folder), base_dir=FIX,
                             do_sample=False, max_new_tokens=8)
    assert response == MANIFEST["inputs"]["greedy_response_text (model.chat)"]
    assert history == [(query, response)]


def test_streaming(model, tok, folder, expected):
    texts = list(chat_stream(model, tok, MANIFEST["inputs"]["query"], [], chat_config=_chat_config(folder),
                             base_dir=FIX, do_sample=False, max_new_tokens=8))
    ids = expected["greedy_ids"][0].tolist()
    assert len(texts) == len(ids)
    for k, text in enumerate(texts):
        assert text == tok.decode(ids[:k + 1], skip_special_tokens=True, errors="ignore")


class Force:
    """Logits processor forcing a fixed id sequence (then leaves the logits alone)."""

    def __init__(self, ids):
        self.ids = list(ids)

    def __call__(self, generated, logits):
        n = len(generated[0])
        if n < len(self.ids):
            logits = np.full_like(logits, -1e4)
            logits[0, self.ids[n]] = 0.0
        return logits


def test_stop_word_then_eos(model, tok, folder):
    """Upstream: the stop token is emitted, then <|endoftext|> is forced (logit 2^15) and generation ends."""
    from paddlevl.models.qwen_vl.chat import generate_ids
    from paddlevl.models.qwen_vl.chat_format import make_context, stop_words_ids

    _, ctx = make_context(tok, "hi", [], "You are a helpful assistant.")
    cc = _chat_config(folder)
    gen = cc.generation(tok, do_sample=False, max_new_tokens=10)
    body = tok.encode("ok")
    out = generate_ids(model, tok, ctx, gen, stop_words_ids(tok), logits_processors=[Force(body + [tok.im_end_id])])
    assert out == body + [tok.im_end_id, tok.eod_id]
    # an extra stop word: the first greedy token stops the turn
    first = generate_ids(model, tok, ctx, gen.updated(max_new_tokens=1), stop_words_ids(tok))
    out = generate_ids(model, tok, ctx, gen, [first] + stop_words_ids(tok))
    assert out == first + [tok.eod_id]
    proc = StopWordsProcessor([[5, 6]], eos_token_id=9, prompts=[[1, 5]])
    logits = np.zeros((1, 10), np.float32)
    assert proc([[6]], logits)[0, 9] == 2 ** 15 and proc([[7]], logits)[0, 9] == 0


def test_url_image_without_network(model, tok, folder):
    with pytest.raises(ImageLoadError, match="cannot download image"):
        chat(model, tok, "Picture 1:<img>http://127.0.0.1:9/demo.jpeg</img>\nhi", [], chat_config=_chat_config(folder),
             do_sample=False, max_new_tokens=1)


def test_missing_image_in_prompt(model, tok, folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="image file not found"):
        chat(model, tok, f"Picture 1:<img>{tmp_path / 'gone.png'}</img>\nhi", [], chat_config=_chat_config(folder),
             do_sample=False, max_new_tokens=1)


def test_images_fill_their_own_spans(model, tok, tmp_path):
    """Two pictures in one prompt: span k holds exactly the features of picture k (batched encode == single)."""
    from paddlevl.models.qwen_vl.chat_format import make_context
    from paddlevl.models.qwen_vl.processing import QwenVLProcessor

    rng = np.random.default_rng(1)
    paths = []
    for i, size in enumerate([(40, 30), (17, 61)]):
        p = tmp_path / f"p{i}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    query = tok.from_list_format([{"image": paths[0]}, {"image": paths[1]}, {"text": "compare"}])
    _, ids = make_context(tok, query, [], "sys")
    v = model.config.visual
    inp = QwenVLProcessor(tok, v.image_size)(ids)
    with paddle.no_grad():
        both = model.encode_images(paddle.to_tensor(inp["pixel_values"])).numpy()
        single = [model.encode_images(paddle.to_tensor(inp["pixel_values"][k:k + 1])).numpy()[0] for k in range(2)]
        emb = model.embed_with_images(paddle.to_tensor(inp["input_ids"]), paddle.to_tensor(both),
                                      inp["image_spans"]).numpy()
        words = model.embed(paddle.to_tensor(inp["input_ids"])).numpy()
    for k, (row, a, b) in enumerate(inp["image_spans"].tolist()):
        assert np.abs(both[k] - single[k]).max() <= 1e-5 * np.abs(single[k]).max()
        assert np.array_equal(emb[row, a + 1:b], both[k])
        assert np.array_equal(emb[row, a], words[row, a]) and np.array_equal(emb[row, b], words[row, b])
    outside = np.ones(emb.shape[1], bool)
    for row, a, b in inp["image_spans"].tolist():
        outside[a + 1:b] = False
    assert np.array_equal(emb[0, outside], words[0, outside])


def _bus_picture(path):
    img = Image.new("RGB", (300, 200), (255, 255, 255))
    img.paste((200, 30, 30), (60, 50, 240, 170))
    img.save(path)


def test_chat_session_two_turns_draws_box(model, folder, tmp_path):
    """The seed README flow: describe the picture, then "框出图中公交车的位置" -> a grounding picture. The tiny random
    model cannot answer with a box by itself, so the second answer's ids are forced through the real decode loop."""
    from paddlevl.models.qwen_vl.chat import QwenVLChatSession

    _bus_picture(tmp_path / "bus.png")
    session = QwenVLChatSession(folder, model, base_dir=str(tmp_path), do_sample=False, max_new_tokens=6)
    first = session.ask("这是什么?", images=["bus.png"])
    assert first["image"] is None and len(first["history"]) == 1
    assert first["history"][0][0] == "Picture 1:<img>bus.png</img>\n这是什么?"
    answer = "<ref>公交车</ref><box>(200,250),(800,850)</box>"
    tok = session.tokenizer
    forced = Force(tok.encode(answer) + [tok.im_end_id])
    second = session.ask("框出图中公交车的位置", logits_processors=[forced], max_new_tokens=64)
    assert second["result"] == answer
    pic = second["image"]
    assert pic is not None and pic.size == (300, 200)
    px = pic.load()
    x1, y1, x2, y2 = int(200 / 1000 * 300), int(250 / 1000 * 200), int(800 / 1000 * 300), int(850 / 1000 * 200)
    ym = (y1 + y2) // 2
    for x, y in ((x1, ym), (x2, ym), ((x1 + x2) // 2, y2)):
        assert px[x, y] != (255, 255, 255) and px[x, y] != (200, 30, 30), (x, y, px[x, y])
    session.reset()
    assert session.history == []


def test_appflow(folder, tmp_path, monkeypatch):
    from paddlevl.appflow import Appflow

    _bus_picture(tmp_path / "bus.png")
    monkeypatch.chdir(tmp_path)
    task = Appflow(app="image2text_generation", models=[folder])
    out = task(image="bus.png", prompt="这是什么?", do_sample=False, max_new_tokens=4)
    assert isinstance(out["result"], str) and len(out["history"]) == 1
    out2 = task(prompt="框出图中公交车的位置", do_sample=False, max_new_tokens=4)
    assert len(out2["history"]) == 2 and out2["history"][1][0] == "框出图中公交车的位置"


def test_run_predict_example(folder, tmp_path, monkeypatch, capsys):
    rp = _example("run_predict")
    _bus_picture(tmp_path / "bus.png")
    monkeypatch.chdir(tmp_path)
    argv = ["--model_name_or_path", folder, "--input_image", "bus.png", "--prompt",
            "Generate the caption in English with grounding:", "--dtype", "float32", "--seed", "7",
            "--output_dir", str(tmp_path / "out"), "--max_new_tokens", "4", "--greedy"]
    res = rp.predict(rp.build_parser().parse_args(argv))
    assert "response:" in capsys.readouterr().out
    assert isinstance(res["response"], str) and res["picture"] is None
    # a grounded answer (forced through the decode loop: the tiny model cannot ground) saves OUTPUT_DIR/pred.jpg
    tok = QWenTokenizer.from_pretrained(folder)
    answer = "A <ref>bus</ref><box>(100,100),(900,900)</box>"
    argv[argv.index("--max_new_tokens") + 1] = "64"
    forced = Force(tok.encode(answer) + [tok.im_end_id])
    res = rp.predict(rp.build_parser().parse_args(argv), logits_processors=[forced])
    assert res["response"] == answer and res["picture"] == str(tmp_path / "out" / "pred.jpg")
    pic = Image.open(res["picture"]).convert("RGB")
    assert pic.size == (300, 200)
    px = np.asarray(pic).astype(int)
    x1, y1, x2, y2 = 30, 20, 270, 180  # int(v / 1000 * size), edges over the white background
    for x, y in ((x1, 100), (x2, 100), (150, y2)):  # jpeg: compare loosely with the white underneath
        assert np.abs(px[y, x] - 255).sum() > 60, (x, y, px[y, x])
    assert np.abs(px[10, 150] - 255).sum() < 30 and np.abs(px[190, 150] - 255).sum() < 30  # outside: untouched


def test_run_predict_base_model_raw_prompt(folder, tmp_path, monkeypatch):
    """A base (non-chat) checkpoint: generation_config chat_format "raw" -> the raw prompt, no chat template."""
    import shutil

    rp = _example("run_predict")
    base = tmp_path / "base"
    shutil.copytree(folder, base)
    gc = json.load(open(base / "generation_config.json"))
    gc.update(chat_format="raw", stop_words_ids=[[gc["eos_token_id"]]])
    json.dump(gc, open(base / "generation_config.json", "w"))
    _bus_picture(tmp_path / "bus.png")
    monkeypatch.chdir(tmp_path)
    tok = QWenTokenizer.from_pretrained(str(base))
    answer = "<ref>bus</ref><box>(100,100),(900,900)</box>"
    res = rp.predict(rp.build_parser().parse_args(
        ["--model_name_or_path", str(base), "--input_image", "bus.png", "--prompt", "Generate the caption:",
         "--output_dir", str(tmp_path / "out"), "--max_new_tokens", "40", "--greedy"]),
        logits_processors=[Force(tok.encode(answer) + [tok.eod_id])])
    assert res["response"] == answer and os.path.isfile(res["picture"])


def test_chat_demo_scripted(folder, tmp_path, monkeypatch):
    demo = _example("chat_demo")

    _bus_picture(tmp_path / "bus.png")
    monkeypatch.chdir(tmp_path)
    args = demo.build_parser().parse_args(["--model", folder, "--image", "bus.png", "--max_new_tokens", "3",
                                           "--output_dir", str(tmp_path / "out")])
    buf = io.StringIO()
    results = demo.run(args, lines=["这是什么?", "框出图中公交车的位置", ""], out=buf)
    assert len(results) == 2 and len(results[1]["history"]) == 2
    assert "assistant>" in buf.getvalue()


def test_model_chat_method(model, tok, folder):
    """Upstream call shape: model.chat(tokenizer, query, history) -> (response, history), twice."""
    model.chat_config = _chat_config(folder)
    q1 = MANIFEST["inputs"]["query"]
    r1, h = model.chat(tok, q1, None, base_dir=FIX, do_sample=False, max_new_tokens=8)
    assert r1 == MANIFEST["inputs"]["greedy_response_text (model.chat)"]
    r2, h = model.chat(tok, "框出图中公交车的位置", h, base_dir=FIX, do_sample=False, max_new_tokens=3)
    assert [t[0] for t in h] == [q1, "框出图中公交车的位置"] and h[1][1] == r2
    texts = list(model.chat_stream(tok, "hi", h, base_dir=FIX, do_sample=False, max_new_tokens=2))
    assert 1 <= len(texts) <= 2


def test_additive_mask_as_upstream():
    from paddlevl.models.qwen_vl.modeling import additive_mask

    am = paddle.to_tensor(np.array([[0, 0, 1], [1, 1, 1]], np.int64))
    m = additive_mask(am, 3).numpy()
    lo = np.finfo(np.float32).min
    assert m.shape == (2, 1, 3, 3)
    # a padding query row: -inf only where a key is both padding and in the future, finfo.min elsewhere
    assert m[0, 0, 0, 0] == lo and np.isneginf(m[0, 0, 0, 1]) and m[0, 0, 0, 2] == lo
    assert m[0, 0, 2].tolist() == [lo, lo, 0] and m[1, 0, 1].tolist() == [0, 0, lo]
    step = additive_mask(am, 1).numpy()  # one query: padding mask only
    assert step.shape == (2, 1, 1, 3) and step[0, 0, 0].tolist() == [lo, lo, 0] and step[1].max() == 0


def test_left_padding_masks_pad_tokens(model, inputs):
    """Real-token logits of a left-padded row do not depend on what sits in the padding (positions and the NTK
    alpha come from the padded length, as upstream)."""
    ids = inputs["text_only_input_ids"][0]
    rows = np.stack([np.concatenate([[7, 7, 7], ids]), np.concatenate([[99, 5, 3], ids])])
    mask = np.ones_like(rows)
    mask[:, :3] = 0
    with paddle.no_grad():
        out = model.forward_embeds(model.embed(paddle.to_tensor(rows)), paddle.to_tensor(mask)).numpy()
    assert np.abs(out[0, 3:] - out[1, 3:]).max() <= 1e-5 * np.abs(out).max()
    assert np.isfinite(out).all()


def test_session_streaming_matches_chat(model, tok, folder, expected):
    from paddlevl.models.qwen_vl.chat import QwenVLChatSession

    session = QwenVLChatSession(folder, model, base_dir=FIX, do_sample=False, max_new_tokens=8)
    seen = []
    out = session.ask("What is the red shape in this picture?", images=["inputs/image1.png"], stream=seen.append)
    assert out["result"] == MANIFEST["inputs"]["greedy_response_text (model.chat)"]
    ids = expected["greedy_ids"][0].tolist()
    assert seen == [tok.decode(ids[:k + 1], skip_special_tokens=True, errors="ignore") for k in range(len(ids))]
