"""InternLM-XComposer-2.5 chat, as upstream `InternLMXComposer2ForCausalLM.chat`, and a session for Appflow / CLI.

`chat(model, tokenizer, query, image=[...], hd_num=24, history=[...], ...) -> (response, history)`:
- the prompt is rendered from (optional system turn,) history turns and the query; images go where the query has
  `<ImageHere>` (one image without a marker: in front of the whole prompt); more than one image -> hd_num 6;
  the interleaved input is cut at max_length (16384) embeddings;
- image=None takes upstream's text-only `build_inputs` path (a literal '<s>' plus BOS: two BOS ids);
- generation stops at `</s>` or `[UNUSED_TOKEN_145]`; upstream defaults: do_sample=True, top_p=0.8,
  temperature=1.0, repetition_penalty=1.005. transformers 4.33 starts the sequence it generates from
  `inputs_embeds` with a placeholder BOS id, so the repetition penalty sees [BOS] + the generated ids;
- response = decode(generated, skip_special_tokens=True) cut at the first '[UNUSED_TOKEN_145]'.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import paddle

from ...generation import GenerationConfig, generate
from . import processing as P
from .tokenizer import IM_END, InternLM2Tokenizer

DEFAULT_MAX_LENGTH = 16384  # interleav_wrap_chat's default; chat never passes another


def generation_config(tokenizer, max_new_tokens=1024, do_sample=True, num_beams=1, temperature=1.0, top_p=0.8,
                      repetition_penalty=1.005, top_k=None, seed=None) -> GenerationConfig:
    if int(num_beams or 1) != 1:
        raise NotImplementedError(f"num_beams={num_beams}: beam search is not supported; use greedy or sampling")
    # upstream passes no top_k: transformers' default 50 applies when sampling
    return GenerationConfig(max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample),
                            temperature=float(temperature), top_p=float(top_p),
                            top_k=50 if top_k is None else int(top_k),
                            repetition_penalty=float(repetition_penalty), seed=seed,
                            eos_token_ids=(tokenizer.eos_token_id, tokenizer.im_end_id),
                            pad_token_id=tokenizer.pad_token_id)


def prepare(model, tokenizer, query: str, image=(), history=(), meta_instruction: str = "", hd_num: int = 24,
            max_length: int = DEFAULT_MAX_LENGTH):
    """(inputs_embeds [1, L, H], im_mask [1, L] bool numpy, ids [1, L] with -1 at visual slots)."""
    history = [tuple(h) for h in (history or [])]
    if image is None:
        ids = np.asarray([P.text_only_ids(tokenizer, query, history, meta_instruction)], dtype=np.int64)
        return model.embed(paddle.to_tensor(ids)), np.zeros(ids.shape, dtype=bool), ids
    if isinstance(image, (str, os.PathLike)) or not isinstance(image, (list, tuple)):
        image = [image]
    ci = P.interleave(tokenizer, query, image, history, meta_instruction, hd_num, max_length,
                      tile=model.config.tile_size, grid=model.config.merged_grid)
    ids = ci.input_ids()
    with paddle.no_grad():
        feats = [model.encode_image(img.pixel_values) for img in ci.images]
        embeds, mask = model.build_embeds(ids, feats)
    return embeds, mask, ids


def chat(model, tokenizer, query: str, image=(), hd_num: int = 24, history=(), streamer: Optional[Callable] = None,
         max_new_tokens: int = 1024, do_sample: bool = True, num_beams: int = 1, temperature: float = 1.0,
         top_p: float = 0.8, repetition_penalty: float = 1.005, use_meta: bool = False,
         meta_instruction: str = P.DEFAULT_META_INSTRUCTION, seed: Optional[int] = None,
         max_length: int = DEFAULT_MAX_LENGTH, return_ids: bool = False, **kwargs):
    """Upstream chat(). `streamer(text_so_far)` is called after every new token."""
    infer_mode = kwargs.pop("infer_mode", "base")
    if infer_mode != "base":
        raise NotImplementedError(f"infer_mode={infer_mode!r}: the write/web LoRA sets are not converted "
                                  "(chat uses 'base')")
    if kwargs:
        raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
    meta = meta_instruction if use_meta else ""
    embeds, mask, ids = prepare(model, tokenizer, query, image, history, meta, hd_num, max_length)
    cfg = generation_config(tokenizer, max_new_tokens, do_sample, num_beams, temperature, top_p,
                            repetition_penalty, seed=seed)
    callback = None
    if streamer is not None:
        got: List[int] = []

        def callback(step_ids):
            got.append(int(step_ids[0]))
            streamer(tokenizer.decode(got, skip_special_tokens=True).split(IM_END)[0])
    extra = {"last_only": True}
    if mask.any():
        extra["im_mask"] = paddle.to_tensor(mask)
    out = generate(model, embeds, np.ones(mask.shape, dtype=np.int64), cfg, prefill_extra=extra,
                   step_extra={"last_only": True}, penalty_ids=[[model.config.bos_token_id]], callback=callback)
    gen = out.sequences[0]
    response = tokenizer.decode(gen, skip_special_tokens=True).split(IM_END)[0]
    new_history = [tuple(h) for h in (history or [])] + [(query, response)]
    if return_ids:
        return response, new_history, gen
    return response, new_history


class IXCChatSession:
    """Multi-turn chat for Appflow: `ask(prompt, images=None, **generation)` -> {"result", "history", "ids"}.

    Like the upstream README's multi-turn example, every turn re-sends the conversation's images with the text
    history. With one image the call is exactly upstream `chat(query, [image], history=...)`; with several, a
    turn whose query has no `<ImageHere>` gets one marker per image it introduced in front of its text."""

    def __init__(self, model, tokenizer, hd_num: int = 24, use_meta: bool = False,
                 meta_instruction: str = P.DEFAULT_META_INSTRUCTION, generation: Optional[dict] = None):
        self.model, self.tokenizer = model, tokenizer
        self.hd_num, self.use_meta, self.meta_instruction = hd_num, use_meta, meta_instruction
        self.generation = dict(generation or {})
        self.reset()

    def reset(self):
        self.images: list = []
        self.turns: list = []     # (query, response, images introduced by that turn)

    @property
    def history(self) -> List[Tuple[str, str]]:
        return [(q, a) for q, a, _ in self.turns]

    def ask(self, prompt: str, images: Optional[Sequence] = None, stream: Optional[Callable[[str], None]] = None,
            **generation) -> dict:
        new = list(images or [])
        all_images = self.images + new
        turns = self.turns + [(prompt, None, len(new))]
        if len(all_images) > 1:
            texts = [q if P.IMAGE_PLACEHOLDER in q else P.IMAGE_PLACEHOLDER * n + q for q, _, n in turns]
        else:
            texts = [q for q, _, _ in turns]
        history = [(t, a) for t, (_, a, _) in zip(texts[:-1], turns[:-1])]
        opts = {"do_sample": False, **self.generation, **generation}
        response, _, ids = chat(self.model, self.tokenizer, texts[-1], image=all_images, hd_num=self.hd_num,
                                history=history, streamer=stream, use_meta=self.use_meta,
                                meta_instruction=self.meta_instruction, return_ids=True, **opts)
        self.images = all_images
        self.turns.append((prompt, response, len(new)))
        return {"result": response, "history": self.history, "ids": ids}


def load_tokenizer(folder: str):
    return InternLM2Tokenizer.from_dir(os.fspath(folder))


def chat_session(folder, model=None, **options) -> IXCChatSession:
    if model is None:
        from ...checkpoint import load_model
        model = load_model(folder, dtype=options.pop("dtype", "float32"))
    tokenizer = options.pop("tokenizer", None) or load_tokenizer(folder)
    kw = {k: options.pop(k) for k in ("hd_num", "use_meta", "meta_instruction") if k in options}
    return IXCChatSession(model, tokenizer, generation=options or None, **kw)
