"""Golden-parity hook for `paddlevl parity --golden`: every array of the Qwen-VL fixture from its inputs.npz.

The image spans are found in the ids exactly as the upstream model does (and checked against inputs.npz), the
pixel values are the fixture's own (our preprocessing is checked separately by the tests), and the greedy decode
is the KV-cached loop of paddlevl.generation with upstream's stop-word processor."""
from __future__ import annotations

import os

import numpy as np
import paddle

from ...generation import GenerationConfig, generate
from .chat import StopWordsProcessor
from .processing import find_image_spans
from .tokenizer import IMAGE_ST, SPECIAL_TOKENS, QWenTokenizer


def _spans(input_ids: np.ndarray, image_start_id: int) -> np.ndarray:
    return np.asarray([(r, a, b) for r, row in enumerate(input_ids.tolist())
                       for a, b in find_image_spans(row, image_start_id)], dtype=np.int64).reshape(-1, 3)


def _chat_ids(fixture_dir: str, image_start_id: int) -> tuple[int, int, int]:
    """(<|endoftext|>, <|im_start|>, <|im_end|>) ids: from the fixture's vocabulary when present, else from the
    config (the special table puts <img> 214 ids after <|endoftext|>)."""
    src = os.path.join(fixture_dir, "source")
    if os.path.isfile(os.path.join(src, "qwen.tiktoken")):
        tok = QWenTokenizer.from_pretrained(src)
        if tok.img_start_id != image_start_id:
            raise ValueError(f"fixture vocabulary puts <img> at {tok.img_start_id}, config.json says {image_start_id}")
        return tok.eod_id, tok.im_start_id, tok.im_end_id
    eod = image_start_id - (len(SPECIAL_TOKENS) + IMAGE_ST.index("<img>"))
    return eod, eod + 1, eod + 2


def golden(model, fixture_dir: str, inputs: dict) -> dict:
    cfg = model.config
    ids = np.asarray(inputs["input_ids"], dtype=np.int64)
    pixels = paddle.to_tensor(np.asarray(inputs["pixel_values"], dtype=np.float32))
    spans = _spans(ids, cfg.visual.image_start_id)
    if "image_spans" in inputs:  # [N, 2] (a, b) for one row, or [N, 3] (row, a, b)
        given = np.asarray(inputs["image_spans"], dtype=np.int64)
        ours = spans if given.ndim == 2 and given.shape[-1] == 3 else spans[:, 1:]
        if not np.array_equal(ours, given.reshape(ours.shape) if given.size == ours.size else given):
            raise AssertionError(f"image spans found in the ids {spans.tolist()} differ from inputs.npz "
                                 f"{given.tolist()}")
    eod, im_start, im_end = _chat_ids(fixture_dir, cfg.visual.image_start_id)
    out = {}
    with paddle.no_grad():
        visual = model.transformer.visual
        feats = visual.features(pixels)
        image_embeds = visual.pool(feats)
        out["vit_features"] = feats.numpy()
        out["image_embeds"] = image_embeds.numpy()
        embeds = model.embed_with_images(paddle.to_tensor(ids), image_embeds, spans)
        mask = np.asarray(inputs.get("attention_mask", np.ones_like(ids)), dtype=np.int64)
        out["logits"] = model.forward_embeds(embeds, paddle.to_tensor(mask)).numpy()
        if "text_only_input_ids" in inputs:
            out["text_only_logits"] = model(np.asarray(inputs["text_only_input_ids"], np.int64)).numpy()
    steps = 8
    expected = os.path.join(fixture_dir, "expected.npz")
    if os.path.isfile(expected):
        with np.load(expected) as z:
            if "greedy_ids" in z.files:
                steps = int(z["greedy_ids"].shape[1])  # only the number of steps is read
    gen = GenerationConfig(max_new_tokens=steps, do_sample=False, eos_token_ids=(eod,), pad_token_id=eod)
    proc = StopWordsProcessor([[im_end], [im_start]], eod, prompts=ids.tolist())
    res = generate(model, embeds, mask, gen, logits_processors=[proc], return_step_logits=True,
                   penalty_ids=ids.tolist())
    width = max(len(r) for r in res.sequences)  # rows that stopped early are padded as HF generate pads them
    out["greedy_ids"] = np.asarray([list(r) + [eod] * (width - len(r)) for r in res.sequences], dtype=np.int64)
    out["greedy_step_logits"] = np.stack(res.step_logits, axis=1)
    return out
