"""InternLM-XComposer-2.5 end to end: the real converter on the fixture checkpoint, golden parity with the upstream
torch outputs, the converter table on the real 7B layout, Partial-LoRA masking, chat / repetition penalty /
Appflow session, rotary scaling."""
import json
import os

import numpy as np
import paddle
import pytest

from paddlevl.models.internlm_xc2d5 import processing as P
from paddlevl.models.internlm_xc2d5.tokenizer import InternLM2Tokenizer, MappedVocabTokenizer

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "ixc2d5")
RTOL = 1e-4


def _load(name):
    with np.load(os.path.join(FIX, name)) as z:
        return {k: z[k] for k in z.files}


def _json(name):
    with open(os.path.join(FIX, name), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from convert.engine import convert
    dst = str(tmp_path_factory.mktemp("ixc") / "converted")
    convert(os.path.join(FIX, "source"), dst, progress=False)
    return dst


@pytest.fixture(scope="module")
def model(folder):
    from paddlevl.checkpoint import load_model
    return load_model(folder, dtype="float32")


@pytest.fixture(scope="module")
def tok():
    real = InternLM2Tokenizer(os.path.join(FIX, "internlm2_tokenizer.model"))
    return MappedVocabTokenizer.from_json(real, os.path.join(FIX, "tiny_vocab.json"))


@pytest.fixture(scope="module")
def golden_out(model):
    from paddlevl.models.registry import get
    return get("ixc2d5").golden(model, FIX, _load("inputs.npz"))


@pytest.fixture(scope="module")
def messages():
    return _json(os.path.join("inputs", "messages.json"))


def _rel(got, ref):
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", ["logits", "image_embeds", "hidden_states", "greedy_step_logits",
                                  "vit_features_0", "vit_global_input_0_stride8"])
def test_golden_float_arrays(golden_out, name):
    ref = _load("expected.npz")[name]
    got = golden_out[name]
    assert got.shape == ref.shape
    assert _rel(got, ref) <= RTOL, (name, _rel(got, ref))


@pytest.mark.parametrize("name", ["greedy_ids", "greedy_ids_rep_penalty_1005", "greedy_ids_real",
                                  "image_token_counts"])
def test_golden_ids(golden_out, name):
    np.testing.assert_array_equal(golden_out[name], _load("expected.npz")[name])


def test_parity_harness_passes(folder):
    from paddlevl.parity import run_golden
    rows, _ = run_golden(FIX, out=None)
    assert {r.name for r in rows} >= {"logits", "image_embeds", "greedy_ids"}
    assert all(r.status == "pass" for r in rows), [(r.name, r.status) for r in rows]


# ------------------------------------------------------------------------------------------------ converter
def test_converter_plan_on_fixture(folder):
    from convert.engine import make_plan
    plan = make_plan(os.path.join(FIX, "source"))
    try:
        assert plan.family.name == "ixc2d5"
        dropped = {it.info.key: it.drop_reason for it in plan.items if it.drop_reason}
        layers = _json(os.path.join("source", "config.json"))["num_hidden_layers"]
        assert len(dropped) == layers * 5 * 6  # lora_{sft,dpo,web}_{A,B} on wqkv, wo, w1, w2, w3
        assert all(".lora_" in k and "infer_mode" in r for k, r in dropped.items())
        assert "internlm-xcomposer2d5-clip/config.json" in plan.extra_files
    finally:
        plan.source.close()
    assert os.path.isfile(os.path.join(folder, "internlm-xcomposer2d5-clip", "config.json"))


