"""POINTS-1.5 chat: messages -> prompt + pixels -> image features spliced into the embeddings -> decode loop.

    from paddlevl.checkpoint import load_model
    from paddlevl.models.points.chat_v15 import POINTSV15Chat
    bot = POINTSV15Chat.from_dir("points15-pd")                # or POINTSV15Chat(model, tokenizer, processor)
    messages = [{"role": "user", "content": [{"type": "image", "image": "demo.jpg"},
                                             {"type": "text", "text": "please describe the image in detail"}]}]
    bot.chat(messages, {"max_new_tokens": 1024, "temperature": 0.0, "top_p": 0.0, "num_beams": 1})

As upstream `model.chat(messages, tokenizer, image_processor, generation_config)`: any number of images per
message, multi-turn history (earlier assistant messages are part of the prompt), greedy unless do_sample is set
(temperature 0 is greedy too), stops at <|im_end|>, returns the text without special tokens.
`chat_batch` runs several conversations at once with left padding.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import numpy as np
import paddle

from ...generation import GenerationConfig, generate
from .processing_v15 import IM_END, IMAGE_PAD, ImageProcessorV15, construct_prompt
from .tokenizer import QwenTokenizer

DEFAULT_MAX_NEW_TOKENS = 1024  # the model card's generation_config
_HF_DEFAULT_TOP_K = 50         # transformers' default top_k when sampling


class POINTSV15Chat:
    def __init__(self, model, tokenizer: QwenTokenizer, image_processor: ImageProcessorV15,
                 defaults: Optional[dict] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.defaults = dict(defaults or {})
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.eos_token_id = tokenizer.convert_tokens_to_ids(IM_END)

    @classmethod
    def from_dir(cls, folder: str, model=None, dtype: str = "float32", **defaults) -> "POINTSV15Chat":
        if model is None:
            from ...checkpoint import load_model
            model = load_model(folder, dtype=dtype)
        return cls(model, QwenTokenizer.from_dir(folder), ImageProcessorV15.from_dir(folder), defaults)

    # ------------------------------------------------------------------------------------------ inputs
    def prepare(self, conversations: Sequence[Sequence[dict]], base_dir: Optional[str] = None) -> dict:
        """Left-padded batch: input_ids/attention_mask [B, L] int64, pixel_values (all images, row order),
        grid_thw [n_images, 3]."""
        rows, pixels, grids = [], [], []
        for messages in conversations:
            p = construct_prompt(messages, self.image_processor, base_dir=base_dir)
            rows.append(self.tokenizer.encode(p.prompt))
            pixels += p.pixel_values
            grids += p.grid_thw
        width = max(len(r) for r in rows)
        ids = np.full([len(rows), width], self.tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros([len(rows), width], dtype=np.int64)
        for b, r in enumerate(rows):
            ids[b, width - len(r):] = r
            mask[b, width - len(r):] = 1
        return {
            "input_ids": ids, "attention_mask": mask,
            "pixel_values": np.concatenate(pixels, axis=0) if pixels else None,
            "image_grid_thw": np.asarray(grids, dtype=np.int64).reshape(-1, 3),
        }

    def inputs_embeds(self, batch: dict):
        img = None
        if batch["pixel_values"] is not None:
            img = self.model.image_embeds(batch["pixel_values"], batch["image_grid_thw"])
        return self.model.inputs_embeds(batch["input_ids"], img, batch["image_grid_thw"], self.image_token_id)

    # ------------------------------------------------------------------------------------------ generation
    def generation_config(self, overrides: Optional[dict] = None) -> GenerationConfig:
        g = {**self.defaults, **(overrides or {})}
        if int(g.get("num_beams", 1) or 1) != 1:
            raise NotImplementedError("beam search (num_beams > 1) is not supported; use greedy or sampling")
        unknown = set(g) - {"max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty",
                            "num_beams", "seed", "stop_strings"}
        if unknown:
            raise TypeError(f"unknown generation option(s): {sorted(unknown)}")
        do_sample = bool(g.get("do_sample", False))
        temperature = float(g.get("temperature", 1.0) if g.get("temperature") is not None else 1.0)
        top_p = g.get("top_p")
        return GenerationConfig(
            max_new_tokens=int(g.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
            do_sample=do_sample, temperature=temperature,
            top_k=int(g.get("top_k", _HF_DEFAULT_TOP_K) or 0),
            # HF ignores top_p unless sampling; top_p 0 (model card) with sampling would keep only the top token
            top_p=1.0 if top_p is None else float(top_p),
            repetition_penalty=float(g.get("repetition_penalty", 1.0) or 1.0),
            eos_token_ids=(self.eos_token_id,), pad_token_id=self.tokenizer.pad_token_id,
            stop_strings=tuple(g.get("stop_strings") or ()), seed=g.get("seed"))

    def generate_ids(self, conversations: Sequence[Sequence[dict]], generation_config: Optional[dict] = None,
                     base_dir: Optional[str] = None, callback: Optional[Callable] = None,
                     return_step_logits: bool = False):
        """GenerationOutput with the new ids of every conversation (stop token included when one ended it)."""
        cfg = self.generation_config(generation_config)
        batch = self.prepare(conversations, base_dir)
        with paddle.no_grad():
            embeds = self.inputs_embeds(batch)
            return generate(self.model.llm, embeds, batch["attention_mask"], cfg,
                            prefill_extra={"last_only": True}, step_extra={"last_only": True},
                            decode=self.tokenizer.decode, callback=callback, return_step_logits=return_step_logits)

    def chat(self, messages: Sequence[dict], generation_config: Optional[dict] = None,
             base_dir: Optional[str] = None) -> str:
        return self.chat_batch([messages], generation_config, base_dir)[0]

    def chat_batch(self, conversations: Sequence[Sequence[dict]], generation_config: Optional[dict] = None,
                   base_dir: Optional[str] = None) -> list[str]:
        out = self.generate_ids(conversations, generation_config, base_dir)
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in out.sequences]


def chat(model, messages, tokenizer: QwenTokenizer, image_processor: ImageProcessorV15,
         generation_config: Optional[dict] = None) -> str:
    """The model card's call: model.chat(messages, tokenizer, image_processor, generation_config)."""
    return POINTSV15Chat(model, tokenizer, image_processor).chat(messages, generation_config)


