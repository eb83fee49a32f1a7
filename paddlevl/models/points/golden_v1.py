"""Golden-parity hook of POINTS 1.0 for `paddlevl parity --golden` (arrays named as in the fixture's
expected.npz)."""
from __future__ import annotations

import json
import os

import numpy as np
import paddle

from ...generation import GenerationConfig, generate


def _max_new_tokens(fixture_dir: str, default: int = 8) -> int:
    for rel, path in (("inputs/messages.json", ("generation_config", "max_new_tokens")),
                      ("manifest.json", ("inputs_built", "generation_config", "max_new_tokens"))):
        try:
            with open(os.path.join(fixture_dir, rel), encoding="utf-8") as f:
                v = json.load(f)
            for k in path:
                v = v[k]
            return int(v)
        except (OSError, KeyError, TypeError, ValueError):
            continue
    return default


def _pixel_values(inputs: dict) -> np.ndarray:
    if "pixel_values" in inputs:
        return inputs["pixel_values"]
    parts = sorted((k for k in inputs if k.startswith("pixel_values_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if not parts:
        raise KeyError("inputs.npz has no pixel_values")
    return np.concatenate([inputs[k] for k in parts], axis=0)


def _token_id(inputs: dict, key: str, fixture_dir: str, token: str) -> int:
    if key in inputs:
        return int(inputs[key])
    from .tokenizer import QwenTokenizer
    return QwenTokenizer.from_dir(os.path.join(fixture_dir, "source")).convert_tokens_to_ids(token)


def _per_row(feats, input_ids: np.ndarray, image_token_id: int, model) -> list:
    """Split the crops [n, T, H] between the batch rows by their image-token counts (crops in row order)."""
    counts = (input_ids == image_token_id).sum(axis=1) // model.config.tokens_per_crop
    if int(counts.sum()) != feats.shape[0]:
        raise ValueError(f"input_ids hold image tokens for {int(counts.sum())} crops, pixel_values has "
                         f"{feats.shape[0]}")
    out, start = [], 0
    for n in counts.tolist():
        out.append(feats[start:start + n] if n else None)
        start += n
    return out


def golden(model, fixture_dir, inputs: dict) -> dict:
    fixture_dir = os.fspath(fixture_dir)
    ids = paddle.to_tensor(inputs["input_ids"].astype(np.int64))
    mask = inputs.get("attention_mask", np.ones_like(inputs["input_ids"])).astype(np.int64)
    image_token_id = _token_id(inputs, "image_token_id", fixture_dir, "<|image_pad|>")
    eos_token_id = _token_id(inputs, "eos_token_id", fixture_dir, "<|im_end|>")
    with paddle.no_grad():
        feats, parts = model.image_features(paddle.to_tensor(_pixel_values(inputs)), return_parts=True)
        embeds = model.merge(ids, _per_row(feats, inputs["input_ids"], image_token_id, model), image_token_id)
        logits = model.llm.forward_embeds(embeds, paddle.to_tensor(mask))
    cfg = GenerationConfig(max_new_tokens=_max_new_tokens(fixture_dir), eos_token_ids=(eos_token_id,))
    gen = generate(model.llm, embeds, mask, cfg, return_step_logits=True)
    out = {k: v.numpy() for k, v in parts.items()}
    out.update(logits=logits.numpy(), image_embeds=feats.numpy(), inputs_embeds=embeds.numpy(),
               greedy_ids=np.asarray(gen.sequences, dtype=np.int64),
               greedy_step_logits=np.concatenate(gen.step_logits, axis=0) if len(gen.sequences) == 1 else
               np.stack(gen.step_logits, axis=1))
    return out