def test_rules_on_real_release_layout():
    """Every key of the real 7B release is consumed by one rule and produces the parameter the model built for
    the real config declares (with the published CLIP-L/14-560 tower): the 4C-vs-H trap (both 4096 there)."""
    from convert.engine import declared_shapes
    from paddlevl.models.registry import get

    man = _json("fullsize_ixc2d5.json")
    fam = get("ixc2d5")
    cfg = man["config"]
    rules = fam.rules(cfg, [n for n, _ in man["tensors"]])
    produced, dropped = {}, []
    for name, shape in man["tensors"]:
        hits = [(r, m) for r in rules for m in (r.match(name),) if m]
        assert len(hits) == 1, name
        r, m = hits[0]
        names, shapes = r.target_names(m), r.op.shapes(tuple(shape))
        dropped += [name] if not names else []
        produced.update(zip(names, map(tuple, shapes)))
    with pytest.warns(UserWarning, match="internlm-xcomposer2d5-clip"):
        declared = declared_shapes(fam, cfg)
    assert set(produced) == set(declared)
    assert {n: (s, declared[n]) for n, s in produced.items() if s != declared[n]} == {}
    assert len(dropped) == 32 * 5 * 6
    assert declared["model.layers.0.attention.wqkv.weight"] == (4096, 6144)
    assert declared["model.layers.0.feed_forward.w2.Plora_A.weight"] == (14336, 256)
    assert declared["vision_proj.0.weight"] == (4096, 4096) and declared["plora_sub_GN"] == (1, 1, 1, 4096)


def test_rules_drop_old_buffers():
    from paddlevl.models.registry import get
    rules = get("ixc2d5").rules({}, [])
    for key in ("vit.vision_tower.vision_model.embeddings.position_ids",
                "model.layers.3.attention.rotary_emb.inv_freq"):
        hits = [r for r in rules if r.match(key)]
        assert len(hits) == 1 and not hits[0].targets


def test_tied_head_layouts(tmp_path):
    """tie_word_embeddings: true (upstream HF ties output.weight to tok_embeddings): a safetensors save omits
    output.weight, a .bin save keeps a copy; both convert, and the head reads tok_embeddings."""
    torch = pytest.importorskip("torch")
    import shutil
    from safetensors.torch import save_file
    from convert.engine import convert
    from paddlevl.checkpoint import load_model

    src = os.path.join(FIX, "source")
    sd = {}
    for f in sorted(os.listdir(src)):
        if f.endswith(".bin"):
            sd.update(torch.load(os.path.join(src, f), weights_only=True))
    sd["output.weight"] = sd["model.tok_embeddings.weight"]
    cfg = dict(_json(os.path.join("source", "config.json")), tie_word_embeddings=True)
    models = []
    for layout in ("safetensors", "bin"):
        d = tmp_path / layout
        shutil.copytree(os.path.join(src, "internlm-xcomposer2d5-clip"), d / "internlm-xcomposer2d5-clip")
        (d / "config.json").write_text(json.dumps(cfg))
        if layout == "safetensors":
            save_file({k: v for k, v in sd.items() if k != "output.weight"}, str(d / "model.safetensors"),
                      metadata={"format": "pt"})
        else:
            torch.save(sd, str(d / "pytorch_model.bin"))
        convert(str(d), str(tmp_path / f"{layout}_out"), progress=False)
        models.append(load_model(str(tmp_path / f"{layout}_out"), dtype="float32"))
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.standard_normal((1, 5, cfg["hidden_size"])).astype(np.float32))
    for m in models:
        assert not hasattr(m, "output") and "output.weight" not in m.state_dict()
        with paddle.no_grad():
            got = m.forward_embeds(x).numpy()
            h = m.decode(x).numpy()
        want = h @ sd["model.tok_embeddings.weight"].float().numpy().T
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fixture_dims_come_from_config(model):
    cfg = model.config
    assert cfg.vision.hidden_size == _json(os.path.join("source", "internlm-xcomposer2d5-clip",
                                                         "config.json"))["hidden_size"]
    assert cfg.vision_merged_size == 4 * cfg.vision.hidden_size != cfg.hidden_size  # the fixture separates them
    assert list(model.plora_glb_GN.shape) == [1, 1, cfg.vision_merged_size]
    assert list(model.vision_proj[0].weight.shape) == [cfg.vision_merged_size, cfg.hidden_size]


