"""One decode loop for every family.

The language model passed in follows the decoder protocol of DESIGN.md:
    lm.embed(ids [B, L]) -> [B, L, H]
    lm.forward_embeds(inputs_embeds, attention_mask [B, P+L], position_ids [B, L], cache, **extra) -> logits [B, L, V]
    lm.new_cache() -> KVCache
Prefill runs on input embeddings (so images can be spliced in), decode feeds one token per row with the KV cache.
Batches are left-padded: attention_mask has leading zeros and positions count real tokens only.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import numpy as np
import paddle


@dataclass
class GenerationConfig:
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_ids: Sequence[int] = ()
    pad_token_id: int = 0
    stop_strings: Sequence[str] = ()
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        # HF convention: temperature 0 (POINTS README) means greedy too
        return not self.do_sample or self.temperature == 0

    def updated(self, **kw) -> "GenerationConfig":
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


@dataclass
class GenerationOutput:
    sequences: list  # per row: generated ids (stop token included when one ended the row)
    finished: list  # per row: True when a stop id / stop string ended it
    step_logits: list = field(default_factory=list)  # per step: float32 [B, V] processed-before logits


def position_ids_from_mask(mask: np.ndarray, query_len: int) -> np.ndarray:
    """Positions of the last `query_len` columns: number of real tokens before each one (padding -> 0)."""
    pos = np.cumsum(mask, axis=1) - 1
    return np.maximum(pos[:, -query_len:], 0).astype(np.int64)


def _penalize(logits: np.ndarray, seen_rows: list, penalty: float) -> np.ndarray:
    """HF RepetitionPenaltyLogitsProcessor on each row: a seen token's logit x p if < 0, else / p."""
    out = logits.copy()
    for b, seen in enumerate(seen_rows):
        if not seen:
            continue
        idx = np.unique(np.asarray(seen, dtype=np.int64))
        vals = out[b, idx]
        out[b, idx] = np.where(vals < 0, vals * penalty, vals / penalty)
    return out


def _filter_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.sort(logits, axis=-1)[:, -k][:, None]
    return np.where(logits < kth, -np.inf, logits)


def _filter_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """HF TopPLogitsWarper: drop the low tail whose cumulative probability is <= 1 - p (keep at least one)."""
    if p >= 1.0:
        return logits
    out = logits.copy()
    for b in range(logits.shape[0]):
        order = np.argsort(logits[b], kind="stable")  # ascending
        srt = logits[b, order].astype(np.float64)
        probs = np.exp(srt - srt.max())
        probs /= probs.sum()
        remove = np.cumsum(probs) <= (1 - p)
        remove[-1] = False
        out[b, order[remove]] = -np.inf
    return out


def generate(lm, inputs_embeds, attention_mask, config: GenerationConfig, *,
             prefill_extra: Optional[dict] = None, step_extra: Optional[dict] = None,
             penalty_ids: Optional[Sequence[Sequence[int]]] = None,
             logits_processors: Sequence[Callable] = (),
             decode: Optional[Callable[[list], str]] = None,
             callback: Optional[Callable[[np.ndarray], None]] = None,
             return_step_logits: bool = False) -> GenerationOutput:
    """Generate up to config.max_new_tokens tokens after the prompt embeddings.

    attention_mask: [B, L] ints (1 real, 0 left padding). penalty_ids: per row, the ids the repetition penalty sees
    besides the generated ones (the prompt ids for HF generate(input_ids); transformers 4.33 generate(inputs_embeds)
    starts from [bos], which IXC2.5 passes).
    logits_processors: callables (generated_rows, logits [B, V] float32 numpy) -> logits, applied first.
    decode: ids -> text, needed for stop_strings. callback: called with the [B] ids of every step (streaming)."""
    mask = np.asarray(attention_mask.numpy() if isinstance(attention_mask, paddle.Tensor) else attention_mask,
                      dtype=np.int64)
    if mask.ndim != 2 or mask.shape[:2] != tuple(inputs_embeds.shape[:2]):
        raise ValueError(f"attention_mask shape {mask.shape} does not match inputs_embeds {inputs_embeds.shape}")
    bsz = mask.shape[0]
    if config.stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function")
    rng = np.random.default_rng(config.seed)
    eos = set(int(i) for i in config.eos_token_ids)
    cache = lm.new_cache()
    generated = [[] for _ in range(bsz)]
    finished = [False] * bsz
    step_logits = []

    embeds, extra = inputs_embeds, dict(prefill_extra or {})
    with paddle.no_grad():
        for step in range(config.max_new_tokens):
            q = embeds.shape[1]
            pos = paddle.to_tensor(position_ids_from_mask(mask, q))
            logits = lm.forward_embeds(embeds, paddle.to_tensor(mask), pos, cache, **extra)
            last = logits[:, -1, :].astype("float32").numpy()
            if return_step_logits:
                step_logits.append(last.copy())
            for proc in logits_processors:
                last = proc(generated, last)
            if config.repetition_penalty != 1.0:
                seen = [list(penalty_ids[b]) + generated[b] if penalty_ids is not None else generated[b]
                        for b in range(bsz)]
                last = _penalize(last, seen, config.repetition_penalty)
            if config.greedy:
                nxt = last.argmax(axis=-1)
            else:
                scores = _filter_top_p(_filter_top_k(last / config.temperature, config.top_k), config.top_p)
                scores = scores - scores.max(axis=-1, keepdims=True)
                probs = np.exp(scores.astype(np.float64))
                probs /= probs.sum(axis=-1, keepdims=True)
                nxt = np.array([rng.choice(probs.shape[-1], p=probs[b]) for b in range(bsz)])
            nxt = np.where(finished, config.pad_token_id, nxt).astype(np.int64)
            for b in range(bsz):
                if finished[b]:
                    continue
                generated[b].append(int(nxt[b]))
                if int(nxt[b]) in eos:
                    finished[b] = True
                elif config.stop_strings and any(s in decode(generated[b]) for s in config.stop_strings):
                    finished[b] = True
            if callback is not None:
                callback(nxt)
            if all(finished):
                break
            mask = np.concatenate([mask, np.ones([bsz, 1], dtype=np.int64)], axis=1)
            embeds = lm.embed(paddle.to_tensor(nxt.reshape([bsz, 1])))
            extra = dict(step_extra or {})
    return GenerationOutput(sequences=generated, finished=finished, step_logits=step_logits)
