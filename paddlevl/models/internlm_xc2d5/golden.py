"""Golden-parity hook of InternLM-XComposer-2.5 for `paddlevl parity --golden` (array names of expected.npz).

Inputs (inputs.npz): input_ids [1, L] with -1 at visual slots, im_mask [1, L], attention_mask, pixel_values_k
[1, 3, h*560, w*560] per image in sequence order. Produced: logits, image_embeds (all images' projected embeddings
in sequence order), greedy_ids and greedy_ids_rep_penalty_1005 (chat's default penalty; the penalty sees the
placeholder BOS transformers 4.33 puts in front of the generated ids), greedy_step_logits, hidden_states,
vit_features_k, vit_global_input_k_stride8, image_token_counts.
"""
from __future__ import annotations

import json
import os

import numpy as np
import paddle

from ...generation import GenerationConfig, generate


def _manifest(fixture_dir: str) -> dict:
    try:
        with open(os.path.join(fixture_dir, "manifest.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _generation_settings(fixture_dir: str, model) -> tuple:
    """(max_new_tokens, eos ids) as the fixture's upstream chat() call used them."""
    gen = (_manifest(fixture_dir).get("generation") or {}).get("generate_kwargs") or {}
    max_new = int(gen.get("max_new_tokens", 8))
    eos = gen.get("eos_token_id")
    if eos is None:  # </s> and [UNUSED_TOKEN_145] in the fixture's vocabulary
        eos = [model.config.eos_token_id]
        try:
            with open(os.path.join(fixture_dir, "tiny_vocab.json"), encoding="utf-8") as f:
                pieces = json.load(f)["pieces"]
            eos.append(pieces.index("[UNUSED_TOKEN_145]"))
        except (OSError, ValueError, KeyError):
            pass
    return max_new, tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


def golden(model, fixture_dir, inputs: dict) -> dict:
    fixture_dir = os.fspath(fixture_dir)
    ids = np.asarray(inputs["input_ids"], dtype=np.int64)
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"IXC-2.5 chat is single-sequence; input_ids has shape {list(ids.shape)}")
    mask = np.asarray(inputs.get("attention_mask", np.ones_like(ids)), dtype=np.int64)
    n_images = len([k for k in inputs if k.startswith("pixel_values_")])
    out, feats = {}, []
    with paddle.no_grad():
        for k in range(n_images):
            dbg = {}
            e = model.encode_image(inputs[f"pixel_values_{k}"], debug=dbg)
            feats.append(e)
            out[f"vit_features_{k}"] = dbg["vit_features"].numpy()
            out[f"vit_global_input_{k}_stride8"] = dbg["crops"][:1, :, ::8, ::8]
        embeds, im_mask = model.build_embeds(ids, feats)
        if "im_mask" in inputs and not np.array_equal(im_mask, np.asarray(inputs["im_mask"], dtype=bool)):
            raise ValueError("inputs.npz im_mask differs from the -1 slots of input_ids")
        hs: list = []
        logits = model.forward_embeds(embeds, paddle.to_tensor(mask), im_mask=paddle.to_tensor(im_mask),
                                      hidden_states=hs)
    out["logits"] = logits.numpy()
    out["hidden_states"] = np.concatenate([h.numpy() for h in hs], axis=0)
    out["image_embeds"] = (np.concatenate([f.numpy() for f in feats], axis=1) if feats
                           else np.zeros([1, 0, model.config.hidden_size], np.float32))
    out["image_token_counts"] = np.asarray([f.shape[1] for f in feats], dtype=np.int64)

    max_new, eos = _generation_settings(fixture_dir, model)
    extra = {"im_mask": paddle.to_tensor(im_mask), "last_only": True}
    cfg = GenerationConfig(max_new_tokens=max_new, eos_token_ids=eos)
    g = generate(model, embeds, mask, cfg, prefill_extra=extra, step_extra={"last_only": True},
                 return_step_logits=True)
    out["greedy_ids"] = np.asarray(g.sequences, dtype=np.int64)
    out["greedy_step_logits"] = np.concatenate(g.step_logits, axis=0)
    rep = generate(model, embeds, mask, cfg.updated(repetition_penalty=1.005), prefill_extra=extra,
                   step_extra={"last_only": True}, penalty_ids=[[model.config.bos_token_id]])
    out["greedy_ids_rep_penalty_1005"] = np.asarray(rep.sequences, dtype=np.int64)
    real = _real_ids(fixture_dir)
    if real is not None:  # the tiny fixture vocabulary's ids mapped back to real InternLM2 ids
        out["greedy_ids_real"] = real[out["greedy_ids"]]
    return out


def _real_ids(fixture_dir: str):
    try:
        with open(os.path.join(fixture_dir, "tiny_vocab.json"), encoding="utf-8") as f:
            return np.asarray(json.load(f)["real_ids"], dtype=np.int64)
    except (OSError, ValueError, KeyError):
        return None
