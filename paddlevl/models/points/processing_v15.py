"""POINTS-1.5 inputs: image loading, the Qwen2-VL image processor as POINTS uses it, prompt building.

Image processor (WePOINTS Qwen2ImageProcessorForPOINTSV15, values from preprocessor_config.json):
  RGB uint8 -> smart_resize to multiples of patch*merge px (POINTS variant: sides under the factor are allowed)
  -> PIL resize with the configured filter (bicubic) -> float64 * rescale_factor -> float32 -> (x - mean) / std
  (float32) -> CHW -> frame repeated to temporal_patch_size -> patches in merge x merge block order, each row
  flattened as (C, T, p, p); image_grid_thw = (1, h / p, w / p).
Prompt (POINTSV15ChatModel.construct_prompt / apply_chat_template): per message
  '<|im_start|>' + role + '\\n' + content + '<|im_end|>\\n', content = its items concatenated, an image item being
  '<|vision_start|>' + '<|image_pad|>' * (h * w / merge^2) + '<|vision_end|>' + '\\n'; '<|im_start|>assistant\\n'
  appended when the last message is the user's. No system prompt.
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image

VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
MAX_ASPECT_RATIO = 200


class ImageError(ValueError):
    """An image that cannot be used, with the reason (and the file when known)."""


# ------------------------------------------------------------------------------------------------ images
def load_image(src: Any) -> Image.Image:
    """A path, bytes, PIL image or HWC uint8 array -> RGB PIL image (as upstream's Image.open(path).convert('RGB')).

    RGBA/LA/P keep their colour channels (alpha dropped, no compositing — PIL's convert, as upstream); L is
    replicated; CMYK/YCbCr/I;16 go through PIL's conversion. Unreadable or truncated files raise ImageError."""
    name = src if isinstance(src, (str, os.PathLike)) else type(src).__name__
    try:
        if isinstance(src, Image.Image):
            img = src
        elif isinstance(src, (bytes, bytearray)):
            img = Image.open(io.BytesIO(src))
        elif isinstance(src, np.ndarray):
            img = Image.fromarray(src)
        elif isinstance(src, (str, os.PathLike)):
            if not os.path.exists(src):
                raise ImageError(f"image file not found: {src}")
            img = Image.open(src)
        else:
            raise ImageError(f"unsupported image input of type {type(src).__name__} (give a path, bytes, a PIL "
                             f"image or a uint8 array)")
        return img.convert("RGB")  # forces the decode: truncated data fails here
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"image {name} is too large to open safely ({e})") from e
    except (OSError, ValueError, SyntaxError, TypeError) as e:
        raise ImageError(f"cannot read image {name}: {e}") from e


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (h, w): multiples of `factor`, area within [min_pixels, max_pixels], aspect ratio kept.

    POINTS variant of Qwen2-VL's rule: sides shorter than `factor` are accepted (no error), the aspect-ratio
    limit is checked only when both sides reach `factor`; rounding is Python's round (half to even)."""
    if height >= factor and width >= factor and max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got "
                         f"{max(height, width) / min(height, width)} ({width}x{height} px)")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar <= 0 or w_bar <= 0:
        raise ImageError(f"image of {width}x{height} px resizes to {w_bar}x{h_bar} px under max_pixels "
                         f"{max_pixels}: too elongated to keep a side of at least {factor} px")
    return h_bar, w_bar


