"""InternLM2 sentencepiece tokenizer as InternLM-XComposer-2.5 uses it.

Behaviour reproduced (verified against shared/fixtures/tokenizers/ixc2d5_tokenizer_golden.json, produced by the
upstream `InternLM2Tokenizer` loaded with transformers 4.33 `from_pretrained`):
- sentencepiece BPE as stored in `tokenizer.model` (no dummy prefix, identity normalizer, byte fallback);
  `[UNUSED_TOKEN_141..146]` are user-defined pieces, so sentencepiece keeps them atomic by itself.
- the special tokens `<s>`, `</s>`, `<unk>` (bos / eos / unk / pad) are split out of the text before
  sentencepiece runs, and whitespace on BOTH sides of each of them is stripped ("a </s> b" -> a, </s>, b).
- encode(add_special_tokens=True) prepends BOS only (add_bos_token true, add_eos_token false).
- decode: special tokens are written verbatim with a space inserted before a run of them, the rest goes through
  sentencepiece; the result always passes HF's `clean_up_tokenization` (" ." -> "." ...), because upstream's
  `convert_tokens_to_string` calls it unconditionally.
Chat roles: `[UNUSED_TOKEN_146]` opens a turn (<|im_start|>), `[UNUSED_TOKEN_145]` closes it (<|im_end|>, also a
stop id for chat).
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable, List, Optional, Sequence

import sentencepiece as spm

IM_START = "[UNUSED_TOKEN_146]"
IM_END = "[UNUSED_TOKEN_145]"
TOKENIZER_FILE = "tokenizer.model"


def _token_str(v) -> Optional[str]:
    """tokenizer_config.json stores a special token as a string or as an AddedToken dict."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, dict):
        return v.get("content")
    raise ValueError(f"unexpected special token entry {v!r}")


def _token_strip(v) -> tuple:
    """(lstrip, rstrip) transformers 4.33 applies around a special token: a plain string strips whitespace on
    both sides, an AddedToken (dict in tokenizer_config.json) only where its flags say so."""
    if isinstance(v, dict):
        return bool(v.get("lstrip", False)), bool(v.get("rstrip", False))
    return True, True


