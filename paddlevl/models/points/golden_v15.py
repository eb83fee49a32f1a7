"""`paddlevl parity --golden` hook for POINTS-1.5: every array of expected.npz our model can produce from
inputs.npz (the exact tensors upstream fed forward).

The greedy reference runs under the options upstream's `self.llm.generate()` used: the LLM's own generation
config (transformers builds it from llm_config's legacy generation attributes, e.g. repetition_penalty; the
checkpoint's generation_config.json belongs to the outer model and is never consulted by that call) overridden by
what chat() passed (manifest inputs_built.generation: max_new_tokens, eos_token_id, repetition_penalty, ...). The
penalty sees the generated ids only (upstream generates from inputs_embeds, so HF's input_ids start empty)."""
from __future__ import annotations

import json
import os

import numpy as np
import paddle

from ...generation import GenerationConfig, generate
from .processing_v15 import IM_END, IMAGE_PAD

DEFAULT_NEW_TOKENS = 8


# legacy generation attributes of a model config that HF copies into the LLM's generation config, with the
# values under which they do nothing; non-default values we do not implement are refused, not ignored
_LLM_GENERATION_KEYS = {"repetition_penalty": 1.0, "pad_token_id": None, "do_sample": False, "num_beams": 1,
                        "no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": None,
                        "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "forced_bos_token_id": None,
                        "forced_eos_token_id": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                        "exponential_decay_length_penalty": None}
_UNSUPPORTED = ("no_repeat_ngram_size", "min_length", "min_new_tokens", "encoder_no_repeat_ngram_size",
                "bad_words_ids", "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens",
                "begin_suppress_tokens", "exponential_decay_length_penalty")


def _read_json(path) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _fixture_generation(fixture_dir) -> dict:
    """Effective options of upstream's llm.generate(): llm_config's generation attributes, then chat()'s."""
    llm = _read_json(os.path.join(fixture_dir, "source", "config.json")).get("llm_config") or {}
    opts = {k: llm[k] for k in _LLM_GENERATION_KEYS if k in llm}
    opts.update((_read_json(os.path.join(fixture_dir, "manifest.json")).get("inputs_built") or {})
                .get("generation") or {})
    bad = {k: opts[k] for k in _UNSUPPORTED if opts.get(k) not in (None, _LLM_GENERATION_KEYS[k])}
    if opts.get("do_sample") or int(opts.get("num_beams") or 1) != 1:
        bad.update(do_sample=opts.get("do_sample"), num_beams=opts.get("num_beams"))
    if bad:
        raise NotImplementedError(f"the fixture's greedy reference uses generation options the golden run does "
                                  f"not reproduce: {bad}")
    return opts


def _expected_shapes(fixture_dir) -> dict:
    """{name: shape} of expected.npz (names and shapes only, never values)."""
    path = os.path.join(fixture_dir, "expected.npz")
    if not os.path.exists(path):
        return {}
    with np.load(path) as z:
        return {k: tuple(z[k].shape) for k in z.files}


def _as_layout(arr: np.ndarray, shape) -> np.ndarray:
    """Our array in the fixture's layout when only singleton axes differ ([8, V] vs [8, 1, V]); else as is."""
    if shape is None or arr.shape == tuple(shape):
        return arr
    squeeze = lambda s: tuple(d for d in s if d != 1)  # noqa: E731
    return arr.reshape(shape) if squeeze(arr.shape) == squeeze(shape) else arr