# ------------------------------------------------------------------------------------------------ model behaviour
def test_plora_only_at_image_rows(model):
    inp = _load("inputs.npz")
    with paddle.no_grad():
        feats = [model.encode_image(inp["pixel_values_0"])]
        embeds, mask = model.build_embeds(inp["input_ids"], feats)
        with_lora = model.forward_embeds(embeds, im_mask=paddle.to_tensor(mask)).numpy()
        no_mask = model.forward_embeds(embeds).numpy()
        zeros = model.forward_embeds(embeds, im_mask=paddle.to_tensor(np.zeros_like(mask))).numpy()
    np.testing.assert_array_equal(no_mask, zeros)
    first_image = int(np.argmax(mask[0]))
    # rows before the first image row see no image row (causal): identical; later rows move a lot
    np.testing.assert_allclose(with_lora[0, :first_image], no_mask[0, :first_image], rtol=0, atol=1e-5)
    assert np.abs(with_lora[0, first_image:] - no_mask[0, first_image:]).max() > 1.0


def test_rotary_dynamic_ntk_as_upstream():
    from paddlevl.layers import dynamic_ntk_base
    from paddlevl.models.internlm_xc2d5.config import IXCConfig
    from paddlevl.models.internlm_xc2d5.modeling import RotaryTable

    d = dict(_json(os.path.join("source", "config.json")), max_position_embeddings=16)
    cfg = IXCConfig.from_dict(d, folder=os.path.join(FIX, "source"))
    rt = RotaryTable(cfg)
    base = rt.inv_freq(10).numpy()
    want = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / cfg.head_dim))
    np.testing.assert_allclose(base, want, rtol=1e-6)
    assert rt.base == cfg.rope_theta
    rt.inv_freq(40)  # longer than max_position_embeddings: NTK base for length 40
    assert rt.base == dynamic_ntk_base(cfg.rope_theta, cfg.head_dim, 40, 16, 2.0) > cfg.rope_theta
    rt.inv_freq(20)  # upstream keeps the cached table (and base) for shorter sequences afterwards
    assert rt.base == dynamic_ntk_base(cfg.rope_theta, cfg.head_dim, 40, 16, 2.0)
    lin = RotaryTable(IXCConfig.from_dict(dict(d, rope_scaling={"type": "linear", "factor": 4.0}),
                                          folder=os.path.join(FIX, "source")))
    c, _ = lin.cos_sin(paddle.to_tensor([[8]]), 9)
    c0, _ = RotaryTable(cfg).cos_sin(paddle.to_tensor([[2]]), 3)
    np.testing.assert_allclose(c.numpy(), c0.numpy(), rtol=1e-6)


# ------------------------------------------------------------------------------------------------ chat
def test_chat_greedy_equals_upstream(model, tok, messages):
    from paddlevl.models.internlm_xc2d5.chat import chat
    man, exp = _json("manifest.json")["generation"], _load("expected.npz")
    imgs = [os.path.join(FIX, p) for p in messages["images"]]
    resp, hist, ids = chat(model, tok, messages["query"], image=imgs, hd_num=messages["hd_num_argument"],
                           history=messages["history"], do_sample=False, max_new_tokens=8,
                           repetition_penalty=1.0, use_meta=messages["use_meta"], return_ids=True)
    assert ids == exp["greedy_ids"][0].tolist()
    assert resp == man["upstream_chat_response_decoded"]
    assert hist == [(messages["query"], resp)]
    # upstream call shape (model.chat(tokenizer, ...)) with chat's default penalty 1.005
    resp2, _, ids2 = model.chat(tok, messages["query"], image=imgs, hd_num=messages["hd_num_argument"],
                                do_sample=False, max_new_tokens=8, return_ids=True)
    assert ids2 == exp["greedy_ids_rep_penalty_1005"][0].tolist()
    assert resp2 == man["response_with_default_rep_penalty"]