@dataclass
class ImageProcessorV15:
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    resample: int = 3
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711)
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "ImageProcessorV15":
        c, size = cls(), d.get("size") or {}
        return cls(
            patch_size=int(d.get("patch_size", c.patch_size)), merge_size=int(d.get("merge_size", c.merge_size)),
            temporal_patch_size=int(d.get("temporal_patch_size", c.temporal_patch_size)),
            min_pixels=int(d.get("min_pixels") or size.get("min_pixels") or size.get("shortest_edge") or c.min_pixels),
            max_pixels=int(d.get("max_pixels") or size.get("max_pixels") or size.get("longest_edge") or c.max_pixels),
            resample=int(d.get("resample", c.resample)), do_resize=bool(d.get("do_resize", True)),
            do_rescale=bool(d.get("do_rescale", True)),
            rescale_factor=float(d.get("rescale_factor", c.rescale_factor)),
            do_normalize=bool(d.get("do_normalize", True)),
            image_mean=tuple(d.get("image_mean", c.image_mean)), image_std=tuple(d.get("image_std", c.image_std)),
            do_convert_rgb=bool(d.get("do_convert_rgb", True)))

    @classmethod
    def from_dir(cls, folder: str) -> "ImageProcessorV15":
        path = os.path.join(folder, "preprocessor_config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found (the POINTS-1.5 image processor settings)")
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def __call__(self, image) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image -> (pixel_values float32 [h*w, C*T*p*p], (1, h, w) grid in patches)."""
        img = load_image(image)
        if not self.do_convert_rgb and img.mode != "RGB":
            raise ImageError(f"image mode {img.mode} with do_convert_rgb false is not supported")
        width, height = img.size
        if self.do_resize:
            rh, rw = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
            if (rh, rw) != (height, width):
                img = img.resize((rw, rh), resample=Image.Resampling(self.resample), reducing_gap=None)
        else:
            rh, rw = height, width
            if rh % self.factor or rw % self.factor:
                raise ImageError(f"do_resize false needs sides divisible by {self.factor}, got {rw}x{rh}")
        x = np.asarray(img)  # HWC uint8
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            x = x.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            x = (x - mean) / std
        x = x.transpose(2, 0, 1)  # CHW
        return self.patchify(x)

    def patchify(self, chw: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        c, h, w = chw.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = h // p, w // p
        frames = np.broadcast_to(chw[None], (t, c, h, w))  # one picture = t identical frames
        x = frames.reshape(1, t, c, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return np.ascontiguousarray(x.reshape(gh * gw, c * t * p * p), dtype=np.float32), (1, gh, gw)


# ------------------------------------------------------------------------------------------------ prompts
@dataclass
class PreparedPrompt:
    prompt: str
    pixel_values: list = field(default_factory=list)   # per image float32 [n_i, patch_dim]
    grid_thw: list = field(default_factory=list)       # per image (t, h, w)


def image_placeholder(grid_thw, merge_size: int) -> str:
    t, h, w = (int(v) for v in grid_thw)
    return VISION_START + IMAGE_PAD * (t * h * w // merge_size ** 2) + VISION_END + "\n"


def message_items(message: dict) -> list[dict]:
    content = message.get("content", "")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"message content must be a string or a list of items, got {type(content).__name__}")
    return list(content)


def construct_prompt(messages: Sequence[dict], image_processor: ImageProcessorV15,
                     base_dir: str | None = None) -> PreparedPrompt:
    """Render the conversation and preprocess its images (message order). Image items: {"type": "image",
    "image": path | PIL image | bytes | array}; relative paths are taken from base_dir when given."""
    if not messages:
        raise ValueError("messages is empty")
    out = PreparedPrompt(prompt="")
    rendered = []
    for message in messages:
        role = message.get("role")
        if not role:
            raise ValueError(f"message without a role: {message!r}")
        content = ""
        for item in message_items(message):
            kind = item.get("type")
            if kind == "text":
                content += item["text"]
            elif kind == "image":
                src = item.get("image")
                if src is None:
                    raise ValueError(f"image item without 'image': {item!r}")
                if base_dir and isinstance(src, (str, os.PathLike)) and not os.path.isabs(src):
                    src = os.path.join(base_dir, src)
                pixels, grid = image_processor(src)
                out.pixel_values.append(pixels)
                out.grid_thw.append(grid)
                content += image_placeholder(grid, image_processor.merge_size)
            else:
                raise ValueError(f"unknown content item type {kind!r} (expected 'text' or 'image')")
        rendered.append((role, content))
    out.prompt = apply_chat_template(rendered)
    return out


def apply_chat_template(messages: Sequence[tuple[str, str]]) -> str:
    prompt, role = "", "user"
    for role, content in messages:
        prompt += IM_START + role + "\n" + content + IM_END + "\n"
    if role == "user":
        prompt += IM_START + "assistant\n"
    return prompt
