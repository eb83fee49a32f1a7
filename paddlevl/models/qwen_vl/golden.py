"""Golden-parity hook for `paddlevl parity --golden`: every array of the Qwen-VL fixture from its inputs.npz.

The image spans are found in the ids exactly as the upstream model does (and checked against inputs.npz), the
pixel values are the fixture's own (our preprocessing is checked separately by the tests), and the greedy decode
is the KV-cached loop of paddlevl.generation with upstream's stop-word processor, under the checkpoint's own
generation_config.json made greedy (upstream: generate(generation_config=<file, do_sample False, top_p/top_k None>),
so e.g. its repetition_penalty and eos_token_id still apply)."""
from __future__ import annotations

import os

import numpy as np
import paddle

from ...generation import GenerationConfig, generate
from .chat import ChatConfig, StopWordsProcessor
from .chat_format import stop_words_ids
from .processing import find_image_spans
from .tokenizer import IMAGE_ST, SPECIAL_TOKENS, QWenTokenizer


def _spans(input_ids: np.ndarray, image_start_id: int) -> np.ndarray:
    return np.asarray([(r, a, b) for r, row in enumerate(input_ids.tolist())
                       for a, b in find_image_spans(row, image_start_id)], dtype=np.int64).reshape(-1, 3)


def _eod_and_stop_words(fixture_dir: str, image_start_id: int, chat_format: str) -> tuple[int, list]:
    """<|endoftext|> id and the stop words upstream chat() passes to generate for this chat_format, from the fixture's
    vocabulary when present, else from the config (the special table puts <img> 214 ids after <|endoftext|>)."""
    src = os.path.join(fixture_dir, "source")
    if os.path.isfile(os.path.join(src, "qwen.tiktoken")):
        tok = QWenTokenizer.from_pretrained(src)
        if tok.img_start_id != image_start_id:
            raise ValueError(f"fixture vocabulary puts <img> at {tok.img_start_id}, config.json says {image_start_id}")
        return tok.eod_id, stop_words_ids(tok, chat_format)
    if chat_format != "chatml":
        raise ValueError(f"chat_format {chat_format!r} needs the fixture's qwen.tiktoken for its stop words")
    eod = image_start_id - (len(SPECIAL_TOKENS) + IMAGE_ST.index("<img>"))
    return eod, [[eod + 2], [eod + 1]]  # [[<|im_end|>], [<|im_start|>]]


def _pixel_values(inputs: dict, size: int) -> np.ndarray:
    """[N, 3, S, S] float32: `pixel_values` (all images stacked), or one `pixel_values_k` per image (k = 0, 1, ...),
    or none (no image in the prompt)."""
    if "pixel_values" in inputs:
        px = np.asarray(inputs["pixel_values"], dtype=np.float32)
        return px[None] if px.ndim == 3 else px
    per_image = []
    while f"pixel_values_{len(per_image)}" in inputs:
        px = np.asarray(inputs[f"pixel_values_{len(per_image)}"], dtype=np.float32)
        per_image.append(px[None] if px.ndim == 3 else px)
    if not per_image:
        return np.zeros((0, 3, size, size), np.float32)
    return np.concatenate(per_image, axis=0)


def golden(model, fixture_dir: str, inputs: dict) -> dict:
    cfg = model.config
    ids = np.asarray(inputs["input_ids"], dtype=np.int64)
    pixels = _pixel_values(inputs, cfg.visual.image_size)
    spans = _spans(ids, cfg.visual.image_start_id)
    if len(pixels) != len(spans):
        raise AssertionError(f"inputs.npz holds {len(pixels)} images for {len(spans)} <img> spans in input_ids")
    if "image_spans" in inputs:  # [N, 2] (a, b) for one row, or [N, 3] (row, a, b)
        given = np.asarray(inputs["image_spans"], dtype=np.int64)
        ours = spans if given.ndim == 2 and given.shape[-1] == 3 else spans[:, 1:]
        if not np.array_equal(ours, given.reshape(ours.shape) if given.size == ours.size else given):
            raise AssertionError(f"image spans found in the ids {spans.tolist()} differ from inputs.npz "
                                 f"{given.tolist()}")
    cc = ChatConfig.from_folder(os.path.join(fixture_dir, "source"))
    eod, stop_words = _eod_and_stop_words(fixture_dir, cfg.visual.image_start_id, cc.chat_format)
    out = {}
    with paddle.no_grad():
        image_embeds = None
        if len(pixels):
            visual = model.transformer.visual
            feats = visual.features(paddle.to_tensor(pixels))
            image_embeds = visual.pool(feats)
            out["vit_features"] = feats.numpy()
            out["image_embeds"] = image_embeds.numpy()
        embeds = model.embed_with_images(paddle.to_tensor(ids), image_embeds, spans)
        mask = np.asarray(inputs.get("attention_mask", np.ones_like(ids)), dtype=np.int64)
        out["logits"] = model.forward_embeds(embeds, paddle.to_tensor(mask)).numpy()
        if "text_only_input_ids" in inputs:
            out["text_only_logits"] = model(np.asarray(inputs["text_only_input_ids"], np.int64)).numpy()
    steps, shapes = 8, {}
    expected = os.path.join(fixture_dir, "expected.npz")
    if os.path.isfile(expected):
        with np.load(expected) as z:
            shapes = {k: z[k].shape for k in z.files}  # only names and shapes are read, never values
        if "greedy_ids" in shapes:
            steps = int(shapes["greedy_ids"][-1])
    eos = eod if cc.eos_token_id is None else int(cc.eos_token_id)
    pad = eos if cc.pad_token_id is None else int(cc.pad_token_id)
    gen = GenerationConfig(max_new_tokens=steps, do_sample=False, repetition_penalty=cc.repetition_penalty,
                           eos_token_ids=(eos,), pad_token_id=pad)
    proc = StopWordsProcessor(stop_words, eos, prompts=ids.tolist())
    res = generate(model, embeds, mask, gen, logits_processors=[proc], return_step_logits=True,
                   penalty_ids=ids.tolist())
    width = max(len(r) for r in res.sequences)  # rows that stopped early are padded as HF generate pads them
    out["greedy_ids"] = np.asarray([list(r) + [pad] * (width - len(r)) for r in res.sequences], dtype=np.int64)
    # HF generate records each step's logits after upstream's StopWordsLogitsProcessor has edited them in place
    # (eos set to 2^15 right after a stop word); the repetition penalty makes a new tensor and is not recorded.
    out["greedy_step_logits"] = np.stack([proc([list(r[:t]) for r in res.sequences], lg)
                                          for t, lg in enumerate(res.step_logits)], axis=1)
    if image_embeds is not None:  # per-image copies, for fixtures that store one array per image (`_k` keys)
        for name in ("vit_features", "image_embeds"):
            out.update({f"{name}_{k}": out[name][k:k + 1] for k in range(len(pixels))})
    return {k: _as_layout(v, shapes.get(k)) for k, v in out.items()}


def _as_layout(arr: np.ndarray, shape) -> np.ndarray:
    """Our array in the fixture's layout when only singleton axes differ (e.g. step logits [1, T, V] vs [T, V],
    one image [1, 256, H] vs [256, H]); anything else is returned as is and compared as is."""
    if shape is None or arr.shape == tuple(shape):
        return arr
    squeeze = lambda s: tuple(d for d in s if d != 1)  # noqa: E731
    return arr.reshape(shape) if squeeze(arr.shape) == squeeze(shape) else arr