def _small_image(seed=0, wh=(300, 200)):
    from PIL import Image
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))


def _hf_repetition_penalty(scores, seen, penalty):
    """transformers RepetitionPenaltyLogitsProcessor on one row (gather, x p if < 0 else / p, scatter)."""
    out = scores.copy()
    idx = np.asarray(sorted(set(seen)), dtype=np.int64)
    s = out[idx]
    out[idx] = np.where(s < 0, s * penalty, s / penalty)
    return out


def test_repetition_penalty_like_transformers_433(model, tok, messages):
    """chat's penalty sees [placeholder BOS] + generated ids (transformers 4.33 generate(inputs_embeds=...)).
    A hand-written KV-cached greedy loop with the HF processor gives the same ids as chat()."""
    from paddlevl.models.internlm_xc2d5.chat import chat, prepare
    penalty, steps = 3.0, 6
    imgs = [_small_image()]
    _, _, ids = chat(model, tok, messages["query"], image=imgs, do_sample=False, max_new_tokens=steps,
                     repetition_penalty=penalty, return_ids=True)
    embeds, mask, _ = prepare(model, tok, messages["query"], imgs)
    cache, seq, x, extra = model.new_cache(), [tok.bos_token_id], embeds, {"im_mask": paddle.to_tensor(mask)}
    n = embeds.shape[1]
    with paddle.no_grad():
        for step in range(steps):
            pos = paddle.to_tensor([[n - 1 + step]] if step else [list(range(n))], dtype="int64")
            att = paddle.ones([1, n + step], dtype="int64")
            logits = model.forward_embeds(x, att, pos, cache, **extra).numpy()[0, -1]
            nxt = int(np.argmax(_hf_repetition_penalty(logits, seq, penalty)))
            seq.append(nxt)
            if nxt in (tok.eos_token_id, tok.im_end_id):
                break
            x, extra = model.embed(paddle.to_tensor([[nxt]])), {}
    assert ids == seq[1:]


def test_chat_text_only_paths(model, tok):
    from paddlevl.models.internlm_xc2d5.chat import chat, prepare
    q = "Describe this image in detail."
    _, m1, ids1 = prepare(model, tok, q, image=[])
    _, m2, ids2 = prepare(model, tok, q, image=None)
    assert not m1.any() and not m2.any()
    assert ids1[0, 0] == tok.bos_token_id != ids1[0, 1]
    assert ids2[0, :2].tolist() == [tok.bos_token_id] * 2  # upstream build_inputs: literal <s> + BOS
    resp, hist = chat(model, tok, q, image=[], do_sample=False, max_new_tokens=3)
    assert isinstance(resp, str) and hist == [(q, resp)]


def test_chat_two_images(model, tok, tmp_path):
    from paddlevl.models.internlm_xc2d5.chat import prepare
    rng = np.random.default_rng(0)
    from PIL import Image
    paths = []
    for k, wh in enumerate([(300, 700), (900, 300)]):
        p = tmp_path / f"im{k}.png"
        Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    q = "a<ImageHere>b<ImageHere>Describe this image in detail."  # pieces of the tiny vocabulary
    embeds, mask, ids = prepare(model, tok, q, image=paths, hd_num=24)
    runs = np.flatnonzero(np.diff(np.concatenate([[0], mask[0].astype(int), [0]])))
    lengths = (runs[1::2] - runs[::2]).tolist()
    assert lengths == [P.image_token_count(2, 1), P.image_token_count(1, 2)]  # hd_num forced to 6
    assert embeds.shape[1] == ids.shape[1] == mask.shape[1]


