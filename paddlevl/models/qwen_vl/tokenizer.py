"""Qwen-VL tokenizer on tiktoken (the behaviour of upstream tokenization_qwen.py, written from its facts).

* BPE ranks come from `qwen.tiktoken` (base64 token + rank per line). Special ids follow the ranks:
  `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|extra_0..204|>`, then the nine vision tags.
* `encode(text)` recognises every special token (the default `allowed_special="all"`), then rewrites each
  `<img>...</img>` span: the UTF-8 bytes between the tags become ids equal to the byte values, right-padded with
  `<imgpad>` to 256 ids (258 with the tags).
* `decode` turns image spans back into their path text; `skip_special_tokens` drops every id >= `<|endoftext|>`.
"""
from __future__ import annotations

import base64
import os
import unicodedata
from typing import Callable, Collection, Iterable, Sequence, Union

import tiktoken

VOCAB_FILE = "qwen.tiktoken"
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
SPECIAL_TOKENS = (ENDOFTEXT, IMSTART, IMEND) + EXTRAS
IMG_START, IMG_END, IMG_PAD = "<img>", "</img>", "<imgpad>"
REF_START, REF_END = "<ref>", "</ref>"
BOX_START, BOX_END = "<box>", "</box>"
QUAD_START, QUAD_END = "<quad>", "</quad>"
IMAGE_ST = (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END, IMG_START, IMG_END, IMG_PAD)
IMG_TOKEN_SPAN = 256  # ids between <img> and </img>


def load_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Read a `.tiktoken` file (one `base64-token rank` per line; CRLF tolerated)."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f.read().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:60]!r}")
            ranks[base64.b64decode(parts[0])] = int(parts[1])
    return ranks


def replace_closed_tags(items: list, starts: Sequence, ends: Sequence, inside: Callable, outside: Callable):
    """Split `items` at closed tag pairs: `inside(items[start:end+1])` for each span (tags included),
    `outside(run)` for the runs between them; an opening tag without its closing one raises."""
    out = []
    pos = 0
    n = len(items)
    while True:
        start = next((i for i in range(pos, n) if items[i] in starts), -1)
        if start == -1:
            break
        out.extend(outside(items[pos:start]))
        closing = ends[list(starts).index(items[start])]
        end = next((i for i in range(start, n) if items[i] == closing), -1)
        if end == -1:
            raise ValueError("Unclosed image token")
        out.extend(inside(items[start:end + 1]))
        pos = end + 1
    out.extend(outside(items[pos:]))
    return out


