"""Qwen-VL-Chat conversation: `chat(model, tokenizer, query, history)` -> (response, history), streaming, and the
chat session used by Appflow / the CLI.

Generation follows upstream `model.chat`: chatml context (make_context), stop words `[[<|im_end|>], [<|im_start|>]]`
handled by a logits processor that forces `<|endoftext|>` (logit 2^15) right after a stop word — so the model emits
the stop token, then eos — and the response is the decoded text up to the first <|im_start|>/<|im_end|>."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import paddle

from ...generation import GenerationConfig, generate
from .chat_format import DEFAULT_MAX_WINDOW, DEFAULT_SYSTEM, decode_response, make_context, stop_words_ids
from .processing import QwenVLProcessor

FORCED_EOS_LOGIT = float(2 ** 15)


class StopWordsProcessor:
    """After any stop sequence (matched on prompt + generated ids), set the eos logit to 2^15 (upstream
    StopWordsLogitsProcessor; stop words equal to [eos] are ignored)."""

    def __init__(self, stop_words: Sequence[Sequence[int]], eos_token_id: int, prompts: Sequence[Sequence[int]] = ()):
        self.stop_words = [list(map(int, s)) for s in stop_words if list(s) != [eos_token_id]]
        if any(len(s) == 0 for s in self.stop_words):
            raise ValueError(f"empty stop word in {stop_words}")
        self.eos = int(eos_token_id)
        self.prompts = [list(map(int, p)) for p in prompts]

    def __call__(self, generated: list, logits: np.ndarray) -> np.ndarray:
        out = logits
        for b, gen in enumerate(generated):
            seq = (self.prompts[b] if b < len(self.prompts) else []) + list(gen)
            if any(len(s) <= len(seq) and seq[-len(s):] == s for s in self.stop_words):
                if out is logits:
                    out = logits.copy()
                out[b, self.eos] = FORCED_EOS_LOGIT
        return out


@dataclass
class ChatConfig:
    """generation_config.json of the checkpoint (upstream defaults of Qwen-VL-Chat when absent)."""
    chat_format: str = "chatml"
    max_window_size: int = DEFAULT_MAX_WINDOW
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    max_new_tokens: int = 512
    do_sample: bool = True
    top_k: int = 0
    top_p: float = 0.3
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    stop_words_ids: list = field(default_factory=list)

    @classmethod
    def from_folder(cls, folder: str) -> "ChatConfig":
        path = os.path.join(folder, "generation_config.json")
        if not os.path.isfile(path):
            return cls()
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d and d[k] is not None}
        return cls(**known)

    def generation(self, tokenizer, **overrides) -> GenerationConfig:
        eos = self.eos_token_id if self.eos_token_id is not None else tokenizer.eod_id
        pad = self.pad_token_id if self.pad_token_id is not None else eos
        cfg = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                               temperature=self.temperature, top_k=self.top_k or 0,
                               top_p=1.0 if self.top_p is None else self.top_p,
                               repetition_penalty=self.repetition_penalty, eos_token_ids=(eos,), pad_token_id=pad)
        return cfg.updated(**overrides)


def _processor(model, tokenizer, base_dir=None) -> QwenVLProcessor:
    v = model.config.visual
    return QwenVLProcessor(tokenizer, v.image_size, v.image_start_id, base_dir=base_dir)


def generate_ids(model, tokenizer, context_ids: list[int], gen: GenerationConfig, stop_words: list,
                 base_dir: Optional[str] = None, callback: Optional[Callable] = None,
                 logits_processors: Sequence[Callable] = ()):
    """Prefill with the images named in the context, then decode; returns the generated ids (stop/eos included).
    Extra logits_processors run before the stop-word processor (as HF appends upstream's processor last)."""
    inputs = _processor(model, tokenizer, base_dir)(context_ids)
    with paddle.no_grad():
        ids = paddle.to_tensor(inputs["input_ids"])
        image_embeds = None
        if len(inputs["pixel_values"]):
            image_embeds = model.encode_images(paddle.to_tensor(inputs["pixel_values"]))
        embeds = model.embed_with_images(ids, image_embeds, inputs["image_spans"])
    eos = gen.eos_token_ids[0]
    proc = StopWordsProcessor(stop_words, eos, prompts=[context_ids])
    out = generate(model, embeds, inputs["attention_mask"], gen, logits_processors=[*logits_processors, proc],
                   prefill_extra={"last_only": True}, step_extra={"last_only": True},
                   penalty_ids=[context_ids], callback=callback)
    return out.sequences[0]


def chat(model, tokenizer, query: str, history: Optional[list] = None, system: str = DEFAULT_SYSTEM,
         append_history: bool = True, stop_words_ids_extra: Optional[list] = None,
         chat_config: Optional[ChatConfig] = None, base_dir: Optional[str] = None,
         logits_processors: Sequence[Callable] = (), stream: Optional[Callable[[str], None]] = None, **generation):
    """One turn: returns (response, history). `generation` overrides GenerationConfig fields
    (max_new_tokens, do_sample, top_p, top_k, temperature, repetition_penalty, seed); logits_processors are
    callables (generated rows, logits [B, V]) -> logits; `stream(text)` is called after every token with the
    text so far (specials skipped, as chat_stream yields it)."""
    cc = chat_config or ChatConfig()
    if cc.chat_format != "chatml":
        raise ValueError(f"chat needs a chatml chat model (generation_config chat_format is {cc.chat_format!r})")
    history = [] if history is None else history
    max_window = generation.pop("max_window_size", None) or cc.max_window_size
    raw_text, context = make_context(tokenizer, query, history, system, max_window, cc.chat_format)
    stops = list(stop_words_ids_extra or []) + list(cc.stop_words_ids) + stop_words_ids(tokenizer, cc.chat_format)
    gen = cc.generation(tokenizer, **generation)
    callback = None
    if stream is not None:
        so_far: list[int] = []

        def callback(ids):
            so_far.append(int(ids[0]))
            stream(tokenizer.decode(so_far, skip_special_tokens=True, errors="ignore"))
    new_ids = generate_ids(model, tokenizer, context, gen, stops, base_dir, callback=callback,
                           logits_processors=logits_processors)
    response = decode_response(context + new_ids, tokenizer, len(raw_text), len(context), cc.chat_format)
    if append_history:
        history.append((query, response))
    return response, history


def chat_stream(model, tokenizer, query: str, history: Optional[list] = None, system: str = DEFAULT_SYSTEM,
                chat_config: Optional[ChatConfig] = None, base_dir: Optional[str] = None,
                logits_processors: Sequence[Callable] = (), **generation) -> Iterator[str]:
    """Yields the response decoded so far after every new token (specials skipped, bad bytes ignored), like
    upstream chat_stream. Runs the decode loop in a worker thread and hands tokens over a queue."""
    import queue
    import threading

    cc = chat_config or ChatConfig()
    history = [] if history is None else history
    max_window = generation.pop("max_window_size", None) or cc.max_window_size
    _, context = make_context(tokenizer, query, history, system, max_window, cc.chat_format)
    stops = list(cc.stop_words_ids) + stop_words_ids(tokenizer, cc.chat_format)
    gen = cc.generation(tokenizer, **generation)
    q: "queue.Queue" = queue.Queue()
    done = object()

    def work():
        try:
            generate_ids(model, tokenizer, context, gen, stops, base_dir, callback=lambda ids: q.put(int(ids[0])),
                         logits_processors=logits_processors)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)
        finally:
            q.put(done)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    out: list[int] = []
    while True:
        item = q.get()
        if item is done:
            break
        if isinstance(item, BaseException):
            raise item
        out.append(item)
        yield tokenizer.decode(out, skip_special_tokens=True, errors="ignore")
    worker.join()


