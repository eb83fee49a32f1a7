"""POINTS 1.0 end to end through the real converter: golden parity on the upstream fixture, chat, the Appflow
session, and a second tiny checkpoint of other sizes (single safetensors file, another image size) whose vision
path is checked against an independent numpy computation from the raw upstream tensors."""
import json
import math
import os
import shutil

import numpy as np
import paddle
import pytest
from PIL import Image

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "points_qwen2_5")
SRC = os.path.join(FIX, "source")


def _convert(src, dst):
    from convert.engine import convert
    convert(src, dst, progress=False)
    return dst


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return _convert(SRC, str(tmp_path_factory.mktemp("points_v1") / "converted"))


@pytest.fixture(scope="module")
def model(converted):
    from paddlevl.checkpoint import load_model
    return load_model(converted, dtype="float32")


@pytest.fixture(scope="module")
def expected():
    with np.load(os.path.join(FIX, "expected.npz")) as z:
        return {k: z[k] for k in z.files}


def _messages():
    with open(os.path.join(FIX, "inputs", "messages.json"), encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------ parity
def test_golden_parity(model, expected):
    """Every array of expected.npz (logits, image_embeds, greedy ids, per-tower ViT features, merged embeddings,
    per-step logits) within 1e-4 of its range; greedy ids identical."""
    from paddlevl.models.points.golden_v1 import golden
    from paddlevl.parity import REQUIRED, compare

    with np.load(os.path.join(FIX, "inputs.npz")) as z:
        inputs = {k: z[k] for k in z.files}
    out = golden(model, FIX, inputs)
    rows = [compare(k, out.get(k), v, 1e-4) for k, v in expected.items()]
    report = "\n".join(f"{r.name}: {r.status} abs={r.max_abs} rel={r.max_rel}" for r in rows)
    assert all(r.status == "pass" for r in rows), report
    assert set(REQUIRED) <= {r.name for r in rows}


def test_parity_harness(tmp_path):
    """`paddlevl parity --golden` on the fixture (converts with the real converter itself)."""
    from paddlevl.parity import run_golden
    rows, _ = run_golden(FIX, rtol=1e-4, workdir=str(tmp_path), out=None)
    assert all(r.ok for r in rows) and all(r.status == "pass" for r in rows if r.name in ("logits", "image_embeds",
                                                                                           "greedy_ids"))


def test_family_detected_by_architectures():
    from paddlevl.models.registry import detect_family
    with open(os.path.join(SRC, "config.json")) as f:
        cfg = json.load(f)
    assert "model_type" not in cfg
    assert detect_family(cfg).name == "points_qwen2_5"


def test_partial_vision_config_takes_the_clip_class_defaults():
    """A vision_config that leaves keys out gets transformers CLIPVisionConfig's defaults, as upstream would."""
    from paddlevl.models.points.modeling_v1 import PointsV1Config
    with open(os.path.join(SRC, "config.json")) as f:
        cfg = json.load(f)
    full = PointsV1Config.from_dict(cfg)
    assert (full.vision.hidden_size, full.vision.image_size, full.vision.patch_size) == (
        cfg["vision_config"]["hidden_size"], cfg["vision_config"]["image_size"], cfg["vision_config"]["patch_size"])
    cfg["vision_config"] = {"hidden_size": 64, "image_size": 336, "patch_size": 14}
    part = PointsV1Config.from_dict(cfg)
    assert (part.vision.num_hidden_layers, part.vision.num_attention_heads, part.vision.intermediate_size) == \
        (12, 12, 3072)
    assert part.vision.hidden_act == "quick_gelu" and part.vision.layer_norm_eps == 1e-5
    assert part.tokens_per_crop == 144


# ------------------------------------------------------------------------------------------------ chat
def test_chat_reproduces_upstream_response(model, converted, expected):
    from paddlevl.models.points.chat_v1 import load_processors
    tok, ip = load_processors(converted)
    msg = _messages()
    with open(os.path.join(FIX, "inputs", "prompt.txt"), encoding="utf-8") as f:
        prompt = f.read()
    image = Image.open(os.path.join(FIX, "inputs", msg["image"]))
    response = model.chat(image, prompt, tok, ip, msg["catty"], dict(msg["generation_config"]), msg["max_splits"])
    assert response == tok.decode(expected["greedy_ids"][0], skip_special_tokens=True)


def test_chat_session_multi_turn(model, converted, expected):
    from paddlevl.models.points.chat_v1 import chat_session
    msg = _messages()
    s = chat_session(converted, model, **msg["generation_config"])
    with pytest.raises(ValueError, match="needs an image"):
        s.ask("hello")
    first = s.ask(msg["prompt"], images=[os.path.join(FIX, "inputs", msg["image"])])
    assert first["ids"] == expected["greedy_ids"][0].tolist()
    second = s.ask("Tell me more.")
    assert len(second["history"]) == 2 and len(second["ids"]) > 0
    # the second turn's prompt holds the first turn, its reply and the image rows once
    assert s.ids.count(s.tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 4 * 144
    s.reset()
    again = s.ask(msg["prompt"], images=[os.path.join(FIX, "inputs", msg["image"])])
    assert again["ids"] == first["ids"]


def test_appflow(converted, expected):
    from paddlevl.appflow import Appflow
    msg = _messages()
    task = Appflow(app="image2text_generation", models=[converted], **msg["generation_config"])
    out = task(image=os.path.join(FIX, "inputs", msg["image"]), prompt=msg["prompt"])
    assert out["ids"] == expected["greedy_ids"][0].tolist()
    assert isinstance(task(prompt="And the colours?")["result"], str)


# ------------------------------------------------------------------------------------------------ merge
def test_merge_checks_image_token_counts(model):
    t = model.config.tokens_per_crop
    feats = paddle.zeros([2, t, model.config.llm.hidden_size])
    ids = paddle.to_tensor([[1] + [612] * (2 * t - 1) + [2]])
    with pytest.raises(ValueError, match="image tokens"):
        model.merge(ids, feats, 612)
    ids = paddle.to_tensor([[1] + [612] * (t + 1) + [2] + [612] * (t - 1)])
    with pytest.raises(ValueError, match="multiple"):
        model.merge(ids, feats, 612)


def test_merge_splits_runs_in_crop_order(model):
    """Two runs (t and 2t rows) take crops 0 | 1, 2 in order; other rows keep their embeddings."""
    t, h = model.config.tokens_per_crop, model.config.llm.hidden_size
    feats = paddle.to_tensor(np.arange(3 * t * h, dtype=np.float32).reshape([3, t, h]))
    row = [5] + [612] * t + [7, 8] + [612] * (2 * t) + [9]
    out = model.merge(paddle.to_tensor([row]), feats, 612).numpy()[0]
    emb = model.llm.embed(paddle.to_tensor([row])).numpy()[0]
    np.testing.assert_array_equal(out[1:1 + t], feats.numpy()[0])
    np.testing.assert_array_equal(out[3 + t:3 + 3 * t], feats.numpy()[1:].reshape([2 * t, h]))
    for i in (0, t + 1, t + 2, 3 * t + 3):
        np.testing.assert_array_equal(out[i], emb[i])


# ------------------------------------------------------------------------------------------------ other sizes
def _tiny_checkpoint(dst, rng):
    """A POINTS 1.0 checkpoint in the release layout with sizes unlike the fixture's: CLIP 32 wide, 2 layers,
    image 56 (4x4 patches -> 4 tokens per crop), LLM 48 wide, 6 heads / 3 kv heads, ffn 40; one safetensors file."""
    from safetensors.numpy import save_file
    os.makedirs(dst)
    with open(os.path.join(SRC, "config.json")) as f:
        cfg = json.load(f)
    cfg["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=56, patch_size=14)
    cfg["llm_config"].update(hidden_size=48, num_attention_heads=6, num_kv_heads=3, ffn_hidden_size=40,
                             num_layers=1, num_hidden_layers=1, vocab_size=630)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json"):
        shutil.copy(os.path.join(SRC, name), dst)
    with open(os.path.join(SRC, "preprocessor_config.json")) as f:
        pp = json.load(f)
    pp.update(size=56, crop_size=56)
    with open(os.path.join(dst, "preprocessor_config.json"), "w") as f:
        json.dump(pp, f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    vc, lc = cfg["vision_config"], cfg["llm_config"]
    c, i, g = vc["hidden_size"], vc["intermediate_size"], vc["image_size"] // vc["patch_size"]
    H, F, V = lc["hidden_size"], lc["ffn_hidden_size"], lc["vocab_size"]
    kvd = 2 * lc["num_kv_heads"] * (H // lc["num_attention_heads"])
    r = lambda *s, std=0.2: (rng.standard_normal(s) * std).astype(np.float32)  # noqa: E731
    w = {}
    for tower in ("general_vit", "ocr_vit"):
        p = f"{tower}.vision_model."
        w[p + "embeddings.class_embedding"] = r(c, std=0.5)
        w[p + "embeddings.patch_embedding.weight"] = r(c, 3, vc["patch_size"], vc["patch_size"], std=0.05)
        w[p + "embeddings.position_embedding.weight"] = r(g * g + 1, c)
        for n in ("pre_layrnorm", "post_layernorm"):
            w[p + n + ".weight"], w[p + n + ".bias"] = 1 + r(c), r(c)
        for layer in range(vc["num_hidden_layers"]):
            q = f"{p}encoder.layers.{layer}."
            for n in ("q", "k", "v", "out"):
                w[q + f"self_attn.{n}_proj.weight"], w[q + f"self_attn.{n}_proj.bias"] = r(c, c), r(c)
            for n in ("layer_norm1", "layer_norm2"):
                w[q + n + ".weight"], w[q + n + ".bias"] = 1 + r(c), r(c)
            w[q + "mlp.fc1.weight"], w[q + "mlp.fc1.bias"] = r(i, c), r(i)
            w[q + "mlp.fc2.weight"], w[q + "mlp.fc2.bias"] = r(c, i), r(c)
    w["vision_projector.0.weight"], w["vision_projector.0.bias"] = r(H, 4 * c), r(H)
    w["vision_projector.2.weight"], w["vision_projector.2.bias"] = r(H, H), r(H)
    w["llm.lm.embed_in.weight"] = r(V, H, std=1.0)
    for layer in range(lc["num_layers"]):
        q = f"llm.lm.layers.{layer}."
        w[q + "input_layernorm.weight"] = w[q + "post_attention_layernorm.weight"] = 1 + r(H)
        w[q + "attention.query_dense.weight"], w[q + "attention.query_dense.bias"] = r(H, H), r(H)
        w[q + "attention.key_value_dense.weight"], w[q + "attention.key_value_dense.bias"] = r(kvd, H), r(kvd)
        w[q + "attention.dense.weight"] = r(H, H)
        w[q + "mlp.dense_h_to_4h.weight"], w[q + "mlp.dense_4h_to_h.weight"] = r(2 * F, H), r(H, F)
    w["llm.lm.final_layer_norm.weight"] = 1 + r(H)
    w["llm.embed_out.weight"] = r(V, H)
    save_file({k: np.ascontiguousarray(v) for k, v in w.items()}, os.path.join(dst, "model.safetensors"))
    return cfg, w


def _np_layer_norm(x, wt, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * wt + b


def _np_vision(w, vc, pixel_values, tower):
    """hidden_states[-2] of HF CLIPVisionModel, in float64 from the raw upstream tensors."""
    p, c, ps = f"{tower}.vision_model.", vc["hidden_size"], vc["patch_size"]
    eps, heads = vc["layer_norm_eps"], vc["num_attention_heads"]
    n, g = pixel_values.shape[0], vc["image_size"] // ps
    x = pixel_values.astype(np.float64).reshape(n, 3, g, ps, g, ps).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, -1)
    x = x @ w[p + "embeddings.patch_embedding.weight"].reshape(c, -1).T
    cls = np.broadcast_to(w[p + "embeddings.class_embedding"], (n, 1, c))
    x = np.concatenate([cls, x], 1) + w[p + "embeddings.position_embedding.weight"]
    x = _np_layer_norm(x, w[p + "pre_layrnorm.weight"], w[p + "pre_layrnorm.bias"], eps)
    for layer in range(vc["num_hidden_layers"] - 1):  # the last block does not feed hidden_states[-2]
        q = f"{p}encoder.layers.{layer}."
        lin = lambda t, name: t @ w[q + name + ".weight"].T + w[q + name + ".bias"]  # noqa: E731
        h = _np_layer_norm(x, w[q + "layer_norm1.weight"], w[q + "layer_norm1.bias"], eps)
        split = lambda t: t.reshape(n, -1, heads, c // heads).transpose(0, 2, 1, 3)  # noqa: E731
        qh, kh, vh = (split(lin(h, f"self_attn.{m}_proj")) for m in "qkv")
        s = (qh * (c // heads) ** -0.5) @ kh.transpose(0, 1, 3, 2)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ vh
        x = x + lin(a.transpose(0, 2, 1, 3).reshape(n, -1, c), "self_attn.out_proj")
        h = _np_layer_norm(x, w[q + "layer_norm2.weight"], w[q + "layer_norm2.bias"], eps)
        h = lin(h, "mlp.fc1")
        x = x + lin(h / (1 + np.exp(-1.702 * h)), "mlp.fc2")
    return x


def _np_features(w, vc, pixel_values):
    erf = np.vectorize(math.erf)
    out = 0
    for tower in ("general_vit", "ocr_vit"):
        pen = _np_vision(w, vc, pixel_values, tower)
        n, c, g = pen.shape[0], pen.shape[-1], vc["image_size"] // vc["patch_size"]
        grid = pen[:, 1:].reshape(n, g, g, c)
        tok = np.stack([np.concatenate([grid[:, 2 * r, 2 * cc], grid[:, 2 * r, 2 * cc + 1],
                                        grid[:, 2 * r + 1, 2 * cc], grid[:, 2 * r + 1, 2 * cc + 1]], -1)
                        for r in range(g // 2) for cc in range(g // 2)], 1)
        h = tok @ w["vision_projector.0.weight"].T + w["vision_projector.0.bias"]
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
        out = out + 0.5 * (h @ w["vision_projector.2.weight"].T + w["vision_projector.2.bias"])
    return out


def test_other_sizes_end_to_end(tmp_path):
    from paddlevl.checkpoint import load_model
    from paddlevl.models.points.chat_v1 import chat_session
    from paddlevl.models.points.processing_v1 import CLIPImageProcessor, crop_image

    rng = np.random.default_rng(7)
    cfg, w = _tiny_checkpoint(str(tmp_path / "src"), rng)
    dst = _convert(str(tmp_path / "src"), str(tmp_path / "dst"))
    model = load_model(dst, dtype="float32")
    assert model.config.tokens_per_crop == 4 and model.config.image_size == 56
    img = Image.fromarray(rng.integers(0, 256, (40, 130, 3), dtype=np.uint8))
    crops = crop_image(img, catty=True, max_splits=8)
    assert {c.size for c in crops} == {(336, 336)}  # upstream cuts CATTY tiles at 336 whatever the tower size
    pv = CLIPImageProcessor.from_dir(dst).preprocess(crops)
    assert pv.shape == (len(crops), 3, 56, 56)  # ... and the CLIP processor resizes them to the tower's size
    with paddle.no_grad():
        got = model.image_features(paddle.to_tensor(pv)).numpy()
    ref = _np_features(w, cfg["vision_config"], pv)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    s = chat_session(dst, model, max_new_tokens=3)
    out = s.ask("What is it?", images=[img])
    assert len(out["ids"]) <= 3 and isinstance(out["result"], str)
    n_img = int((np.asarray(s.ids) == s.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
    assert n_img == 4 * len(crops)


def test_image_infer_example_and_streaming(model, converted, expected):
    import importlib.util
    from paddlevl.models.points.chat_v1 import chat_session

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "image_infer.py")
    spec = importlib.util.spec_from_file_location("image_infer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    msg = _messages()
    n = len(expected["greedy_ids"][0])
    args = mod.build_parser().parse_args(["--model_path", converted, "--image_file",
                                          os.path.join(FIX, "inputs", msg["image"]), "--question", msg["prompt"],
                                          "--max_new_tokens", str(n)])
    text = mod.run(args)
    s = chat_session(converted, model, max_new_tokens=n)
    assert text == s.tokenizer.decode(expected["greedy_ids"][0], skip_special_tokens=True)
    seen = []
    out = s.ask(msg["prompt"], images=[os.path.join(FIX, "inputs", msg["image"])], stream=seen.append)
    assert len(seen) == len(out["ids"]) and seen[-1] == out["result"] == text