def clean_up_tokenization(text: str) -> str:
    """transformers' PreTrainedTokenizerBase.clean_up_tokenization (fixed list of replacements)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class InternLM2Tokenizer:
    def __init__(self, model_file: str, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>",
                 add_bos_token: bool = True, add_eos_token: bool = False):
        """Special tokens are strings (whitespace stripped on both sides of them in the text) or AddedToken-like
        dicts {"content", "lstrip", "rstrip"} (stripped only where the flags say)."""
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"sentencepiece model not found: {model_file}")
        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_file)
        except Exception as e:  # noqa: BLE001 - name the file
            raise ValueError(f"cannot read sentencepiece model {model_file}: {e}") from e
        given = (bos_token, eos_token, unk_token, pad_token)
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = (_token_str(t) for t in given)
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        # HF all_special_tokens (deduplicated, in attribute order) and how text around each is stripped
        self.all_special_tokens: List[str] = list(dict.fromkeys(_token_str(t) for t in given if t))
        self._strip = {}
        for t in given:
            if t and _token_str(t) not in self._strip:
                self._strip[_token_str(t)] = _token_strip(t)
        self.all_special_ids = {self.piece_to_id(t) for t in self.all_special_tokens}
        # longest first, so an alternation behaves like HF's trie (leftmost, then longest)
        alts = sorted(self.all_special_tokens, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in alts) + ")")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dir(cls, folder: str) -> "InternLM2Tokenizer":
        """Load `tokenizer.model` (+ `tokenizer_config.json` / `special_tokens_map.json` when present)."""
        model_file = os.path.join(folder, TOKENIZER_FILE)
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {folder}: the InternLM2 tokenizer needs it "
                                    "(copy it from the upstream model folder)")
        kw = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in HF
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                continue
            with open(path, encoding="utf-8") as f:
                try:
                    cfg = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} is not valid JSON: {e}") from e
            for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
                if cfg.get(key) is not None:
                    kw[key] = cfg[key]
            for key in ("add_bos_token", "add_eos_token"):
                if key in cfg:
                    kw[key] = bool(cfg[key])
        return cls(model_file, **kw)

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def piece_to_id(self, piece: str) -> int:
        return int(self.sp.piece_to_id(piece))

    convert_tokens_to_ids = piece_to_id

    def id_to_piece(self, i: int) -> str:
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return self.sp.id_to_piece(i)

    @property
    def bos_token_id(self) -> int:
        return int(self.sp.bos_id())

    @property
    def eos_token_id(self) -> int:
        return int(self.sp.eos_id())

    @property
    def pad_token_id(self) -> int:
        return self.piece_to_id(self.pad_token)

    @property
    def im_start_id(self) -> int:
        return self.piece_to_id(IM_START)

    @property
    def im_end_id(self) -> int:
        return self.piece_to_id(IM_END)

    # ------------------------------------------------------------------ encode
    def tokenize(self, text: str) -> List[str]:
        """Pieces of `text` (no BOS): special tokens split out with whitespace stripped around them."""
        parts = self._special_re.split(text)
        specials = set(self.all_special_tokens)
        # odd indices are the special tokens; strip the neighbouring text on the side facing the token
        for i in range(1, len(parts), 2):
            lstrip, rstrip = self._strip[parts[i]]
            if lstrip:
                parts[i - 1] = parts[i - 1].rstrip()
            if rstrip:
                parts[i + 1] = parts[i + 1].lstrip()
        pieces: List[str] = []
        for i, part in enumerate(parts):
            if not part:
                continue
            if i % 2 == 1 and part in specials:
                pieces.append(part)
            else:
                pieces.extend(self.sp.encode(part, out_type=str))
        return pieces

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        ids = [self.piece_to_id(p) for p in self.tokenize(text)]
        if add_special_tokens:
            if self.add_bos_token:
                ids = [self.bos_token_id] + ids
            if self.add_eos_token:
                ids = ids + [self.eos_token_id]
        return ids

    __call__ = encode

    # ------------------------------------------------------------------ decode
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.all_special_ids]
        tokens = [self.id_to_piece(i) for i in ids]
        if not tokens:
            return ""
        specials = set(self.all_special_tokens)
        out, run, prev_special = "", [], False
        for tok in tokens:
            if tok in specials:
                if not prev_special:
                    out += " "
                out += self.sp.decode(run) + tok
                prev_special, run = True, []
            else:
                run.append(tok)
                prev_special = False
        out += self.sp.decode(run)
        return clean_up_tokenization(out)


class MappedVocabTokenizer:
    """The real tokenizer seen through a reduced id table (the tiny test checkpoints' vocabularies).

    `real_ids[t]` is the real id of small-vocabulary id t (shared fixture `tiny_vocab.json`). Text is encoded
    with the real tokenizer and mapped; an id the small vocabulary lacks is an error naming the piece."""

    def __init__(self, real: InternLM2Tokenizer, real_ids: Sequence[int]):
        self.real = real
        self.real_ids = [int(i) for i in real_ids]
        self.to_small = {r: t for t, r in enumerate(self.real_ids)}
        if len(self.to_small) != len(self.real_ids):
            raise ValueError("real_ids has duplicates")

    @classmethod
    def from_json(cls, real: InternLM2Tokenizer, path: str) -> "MappedVocabTokenizer":
        with open(path, encoding="utf-8") as f:
            return cls(real, json.load(f)["real_ids"])

    def __getattr__(self, name):  # special token strings, flags, ...
        return getattr(self.real, name)

    def _small(self, real_id: int) -> int:
        try:
            return self.to_small[real_id]
        except KeyError:
            raise KeyError(f"token {self.real.id_to_piece(real_id)!r} (real id {real_id}) is not in the reduced "
                           f"vocabulary") from None

    @property
    def vocab_size(self) -> int:
        return len(self.real_ids)

    def piece_to_id(self, piece: str) -> int:
        return self._small(self.real.piece_to_id(piece))

    convert_tokens_to_ids = piece_to_id

    bos_token_id = property(lambda self: self._small(self.real.bos_token_id))
    eos_token_id = property(lambda self: self._small(self.real.eos_token_id))
    pad_token_id = property(lambda self: self._small(self.real.pad_token_id))
    im_start_id = property(lambda self: self._small(self.real.im_start_id))
    im_end_id = property(lambda self: self._small(self.real.im_end_id))

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        return [self._small(i) for i in self.real.encode(text, add_special_tokens)]

    __call__ = encode

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.real.decode([self.real_ids[int(i)] for i in ids], skip_special_tokens)
