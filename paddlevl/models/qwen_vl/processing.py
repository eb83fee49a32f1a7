"""Qwen-VL inputs: image loading, the image transform, and finding the image spans inside token ids.

Upstream reads the images named inside the prompt: each `<img>path</img>` span of the ids holds the path's UTF-8
bytes followed by `<imgpad>` ids; the model decodes the path, opens the picture (`Image.open(path)` relative to the
working directory, or an http(s) URL), converts it to RGB and applies `image_transform`:
PIL bicubic resize to S x S (aspect ratio not kept) -> /255 -> (x - mean) / std, in float32."""
from __future__ import annotations

import io
import os
import urllib.error
import urllib.request
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .tokenizer import IMG_TOKEN_SPAN

IMAGE_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
IMAGE_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
# The model reads ids[a+1 : b-1] and needs an <imgpad> in that slice: paths of 255/256 bytes tokenize but break
# the upstream model, so they are refused here with a clear message.
MAX_IMAGE_PATH_BYTES = IMG_TOKEN_SPAN - 2


class ImageLoadError(ValueError):
    """An image named in the prompt could not be read."""


def is_url(path: str) -> bool:
    return path.startswith("http://") or path.startswith("https://")


def load_image(path: str, base_dir: str | None = None, timeout: float = 10.0) -> Image.Image:
    """Open the picture a prompt names and convert it to RGB (RGBA: alpha dropped; L/CMYK/P: Pillow's convert)."""
    if is_url(path):
        try:
            with urllib.request.urlopen(path, timeout=timeout) as resp:
                data = resp.read()
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ImageLoadError(f"cannot download image {path!r}: {e}. Without network access, save the picture "
                                 "locally and put its file path inside <img></img>.") from e
        source, label = io.BytesIO(data), path
    else:
        full = path if base_dir is None or os.path.isabs(path) else os.path.join(base_dir, path)
        if not os.path.isfile(full):
            raise FileNotFoundError(f"image file not found: {full!r} (named in the prompt as <img>{path}</img>)")
        source, label = full, full
    try:
        with Image.open(source) as img:
            return img.convert("RGB")
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"{label!r} is not an image file Pillow can read") from e
    except OSError as e:  # truncated / corrupt files
        raise ImageLoadError(f"cannot read image {label!r}: {e}") from e


def image_transform(image: Image.Image, image_size: int) -> np.ndarray:
    """RGB PIL image -> float32 [3, S, S]: bicubic resize, /255, normalise (torchvision Resize/ToTensor/Normalize)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    resized = image.resize((image_size, image_size), Image.BICUBIC)
    x = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
    return (x - IMAGE_MEAN[:, None, None]) / IMAGE_STD[:, None, None]


def find_image_spans(ids: Sequence[int], img_start_id: int) -> list[tuple[int, int]]:
    """[(index of <img>, index of </img>), ...] of one id sequence, in order; </img> id is <img> id + 1."""
    ids = [int(i) for i in ids]
    starts = [i for i, t in enumerate(ids) if t == img_start_id]
    ends = [i for i, t in enumerate(ids) if t == img_start_id + 1]
    if len(starts) != len(ends) or any(not a < b for a, b in zip(starts, ends)):
        raise ValueError(f"unbalanced image tags in the input ids: <img> at {starts}, </img> at {ends}")
    spans = list(zip(starts, ends))
    for (a, b), nxt in zip(spans, starts[1:]):
        if nxt < b:
            raise ValueError(f"nested <img> at {nxt} inside the image span {a}..{b}")
    for a, b in spans:
        if b - a - 1 != IMG_TOKEN_SPAN:
            raise ValueError(f"image span {a}..{b} holds {b - a - 1} ids, Qwen-VL needs exactly {IMG_TOKEN_SPAN}")
    return spans


def image_path_from_span(ids: Sequence[int], a: int, b: int, pad_id: int) -> str:
    """Decode the path bytes of the span <img> at a .. </img> at b (as the upstream model does)."""
    inner = [int(t) for t in ids[a + 1:b - 1]]
    if pad_id not in inner:
        n = len([t for t in ids[a + 1:b] if t != pad_id])
        raise ValueError(f"image path of {n} bytes is too long: Qwen-VL reads at most {MAX_IMAGE_PATH_BYTES} bytes "
                         "between <img> and </img>")
    raw = inner[:inner.index(pad_id)]
    if any(t > 255 for t in raw):
        raise ValueError(f"image span {a}..{b} holds non-byte ids {[t for t in raw if t > 255][:4]}")
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"image path in span {a}..{b} is not valid UTF-8") from e


class QwenVLProcessor:
    """prompt text / chat context ids -> model inputs (numpy): input_ids, attention_mask, pixel_values, image_spans."""

    def __init__(self, tokenizer, image_size: int, image_start_id: int | None = None, base_dir: str | None = None):
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.image_start_id = tokenizer.img_start_id if image_start_id is None else int(image_start_id)
        if self.image_start_id != tokenizer.img_start_id:
            raise ValueError(f"config visual.image_start_id {self.image_start_id} != tokenizer <img> id "
                             f"{tokenizer.img_start_id}: the vocabulary does not belong to this checkpoint")
        self.base_dir = base_dir

    def images_from_ids(self, batch_ids) -> tuple[list[str], np.ndarray]:
        """Paths (row-major over the batch, then position) and spans [N, 3] = (row, a, b)."""
        paths, spans = [], []
        for row, ids in enumerate(batch_ids):
            for a, b in find_image_spans(ids, self.image_start_id):
                paths.append(image_path_from_span(ids, a, b, self.image_start_id + 2))
                spans.append((row, a, b))
        return paths, np.asarray(spans, dtype=np.int64).reshape(-1, 3)

    def pixel_values(self, paths: list[str]) -> np.ndarray:
        if not paths:
            return np.zeros((0, 3, self.image_size, self.image_size), dtype=np.float32)
        return np.stack([image_transform(load_image(p, self.base_dir), self.image_size) for p in paths])

    def __call__(self, batch_ids) -> dict:
        """batch_ids: list of id lists (equal lengths) or one id list."""
        if len(batch_ids) and isinstance(batch_ids[0], (int, np.integer)):
            batch_ids = [batch_ids]
        lengths = {len(r) for r in batch_ids}
        if len(lengths) != 1:
            raise ValueError(f"rows of different lengths {sorted(lengths)}; pad them first")
        input_ids = np.asarray(batch_ids, dtype=np.int64)
        paths, spans = self.images_from_ids(input_ids.tolist())
        return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids),
                "pixel_values": self.pixel_values(paths), "image_spans": spans, "image_paths": paths}
