"""Qwen2 / Qwen2.5 byte-level BPE tokenizer (the one POINTS 1.0 and POINTS-1.5 ship).

Backed by the `tokenizers` library. Loaded from a folder holding either `tokenizer.json` or
`vocab.json` + `merges.txt`; the added tokens (`<|im_start|>`, `<|image_pad|>`, ...) and their ids come from
the files (`tokenizer.json` "added_tokens" or `tokenizer_config.json` "added_tokens_decoder"), never from
literals: the tiny test vocabularies renumber them.

Behaviour matches `transformers.Qwen2TokenizerFast` as configured by the release: NFC normalizer, the Qwen2
pre-tokenizer regex (Split, Isolated) + ByteLevel without prefix space, no BOS/EOS added, added tokens matched
atomically anywhere in the text, `clean_up_tokenization_spaces` false.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Optional, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

# Qwen2 pre-tokenizer split pattern (tokenizer.json of every Qwen2/Qwen2.5 release).
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class QwenTokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` with the special-token bookkeeping of Qwen2TokenizerFast."""

    def __init__(self, backend: Tokenizer, tokenizer_config: Optional[dict] = None):
        self.backend = backend
        self.config = dict(tokenizer_config or {})
        self.eos_token = _token_str(self.config.get("eos_token")) or "<|im_end|>"
        self.pad_token = _token_str(self.config.get("pad_token")) or "<|endoftext|>"
        self.eos_token_id = self._require_id(self.eos_token)
        self.pad_token_id = self._require_id(self.pad_token)
        self.bos_token_id = None  # Qwen2 adds no BOS

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_dir(cls, folder: str) -> "QwenTokenizer":
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        cfg = _read_json(cfg_path) if os.path.exists(cfg_path) else {}
        tj = os.path.join(folder, "tokenizer.json")
        if os.path.exists(tj):
            try:
                backend = Tokenizer.from_file(tj)
            except Exception as e:  # noqa: BLE001 - re-raise with the file named
                raise ValueError(f"cannot read tokenizer file {tj}: {e}") from e
            # tokenizer_config.json may declare added tokens tokenizer.json lacks (rare); add them with their ids.
            _add_config_tokens(backend, cfg, strict_ids=True, source=cfg_path)
            return cls(backend, cfg)
        vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        if not (os.path.exists(vocab_path) and os.path.exists(merges_path)):
            raise FileNotFoundError(
                f"no tokenizer in {folder}: expected tokenizer.json, or vocab.json + merges.txt")
        vocab = _read_json(vocab_path)
        merges = read_merges(merges_path)
        return cls.from_vocab_merges(vocab, merges, cfg)

    @classmethod
    def from_vocab_merges(cls, vocab: dict, merges: Sequence, tokenizer_config: Optional[dict] = None
                          ) -> "QwenTokenizer":
        """Build the Qwen2 pipeline from a BPE vocab ({token: id}) and merges ([(a, b)] or ["a b"])."""
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
        backend = Tokenizer(models.BPE(vocab=dict(vocab), merges=merges, unk_token=None,
                                       continuing_subword_prefix="", end_of_word_suffix="",
                                       fuse_unk=False, byte_fallback=False))
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        cfg = dict(tokenizer_config or {})
        _add_config_tokens(backend, cfg, strict_ids=True, source="tokenizer_config.json")
        return cls(backend, cfg)

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS), added tokens matched atomically."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def tokenize(self, text: str) -> list[str]:
        return self.backend.encode(text, add_special_tokens=False).tokens

    __call__ = encode

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def id_to_token(self, idx: int) -> Optional[str]:
        return self.backend.id_to_token(int(idx))

    def convert_tokens_to_ids(self, token: str) -> int:
        return self._require_id(token)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _require_id(self, token: str) -> int:
        idx = self.backend.token_to_id(token)
        if idx is None:
            raise KeyError(f"token {token!r} is not in the tokenizer vocabulary")
        return idx


# -------------------------------------------------------------------- helpers
def read_merges(path: str) -> list[tuple[str, str]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            line = line.rstrip("\n")
            if (i == 0 and line.startswith("#version")) or not line:
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{path}:{i + 1}: bad merge line {line!r}")
            out.append((parts[0], parts[1]))
    return out


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def _token_str(tok) -> Optional[str]:
    if tok is None or isinstance(tok, str):
        return tok
    if isinstance(tok, dict):
        return tok.get("content")
    return str(tok)


def _add_config_tokens(backend: Tokenizer, cfg: dict, strict_ids: bool, source: str) -> None:
    """Add tokenizer_config.json `added_tokens_decoder` entries not yet known, checking they get their ids."""
    table = cfg.get("added_tokens_decoder") or {}
    for idx in sorted(table, key=int):
        spec = table[idx]
        content = spec["content"]
        have = backend.token_to_id(content)
        if have is not None:
            if strict_ids and have != int(idx):
                raise ValueError(f"{source}: added token {content!r} has id {idx} but the vocabulary gives {have}")
            continue
        tok = AddedToken(content, single_word=spec.get("single_word", False), lstrip=spec.get("lstrip", False),
                         rstrip=spec.get("rstrip", False), normalized=spec.get("normalized", False),
                         special=spec.get("special", False))
        if spec.get("special", False):
            backend.add_special_tokens([tok])
        else:
            backend.add_tokens([tok])
        got = backend.token_to_id(content)
        if strict_ids and got != int(idx):
            raise ValueError(f"{source}: added token {content!r} should get id {idx} but got {got} "
                             f"(vocabulary size {backend.get_vocab_size(with_added_tokens=False)})")