class ChatSession:
    """Appflow / CLI session: keeps the conversation; images given with a question go before its text."""

    def __init__(self, bot: POINTSV15Chat):
        self.bot = bot
        self.history: list[dict] = []

    def ask(self, prompt: str, images=None, stream: Optional[Callable[[str], None]] = None, **generation) -> dict:
        """One user turn (images first, then the text). `stream(text_so_far)` is called after every new token."""
        content = [{"type": "image", "image": im} for im in (images or [])]
        content.append({"type": "text", "text": prompt})
        messages = self.history + [{"role": "user", "content": content}]
        callback = None
        if stream is not None:
            got: list[int] = []

            def callback(step_ids):
                got.append(int(step_ids[0]))
                stream(self.bot.tokenizer.decode(got, skip_special_tokens=True))
        out = self.bot.generate_ids([messages], generation, callback=callback)
        ids = out.sequences[0]
        text = self.bot.tokenizer.decode(ids, skip_special_tokens=True)
        self.history = messages + [{"role": "assistant", "content": [{"type": "text", "text": text}]}]
        return {"result": text, "ids": ids, "finished": out.finished[0]}

    def reset(self):
        self.history = []


def chat_session(folder: str, model=None, **options) -> ChatSession:
    dtype = options.pop("dtype", "float32")
    return ChatSession(POINTSV15Chat.from_dir(os.fspath(folder), model=model, dtype=dtype, **options))
