"""POINTS 1.0 preprocessing: image loading, the CLIP image processor, CATTY crops, and the hand-built chat prompt.

The CLIP processor reproduces transformers' ``CLIPImageProcessor.preprocess`` (convert RGB, resize the shortest
edge with PIL, center crop, rescale in float64 then float32, normalize in float32, channels first) from the values
of ``preprocessor_config.json``. Upstream ``chat()`` cuts CATTY tiles at CATTY's default size (336) whatever the
tower's image size; with the released 336 tower resize and crop are identities on the chat path and the output is
``((uint8 / 255) - mean) / std`` bit-exactly as upstream; a tower of another size gets the processor's resize.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import List, Sequence, Union

import numpy as np
from PIL import Image

from .catty_v1 import split_image, split_image_with_catty

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ------------------------------------------------------------------------------------------------ images
def load_image(image: Union[str, os.PathLike, Image.Image]) -> Image.Image:
    """A PIL image from a path (decoded fully now, so a truncated/corrupt file fails here with its name) or an
    image given as is. The mode is kept: the crops are converted to RGB by the processor, as upstream."""
    if isinstance(image, Image.Image):
        img = image
    else:
        path = os.fspath(image)
        if not os.path.exists(path):
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            img = Image.open(path)
            img.load()
        except Exception as e:  # noqa: BLE001 - PIL raises several types (UnidentifiedImageError, OSError, ...)
            raise ValueError(f"cannot read image {path}: {e}") from e
    if img.width < 1 or img.height < 1:
        raise ValueError(f"image has no pixels ({img.width}x{img.height})")
    return img


# ------------------------------------------------------------------------------------------------ processor
def _shortest_edge(size) -> int:
    if isinstance(size, int):
        return size
    if "shortest_edge" in size:
        return int(size["shortest_edge"])
    raise ValueError(f"preprocessor_config.json: unsupported 'size' {size!r} (expected an int or shortest_edge)")


def _hw(size) -> tuple:
    if isinstance(size, int):
        return size, size
    return int(size["height"]), int(size["width"])


@dataclass
class CLIPImageProcessor:
    size: int = 336                 # shortest edge after resize
    crop_size: tuple = (336, 336)   # (height, width)
    resample: int = 3               # PIL BICUBIC
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPImageProcessor":
        return cls(size=_shortest_edge(d.get("size", 336)), crop_size=_hw(d.get("crop_size", 336)),
                   resample=int(d.get("resample", 3)), do_resize=bool(d.get("do_resize", True)),
                   do_center_crop=bool(d.get("do_center_crop", True)), do_rescale=bool(d.get("do_rescale", True)),
                   rescale_factor=float(d.get("rescale_factor", 1 / 255)),
                   do_normalize=bool(d.get("do_normalize", True)),
                   image_mean=tuple(d.get("image_mean", CLIP_MEAN)), image_std=tuple(d.get("image_std", CLIP_STD)),
                   do_convert_rgb=bool(d.get("do_convert_rgb", True)))

    @classmethod
    def from_dir(cls, folder: str) -> "CLIPImageProcessor":
        path = os.path.join(folder, "preprocessor_config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no preprocessor_config.json in {folder}")
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_dict(json.load(f))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read {path}: {e}") from e

    def _one(self, img: Image.Image) -> np.ndarray:
        if self.do_convert_rgb and img.mode != "RGB":
            img = img.convert("RGB")
        if self.do_resize:
            w, h = img.size
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.size, int(self.size * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
            img = img.resize((new_w, new_h), resample=self.resample)
        x = np.asarray(img)
        if x.ndim == 2:
            x = x[:, :, None]
        if self.do_center_crop:
            x = _center_crop(x, *self.crop_size)
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = x.astype(np.float32) if not np.issubdtype(x.dtype, np.floating) else x
            x = (x - np.asarray(self.image_mean, dtype=x.dtype)) / np.asarray(self.image_std, dtype=x.dtype)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        """[n, 3, crop_h, crop_w] float32, in the order given."""
        if isinstance(images, Image.Image):
            images = [images]
        if not images:
            raise ValueError("no images to preprocess")
        return np.stack([self._one(im) for im in images]).astype(np.float32)

    __call__ = preprocess


def _center_crop(x: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """transformers.image_transforms.center_crop on HWC: zero-pads first when the crop is larger."""
    h, w = x.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return x[top:top + ch, left:left + cw]
    nh, nw = max(ch, h), max(cw, w)
    canvas = np.zeros((nh, nw) + x.shape[2:], dtype=x.dtype)
    tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    canvas[tp:tp + h, lp:lp + w] = x
    top, left = top + tp, left + lp
    return canvas[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


# ------------------------------------------------------------------------------------------------ prompt
IMAGE_TOKEN = "<|image_pad|>"
END_TOKEN = "<|im_end|>"


def build_prompt(prompt: str, num_crops: int, tokens_per_crop: int) -> str:
    """The POINTS 1.0 chat text: one user turn, the image run first, no system turn (NOT the tokenizer template)."""
    image_tokens = IMAGE_TOKEN * (tokens_per_crop * num_crops)
    return f"<|im_start|>user\n{image_tokens}{prompt}<|im_end|>\n<|im_start|>assistant\n"


# upstream chat() calls split_image_with_catty(img, do_resize=True, max_crop_slices=M) / split_image(img, max_splits=M)
# without an image size, so tiles are always cut at the functions' default of 336 px
CATTY_TILE = 336


def crop_image(image: Image.Image, catty: bool = True, max_splits: int = 8,
               tile: int = CATTY_TILE) -> List[Image.Image]:
    if catty:
        return split_image_with_catty(image, image_size=tile, max_splits=max_splits, do_resize=True)
    return split_image(image, image_size=tile, max_splits=max_splits)


@dataclass
class PointsV1Inputs:
    input_ids: np.ndarray       # [1, L] int64
    attention_mask: np.ndarray  # [1, L] int64
    pixel_values: np.ndarray    # [n_crops, 3, S, S] float32
    num_crops: int
    text: str


class PointsV1Processor:
    """Image + prompt -> model inputs, with every size from the checkpoint folder (vision_config, tokenizer files,
    preprocessor_config.json)."""

    def __init__(self, tokenizer, image_processor: CLIPImageProcessor, image_size: int, tokens_per_crop: int):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_size = image_size
        self.tokens_per_crop = tokens_per_crop
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.eos_token_id = tokenizer.convert_tokens_to_ids(END_TOKEN)

    def __call__(self, image, prompt: str, catty: bool = True, max_splits: int = 8) -> PointsV1Inputs:
        image = load_image(image)
        crops = crop_image(image, catty=catty, max_splits=max_splits)
        pixel_values = self.image_processor.preprocess(crops)
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"preprocessor_config.json crops to {tuple(pixel_values.shape[-2:])} but the vision "
                             f"tower takes {self.image_size}x{self.image_size} images")
        text = build_prompt(prompt, len(crops), self.tokens_per_crop)
        ids = np.asarray([self.tokenizer.encode(text)], dtype=np.int64)
        n_img = int((ids == self.image_token_id).sum())
        if n_img != len(crops) * self.tokens_per_crop:
            raise ValueError(f"the prompt text contains {IMAGE_TOKEN}: found {n_img} image tokens, expected "
                             f"{len(crops) * self.tokens_per_crop}")
        return PointsV1Inputs(ids, np.ones_like(ids), pixel_values, len(crops), text)