def test_session_and_appflow(folder, model, tok, messages, tmp_path):
    from paddlevl.appflow import Appflow
    from paddlevl.models.internlm_xc2d5.chat import chat, chat_session
    img = str(tmp_path / "small.png")
    _small_image(1).save(img)
    q1, q2 = messages["query"], "Describe this image in detail."
    opts = dict(max_new_tokens=3, repetition_penalty=1.0)
    s = chat_session(folder, model, tokenizer=tok, **opts)
    r1 = s.ask(q1, images=[img])
    r2 = s.ask(q2)  # no new picture: the conversation's image is sent again with the history
    want2, _ = chat(model, tok, q2, image=[img], history=[(q1, r1["result"])], do_sample=False, **opts)
    assert r2["result"] == want2
    assert r2["history"] == [(q1, r1["result"]), (q2, want2)]
    s.reset()
    assert s.history == []
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        chat_session(folder, model)  # the fixture ships no tokenizer: a clear error, not a crash later
    app = Appflow(app="image2text_generation", models=[folder], tokenizer=tok, **opts)
    assert app(image=img, prompt=q1)["result"] == r1["result"]

    # the example script (seed flags), on the same question
    import io
    import shutil
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
    import ixc_chat_demo
    tdir = tmp_path / "tok"
    tdir.mkdir()
    shutil.copy(os.path.join(FIX, "internlm2_tokenizer.model"), tdir / "tokenizer.model")
    args = ixc_chat_demo.build_parser().parse_args([
        "--model_name_or_path", folder, "--image_path", img, "--text", q1, "--max_new_tokens", "3",
        "--repetition_penalty", "1.0", "--tokenizer_path", str(tdir),
        "--vocab_map", os.path.join(FIX, "tiny_vocab.json")])
    buf = io.StringIO()
    assert ixc_chat_demo.run(args, out=buf) == [r1["result"]]
    assert r1["result"] in buf.getvalue()


@pytest.mark.parametrize("hw", [(2, 3), (3, 1), (1, 1)])
def test_hd_merge_layout_for_any_tile_grid(model, hw):
    """The separator / tile re-assembly for tile grids the fixture does not have, against the upstream
    reshape/permute sequence written out in numpy."""
    h, w = hw
    c = model.config.vision.hidden_size
    g = model.config.vision.image_size // model.config.vision.patch_size
    s = g // 2
    rng = np.random.default_rng(h * 10 + w)
    feats = rng.standard_normal((1 + h * w, g * g, c)).astype(np.float32)
    sub_gn, glb_gn = model.plora_sub_GN.numpy(), model.plora_glb_GN.numpy()

    glb = feats[:1].reshape(1, s, 2, s, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(1, s, s, 4 * c)
    glb = np.concatenate([glb, np.tile(sub_gn, (1, s, 1, 1))], axis=2).reshape(1, -1, 4 * c)
    sub = feats[1:].reshape(h * w, s, 2, s, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(h * w, -1, 4 * c)
    sub = sub.reshape(1, h, w, s, s, -1).transpose(0, 1, 3, 2, 4, 5).reshape(1, h * s, w * s, 4 * c)
    sub = np.concatenate([sub, np.tile(sub_gn, (1, h * s, 1, 1))], axis=2).reshape(1, -1, 4 * c)
    want = np.concatenate([glb, glb_gn, sub], axis=1)

    got = model.merge_hd(paddle.to_tensor(feats), (h, w)).numpy()
    assert got.shape[1] == P.image_token_count(h, w, s)
    np.testing.assert_array_equal(got, want)


def test_vit_crop_chunking_is_exact(model, golden_out):
    inp = _load("inputs.npz")
    crops, _ = P.vit_crops(inp["pixel_values_0"])
    old = model.vit_batch
    try:
        model.vit_batch = 2  # 3 crops -> two tower calls
        with paddle.no_grad():
            feats = model.vit_features(paddle.to_tensor(crops)).numpy()
    finally:
        model.vit_batch = old
    np.testing.assert_allclose(feats, golden_out["vit_features_0"], rtol=0, atol=1e-5)