class QwenVLChatSession:
    """Appflow / CLI session: keeps the history; a turn with images prepends them as `Picture k:<img>path</img>`.
    `ask` returns {"result": response, "history": [...], "image": grounding picture or None}."""

    def __init__(self, folder: str, model, tokenizer=None, system: str = DEFAULT_SYSTEM,
                 base_dir: Optional[str] = None, draw_boxes: bool = True, font_path: Optional[str] = None,
                 **generation):
        from .tokenizer import QWenTokenizer

        self.folder = folder
        self.model = model
        self.tokenizer = tokenizer or QWenTokenizer.from_pretrained(folder)
        self.chat_config = ChatConfig.from_folder(folder)
        self.system = system
        self.base_dir = base_dir
        self.draw_boxes = draw_boxes
        default_font = os.path.join(folder, "SimSun.ttf")
        self.font_path = font_path or (default_font if os.path.isfile(default_font) else None)
        self.generation = generation
        self.history: list = []

    def reset(self):
        self.history = []

    def build_query(self, prompt: str, images: Optional[Sequence[str]] = None) -> str:
        """Upstream from_list_format: each image as `Picture k:<img>path</img>\n` (k from 1 in every turn)."""
        items = [{"image": os.fspath(p)} for p in (images or [])]
        return self.tokenizer.from_list_format(items + [{"text": prompt}])

    def ask(self, prompt: str, images: Optional[Sequence[str]] = None, stream: Optional[Callable] = None,
            **generation) -> dict:
        from ...grounding import draw_bbox_on_latest_picture

        query = self.build_query(prompt, images)
        kw = {**self.generation, **generation}
        response, self.history = chat(self.model, self.tokenizer, query, self.history, self.system,
                                      chat_config=self.chat_config, base_dir=self.base_dir, stream=stream, **kw)
        picture = None
        if self.draw_boxes:
            try:
                picture = draw_bbox_on_latest_picture(response, self.history, base_dir=self.base_dir,
                                                      font_path=self.font_path)
            except ValueError:  # a malformed box in free text: no picture rather than a failed turn
                picture = None
        return {"result": response, "history": list(self.history), "image": picture}


def chat_session(folder: str, model=None, **kw) -> QwenVLChatSession:
    if model is None:
        from ...checkpoint import load_model
        model = load_model(folder, dtype=kw.pop("dtype", "float32"))
    session = QwenVLChatSession(folder, model, **kw)
    model.chat_config = session.chat_config
    return session