def _per_image_outputs(out: dict, grid: np.ndarray, merge: int) -> dict:
    """image_embeds_k / vision_*_k: the rows of image k, for fixtures that store one array per image."""
    patches = (grid[:, 0] * grid[:, 1] * grid[:, 2]).tolist()
    rows = {"image_embeds": [n // merge ** 2 for n in patches]}
    rows.update({k: patches for k in ("vision_tower_out", "vision_patch_embed_out", "vision_rot_pos_emb")})
    extra = {}
    for name, sizes in rows.items():
        if name in out:
            for k, part in enumerate(np.split(out[name], np.cumsum(sizes)[:-1], axis=0)):
                extra[f"{name}_{k}"] = part
    return extra


def _special_ids(fixture_dir, inputs) -> tuple[int, int]:
    if "image_token_id" in inputs and "eos_token_id" in inputs:
        return int(inputs["image_token_id"]), int(inputs["eos_token_id"])
    from .tokenizer import QwenTokenizer
    tok = QwenTokenizer.from_dir(os.path.join(fixture_dir, "source"))
    return tok.convert_tokens_to_ids(IMAGE_PAD), tok.convert_tokens_to_ids(IM_END)


def _per_image(inputs: dict, name: str) -> np.ndarray:
    """inputs[name], or the per-image arrays name_0, name_1, ... concatenated in order."""
    if name in inputs:
        return np.asarray(inputs[name])
    parts, k = [], 0
    while f"{name}_{k}" in inputs:
        parts.append(np.asarray(inputs[f"{name}_{k}"]))
        k += 1
    return np.concatenate(parts, axis=0) if parts else None


def golden(model, fixture_dir, inputs: dict) -> dict:
    image_token_id, eos_id = _special_ids(fixture_dir, inputs)
    gen = _fixture_generation(fixture_dir)
    shapes = _expected_shapes(fixture_dir)
    ids = np.asarray(inputs["input_ids"], dtype=np.int64)
    mask = np.asarray(inputs.get("attention_mask", np.ones_like(ids)), dtype=np.int64)
    grid = _per_image(inputs, "image_grid_thw")
    grid = np.zeros((0, 3), np.int64) if grid is None else grid.astype(np.int64).reshape(-1, 3)
    pixels = _per_image(inputs, "pixel_values")
    out = {}
    with paddle.no_grad():
        if len(grid):
            dtype = model.vision_encoder.patch_embed.proj.weight.dtype
            pixels = paddle.to_tensor(pixels.astype(np.float32)).astype(dtype)
            tower, patch = model.vision_encoder(pixels, grid, return_patch_embed=True)
            image_embeds = model.vision_projector(tower)
            embeds = model.inputs_embeds(ids, image_embeds, grid, image_token_id)
            out.update(
                vision_rot_pos_emb=model.vision_encoder.rot_pos_emb(grid),
                vision_patch_embed_out=patch.astype("float32").numpy(),
                vision_tower_out=tower.astype("float32").numpy(),
                image_embeds=image_embeds.astype("float32").numpy(),
            )
        else:  # a text-only prompt: no image runs may be present
            embeds = model.inputs_embeds(ids, None, grid, image_token_id)
            out["image_embeds"] = np.zeros((0, model.config.llm.hidden_size), np.float32)
        hidden = model.llm.hidden_states(embeds, paddle.to_tensor(mask))
        out.update(
            inputs_embeds=embeds.astype("float32").numpy(),
            llm_final_hidden=hidden.astype("float32").numpy(),
            logits=model.llm.logits(hidden).numpy(),
        )
        eos = gen.get("eos_token_id", eos_id)
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        pad = eos[0] if gen.get("pad_token_id") is None else int(gen["pad_token_id"])
        n_new = gen.get("max_new_tokens") or (shapes["greedy_ids"][-1] if "greedy_ids" in shapes else None) \
            or DEFAULT_NEW_TOKENS
        cfg = GenerationConfig(max_new_tokens=int(n_new), do_sample=False, eos_token_ids=eos, pad_token_id=pad,
                               repetition_penalty=float(gen.get("repetition_penalty") or 1.0))
        res = generate(model.llm, embeds, mask, cfg, prefill_extra={"last_only": True},
                       step_extra={"last_only": True}, return_step_logits=True)
    width = max(len(s) for s in res.sequences)
    # HF pads rows that stopped early with the pad id (= eos when the config has none)
    out["greedy_ids"] = np.array([s + [pad] * (width - len(s)) for s in res.sequences], dtype=np.int64)
    steps = np.stack(res.step_logits)  # [steps, B, V]
    out["greedy_step_logits"] = steps[:, 0] if steps.shape[1] == 1 else steps
    if len(grid):
        out.update(_per_image_outputs(out, grid, model.config.vision.spatial_merge_size))
    return {k: _as_layout(v, shapes.get(k)) for k, v in out.items()}