class QWenTokenizer:
    """The Qwen-VL tokenizer. `QWenTokenizer.from_pretrained(folder)` reads `folder/qwen.tiktoken`."""

    vocab_file_name = VOCAB_FILE

    def __init__(self, vocab_file: str, errors: str = "replace"):
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"Qwen-VL vocabulary not found: {vocab_file}")
        self.vocab_file = vocab_file
        self.errors = errors
        self.mergeable_ranks = load_tiktoken_ranks(vocab_file)
        base = len(self.mergeable_ranks)
        self.special_tokens = {tok: base + i for i, tok in enumerate(SPECIAL_TOKENS + IMAGE_ST)}
        self.IMAGE_ST = IMAGE_ST
        self.tokenizer = tiktoken.Encoding("Qwen", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks,
                                           special_tokens=self.special_tokens)
        if self.tokenizer.n_vocab != base + len(self.special_tokens):
            raise ValueError(f"{vocab_file}: ranks are not 0..{base - 1} (tiktoken n_vocab {self.tokenizer.n_vocab}"
                             f" != {base} ranks + {len(self.special_tokens)} specials)")
        self.decoder: dict[int, Union[bytes, str]] = {v: k for k, v in self.mergeable_ranks.items()}
        self.decoder.update({v: k for k, v in self.special_tokens.items()})
        st = self.special_tokens
        self.eod_id = st[ENDOFTEXT]
        self.im_start_id, self.im_end_id = st[IMSTART], st[IMEND]
        self.img_start_id, self.img_end_id, self.img_pad_id = st[IMG_START], st[IMG_END], st[IMG_PAD]
        self.ref_start_id, self.ref_end_id = st[REF_START], st[REF_END]
        self.box_start_id, self.box_end_id = st[BOX_START], st[BOX_END]
        self.quad_start_id, self.quad_end_id = st[QUAD_START], st[QUAD_END]
        self.image_start_tag, self.image_end_tag, self.image_pad_tag = IMG_START, IMG_END, IMG_PAD

    @classmethod
    def from_pretrained(cls, folder: str, **kw) -> "QWenTokenizer":
        path = folder if os.path.isfile(folder) else os.path.join(folder, VOCAB_FILE)
        return cls(path, **kw)

    # ---- sizes -----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.tokenizer.n_vocab

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.n_vocab

    @property
    def pad_token_id(self) -> int:
        return self.eod_id

    @property
    def eos_token_id(self) -> int:
        return self.eod_id

    # ---- encoding ----------------------------------------------------------------------------------------------
    def _raw_encode(self, text: str, allowed_special, disallowed_special) -> list[int]:
        return self.tokenizer.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)

    def _image_span_ids(self, span: list[int]) -> list[int]:
        """[<img>, path tokens..., </img>] -> [<img>, byte ids..., <imgpad>*, </img>] (256 ids inside)."""
        pieces = []
        for i in span[1:-1]:
            piece = self.decoder[i]
            if isinstance(piece, str):
                raise ValueError(f"special token {piece!r} inside {IMG_START}..{IMG_END}")
            pieces.append(piece)
        path = b"".join(pieces)
        if len(path) > IMG_TOKEN_SPAN:
            raise ValueError(f"The content in {IMG_START}..{IMG_END} is too long")
        ids = list(path)  # byte b -> id b (the rank-b token), not the BPE token of that byte
        return [self.img_start_id] + ids + [self.img_pad_id] * (IMG_TOKEN_SPAN - len(ids)) + [self.img_end_id]

    def encode(self, text: str, allowed_special: Union[str, Collection[str]] = "all",
               disallowed_special: Union[str, Collection[str]] = ()) -> list[int]:
        """Upstream `tokenizer.encode(text, allowed_special=...)`: NFC, tiktoken, image spans rewritten."""
        text = unicodedata.normalize("NFC", text)
        if allowed_special != "all":
            allowed_special = set(allowed_special)
        ids = self._raw_encode(text, allowed_special, disallowed_special)
        return replace_closed_tags(ids, (self.img_start_id,), (self.img_end_id,), self._image_span_ids,
                                   lambda run: run)

    def __call__(self, text: Union[str, Sequence[str]], return_tensors: str | None = None, **kw) -> dict:
        """HF-style: {"input_ids", "attention_mask"} for one text or a list of equally long encodings
        (return_tensors "np" / "pd" for arrays)."""
        texts = [text] if isinstance(text, str) else list(text)
        ids = [self.encode(t, **kw) for t in texts]
        out = {"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]}
        if return_tensors is None:
            return {k: v[0] for k, v in out.items()} if isinstance(text, str) else out
        if len({len(r) for r in ids}) != 1:
            raise ValueError("texts encode to different lengths; pad them before making tensors")
        import numpy as np
        arrays = {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}
        if return_tensors == "np":
            return arrays
        if return_tensors == "pd":
            import paddle
            return {k: paddle.to_tensor(v) for k, v in arrays.items()}
        raise ValueError(f"return_tensors must be None, 'np' or 'pd', got {return_tensors!r}")

    def tokenize(self, text: str, **kw) -> list[Union[bytes, str]]:
        """Token surface forms (bytes for BPE pieces, str for specials) of `encode(text)`."""
        return [self.decoder[i] for i in self.encode(text, **kw)]

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, (str, bytes)):
            return self.special_tokens[tokens] if tokens in self.special_tokens else self.mergeable_ranks.get(tokens)
        return [self.convert_tokens_to_ids(t) for t in tokens]

    # ---- decoding ----------------------------------------------------------------------------------------------
    def _image_span_text_ids(self, span: list[int]) -> list[int]:
        inner = list(span[1:-1])
        if self.img_pad_id not in inner:
            raise ValueError(f"image span without {IMG_PAD} (a path of {len(inner)} bytes cannot be decoded)")
        path = bytes(inner[:inner.index(self.img_pad_id)]).decode("utf-8")
        return [self.img_start_id] + self.tokenizer.encode(path) + [self.img_end_id]

    def decode(self, token_ids: Union[int, Iterable[int]], skip_special_tokens: bool = False,
               errors: str | None = None) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        ids = [int(i) for i in token_ids]
        ids = replace_closed_tags(ids, (self.img_start_id,), (self.img_end_id,), self._image_span_text_ids,
                                  lambda run: run)
        if skip_special_tokens:
            ids = [i for i in ids if i < self.eod_id]
        bad = [i for i in ids if not 0 <= i < self.tokenizer.n_vocab]
        if bad:
            raise ValueError(f"ids outside the vocabulary (0..{self.tokenizer.n_vocab - 1}): {bad[:8]}")
        return self.tokenizer.decode(ids, errors=errors or self.errors)

    # ---- list format -------------------------------------------------------------------------------------------
    def from_list_format(self, list_format: list[dict]) -> str:
        """[{'image': p}, {'text': t}, {'ref': r, 'box': [[x1,y1,x2,y2], ...]}] -> the prompt text."""
        text = ""
        n_images = 0
        for ele in list_format:
            if "image" in ele:
                n_images += 1
                text += f"Picture {n_images}:{IMG_START}{ele['image']}{IMG_END}\n"
            elif "text" in ele:
                text += ele["text"]
            elif "box" in ele:
                if "ref" in ele:
                    text += REF_START + ele["ref"] + REF_END
                for box in ele["box"]:
                    text += BOX_START + "(%d,%d),(%d,%d)" % (box[0], box[1], box[2], box[3]) + BOX_END
            else:
                raise ValueError(f"Unsupport element: {ele}")
        return text

    def _join_text(self, ids: list[int]) -> str:
        parts = [self.decoder[i] for i in ids]
        return b"".join(p.encode("utf-8") if isinstance(p, str) else p for p in parts).decode("utf-8")

    def to_list_format(self, text: str) -> list[dict]:
        """Inverse of from_list_format: text, image, ref, box and quad elements in order."""
        text = unicodedata.normalize("NFC", text)
        ids = self.tokenizer.encode(text, allowed_special=set(IMAGE_ST + (ENDOFTEXT,)))
        kinds = {(self.img_start_id, self.img_end_id): "image", (self.ref_start_id, self.ref_end_id): "ref",
                 (self.box_start_id, self.box_end_id): "box", (self.quad_start_id, self.quad_end_id): "quad"}

        def element(run):
            if not run:
                return []
            key = kinds.get((run[0], run[-1]))
            if key is None:
                return [{"text": self._join_text(run)}]
            return [{key: self._join_text(run[1:-1])}]

        starts = tuple(k[0] for k in kinds)
        ends = tuple(k[1] for k in kinds)
        return replace_closed_tags(ids, starts, ends, element, element)

    # ---- images inside ids -------------------------------------------------------------------------------------
    def image_paths_from_ids(self, ids: Sequence[int]) -> list[str]:
        """The image path of every <img>..</img> span of one id sequence (see processing.find_image_spans)."""
        from .processing import find_image_spans, image_path_from_span
        return [image_path_from_span(ids, a, b, self.img_pad_id) for a, b in find_image_spans(ids, self.img_start_id)]
