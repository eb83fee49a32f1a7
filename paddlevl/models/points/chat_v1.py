"""POINTS 1.0 chat: `chat(model, image, prompt, tokenizer, image_processor, catty=True, generation_config,
max_splits=8)` as upstream's `POINTSChatModel.chat`, and a multi-turn session for Appflow / the CLI.

Upstream's chat is single-turn: one image, one prompt, response = decode(new tokens, skip_special_tokens=True).
The session keeps a history by repeating the same chatml turns (`<|im_start|>user\n...<|im_end|>\n<|im_start|>
assistant\n{reply}<|im_end|>\n`); its first turn is byte-identical to `chat`.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import numpy as np
import paddle

from ...generation import GenerationConfig, generate
from .processing_v1 import (END_TOKEN, IMAGE_TOKEN, CLIPImageProcessor, build_prompt, crop_image, load_image)


DEFAULT_MAX_NEW_TOKENS = 1024  # the model card's generation_config
_HF_DEFAULT_TOP_K = 50         # transformers' top_k when sampling and none is given


def generation_config_from(gen, eos_token_id: int) -> GenerationConfig:
    """Upstream passes a dict of HF generate() kwargs ({"max_new_tokens", "temperature", "top_p", "num_beams",
    "do_sample", ...}); greedy unless do_sample (HF: temperature/top_p alone do not sample; temperature 0 is
    greedy too). Stops at <|im_end|> unless eos ids are given."""
    if isinstance(gen, GenerationConfig):
        cfg = gen
    else:
        gen = dict(gen or {})
        beams = int(gen.pop("num_beams", 1) or 1)
        if beams != 1:
            raise NotImplementedError(f"num_beams={beams}: beam search is not supported; use greedy or sampling")
        known = {"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed",
                 "stop_strings", "eos_token_id"}
        unknown = set(gen) - known
        if unknown:
            raise ValueError(f"unsupported generation options: {sorted(unknown)}")
        eos = gen.get("eos_token_id")
        cfg = GenerationConfig(
            max_new_tokens=int(gen.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
            do_sample=bool(gen.get("do_sample", False)), temperature=float(gen.get("temperature", 1.0)),
            top_k=int(gen.get("top_k", _HF_DEFAULT_TOP_K)), top_p=float(gen.get("top_p", 1.0)),
            repetition_penalty=float(gen.get("repetition_penalty", 1.0)), seed=gen.get("seed"),
            stop_strings=tuple(gen.get("stop_strings", ())),
            eos_token_ids=() if eos is None else tuple(eos if isinstance(eos, (list, tuple)) else [eos]))
    if not cfg.eos_token_ids:
        cfg = cfg.updated(eos_token_ids=(eos_token_id,))
    return cfg


def _embeds(model, ids: np.ndarray, crops, tokenizer, image_processor):
    """embed(ids) [1, L] with the crops' features in the <|image_pad|> rows."""
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    with paddle.no_grad():
        feats = model.image_features(paddle.to_tensor(image_processor.preprocess(crops))) if crops else None
        return model.merge(paddle.to_tensor(ids), [feats], image_token_id)


def chat(model, image, prompt: str, tokenizer, image_processor: CLIPImageProcessor, catty: bool = True,
         generation_config=None, max_splits: int = 8, return_ids: bool = False):
    """One image + one prompt -> the response text (upstream POINTSChatModel.chat)."""
    _check_user_text(tokenizer, prompt)
    image = load_image(image)
    crops = crop_image(image, catty=catty, max_splits=max_splits)
    text = build_prompt(prompt, len(crops), model.config.tokens_per_crop)
    ids = np.asarray([tokenizer.encode(text)], dtype=np.int64)
    embeds = _embeds(model, ids, crops, tokenizer, image_processor)
    cfg = generation_config_from(generation_config, tokenizer.convert_tokens_to_ids(END_TOKEN))
    out = generate(model.llm, embeds, np.ones_like(ids), cfg, prefill_extra={"last_only": True},
                   decode=tokenizer.decode)
    response = tokenizer.decode(out.sequences[0], skip_special_tokens=True)
    return (response, out.sequences[0]) if return_ids else response


def _check_user_text(tokenizer, prompt: str):
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) in tokenizer.encode(prompt):
        raise ValueError(f"the prompt contains {IMAGE_TOKEN}; images are passed separately")


class PointsV1ChatSession:
    """Multi-turn chat for Appflow: `ask(prompt, images=None, **generation)` -> {"result", "ids", "history"}; a
    call without images continues the conversation. The conversation is kept as token ids (a reply is never
    re-tokenized), so the first turn is identical to `chat`."""

    def __init__(self, model, tokenizer, image_processor, catty: bool = True, max_splits: int = 8,
                 generation: Optional[dict] = None):
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.catty, self.max_splits = catty, max_splits
        self.generation = dict(generation or {})
        self.end_id = tokenizer.convert_tokens_to_ids(END_TOKEN)
        self.reset()

    def reset(self):
        self.ids: list = []      # the conversation so far (closed turns)
        self.crops: list = []    # every crop of the conversation, in prompt order
        self.history: list = []  # (prompt, response) pairs

    def ask(self, prompt: str, images: Optional[Sequence] = None, stream: Optional[Callable[[str], None]] = None,
            **generation) -> dict:
        """One user turn (its images' crops first, then the text). `stream(text_so_far)` is called after every new
        token."""
        _check_user_text(self.tokenizer, prompt)
        new_crops = []
        for img in images or ():
            new_crops += crop_image(load_image(img), self.catty, self.max_splits)
        if not self.crops and not new_crops:
            raise ValueError("the first question of a POINTS conversation needs an image")
        turn = build_prompt(prompt, len(new_crops), self.model.config.tokens_per_crop)
        ids = self.ids + self.tokenizer.encode(turn)
        crops = self.crops + new_crops
        embeds = _embeds(self.model, np.asarray([ids], dtype=np.int64), crops, self.tokenizer, self.image_processor)
        cfg = generation_config_from({**self.generation, **generation}, self.end_id)
        callback = None
        if stream is not None:
            got: list = []

            def callback(step_ids):
                got.append(int(step_ids[0]))
                stream(self.tokenizer.decode(got, skip_special_tokens=True))
        out = generate(self.model.llm, embeds, np.ones([1, len(ids)], dtype=np.int64), cfg,
                       prefill_extra={"last_only": True}, decode=self.tokenizer.decode, callback=callback)
        reply = list(out.sequences[0])
        response = self.tokenizer.decode(reply, skip_special_tokens=True)
        if reply and reply[-1] in cfg.eos_token_ids:
            reply = reply[:-1]
        self.ids = ids + reply + [self.end_id] + self.tokenizer.encode("\n")
        self.crops = crops
        self.history.append((prompt, response))
        return {"result": response, "ids": out.sequences[0], "finished": out.finished[0],
                "history": list(self.history)}


def load_processors(folder: str):
    from .tokenizer import QwenTokenizer

    return QwenTokenizer.from_dir(folder), CLIPImageProcessor.from_dir(folder)


def chat_session(folder, model=None, **options) -> PointsV1ChatSession:
    if model is None:
        from ...checkpoint import load_model
        model = load_model(folder, dtype=options.pop("dtype", "float32"))
    tokenizer, image_processor = load_processors(os.fspath(folder))
    return PointsV1ChatSession(model, tokenizer, image_processor, catty=options.pop("catty", True),
                               max_splits=options.pop("max_splits", 8), generation=options or None)
