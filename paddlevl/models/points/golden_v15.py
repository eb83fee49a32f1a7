"""`paddlevl parity --golden` hook for POINTS-1.5: every array of expected.npz our model can produce from
inputs.npz (the exact tensors upstream fed forward)."""
from __future__ import annotations

import json
import os

import numpy as np
import paddle

from ...generation import GenerationConfig, generate
from .processing_v15 import IM_END, IMAGE_PAD

DEFAULT_NEW_TOKENS = 8


def _fixture_generation(fixture_dir) -> dict:
    path = os.path.join(fixture_dir, "manifest.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return (json.load(f).get("inputs_built") or {}).get("generation") or {}


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
    if not parts:
        raise KeyError(f"inputs.npz has neither {name} nor {name}_0, {name}_1, ...")
    return np.concatenate(parts, axis=0)


def golden(model, fixture_dir, inputs: dict) -> dict:
    image_token_id, eos_id = _special_ids(fixture_dir, inputs)
    gen = _fixture_generation(fixture_dir)
    ids = np.asarray(inputs["input_ids"], dtype=np.int64)
    mask = np.asarray(inputs.get("attention_mask", np.ones_like(ids)), dtype=np.int64)
    grid = _per_image(inputs, "image_grid_thw").astype(np.int64).reshape(-1, 3)
    out = {}
    with paddle.no_grad():
        dtype = model.vision_encoder.patch_embed.proj.weight.dtype
        pixels = paddle.to_tensor(_per_image(inputs, "pixel_values").astype(np.float32)).astype(dtype)
        tower, patch = model.vision_encoder(pixels, grid, return_patch_embed=True)
        image_embeds = model.vision_projector(tower)
        embeds = model.inputs_embeds(ids, image_embeds, grid, image_token_id)
        hidden = model.llm.hidden_states(embeds, paddle.to_tensor(mask))
        out.update(
            vision_rot_pos_emb=model.vision_encoder.rot_pos_emb(grid),
            vision_patch_embed_out=patch.astype("float32").numpy(),
            vision_tower_out=tower.astype("float32").numpy(),
            image_embeds=image_embeds.astype("float32").numpy(),
            inputs_embeds=embeds.astype("float32").numpy(),
            llm_final_hidden=hidden.astype("float32").numpy(),
            logits=model.llm.logits(hidden).numpy(),
        )
        eos = gen.get("eos_token_id", eos_id)
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        cfg = GenerationConfig(max_new_tokens=int(gen.get("max_new_tokens", DEFAULT_NEW_TOKENS)), do_sample=False,
                               eos_token_ids=eos, pad_token_id=eos[0])
        res = generate(model.llm, embeds, mask, cfg, prefill_extra={"last_only": True},
                       step_extra={"last_only": True}, return_step_logits=True)
    width = max(len(s) for s in res.sequences)
    # HF pads rows that stopped early with the pad id (= eos when the config has none)
    out["greedy_ids"] = np.array([s + [eos[0]] * (width - len(s)) for s in res.sequences], dtype=np.int64)
    steps = np.stack(res.step_logits)  # [steps, B, V]
    out["greedy_step_logits"] = steps[:, 0] if steps.shape[1] == 1 else steps
    return out
