"""InternLM-XComposer-2.5 inputs: HD image transform, pixel tensors, crops, chat prompt and its interleaving.

Everything here is numpy / Pillow and reproduces the upstream inference path (`chat` -> `interleav_wrap_chat` ->
`encode_img` -> `Image_transform` -> `vis_processor` -> the vision tower's crop split):

HD transform (`hd_transform`), on a PIL image:
  1. a portrait image (w < h) is transposed, so w >= h from here on;
  2. ratio = w / h (float); scale = the largest s with s * ceil(s / ratio) <= hd_num, then
     scale = min(ceil(w / T), scale), T = the tile side (560);
  3. new_w = int(scale * T); new_h = int(new_w / ratio) in float64 — NOT new_w * h // w (840x360 -> 479, not 480);
  4. PIL bilinear resize to (new_w, new_h); pad the BOTTOM with white up to a multiple of T;
  5. transpose back: portrait images therefore end up padded on the RIGHT.
Pixels: (uint8 / 255 - CLIP mean) / CLIP std in float32, [1, 3, H, W] (bit-exact with ToTensor + Normalize).
Crops fed to the ViT: [global view, tiles row-major]; the global view is torch's bicubic interpolation
(align_corners=False, A=-0.75, no antialias) of the NORMALISED tensor to T x T. `bicubic_resize` reproduces the
float32 arithmetic of torch's CPU kernel bit for bit (index and coefficient rounding, accumulation order).

Prompt (`build_prompt`, `split_prompt`): optional system turn, history turns, the query turn and the assistant
opener; exactly one image and no `<ImageHere>` in the prompt -> `<ImageHere>` is prepended to the WHOLE prompt.
The prompt is split on `<ImageHere>`: the first part is tokenised with BOS (even when empty), later parts without
BOS and only when non-empty; image k follows part k. More than one image forces hd_num = 6.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

IMAGE_PLACEHOLDER = "<ImageHere>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MULTI_IMAGE_HD_NUM = 6  # interleav_wrap_chat: more than one image -> hd_num = 6 whatever the caller asked
DEFAULT_META_INSTRUCTION = (
    "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
    "- InternLM-XComposer (浦语·灵笔) is a multi-modality conversational language model that is developed by "
    "Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the user "
    "such as English and 中文.\n"
    "- InternLM-XComposer (浦语·灵笔) is capable of comprehending and articulating responses effectively based on "
    "the provided image.")

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


# --------------------------------------------------------------------------------------------- images
def load_image(image: Union[str, os.PathLike, Image.Image]) -> Image.Image:
    """An RGB PIL image from a path or a PIL image.

    The file is decoded completely here, so a missing / truncated / non-image file fails now with its name.
    Any mode (RGBA, LA, L, P, CMYK, I;16 ...) is converted with PIL's `convert("RGB")` (alpha dropped, as the
    2.5 code's `encode_img` variants that convert do); upstream 2.5 itself opens without converting and then
    breaks in Normalize on non-RGB images."""
    if isinstance(image, Image.Image):
        img = image
        name = "PIL image"
    else:
        path = os.fspath(image)
        name = path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            img = Image.open(path)
            img.load()
        except Exception as e:  # noqa: BLE001 - PIL raises UnidentifiedImageError, OSError (truncated), ...
            raise ValueError(f"cannot read image {path}: {e}") from e
    if img.width < 1 or img.height < 1:
        raise ValueError(f"{name} has no pixels ({img.width}x{img.height})")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def hd_scale(width: int, height: int, hd_num: int, tile: int = 560) -> Tuple[int, int, bool]:
    """(new_w, new_h, transposed) of the resize step for an image of width x height (before padding)."""
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    scale = min(math.ceil(width / tile), scale)
    if scale < 1:
        raise ValueError(f"hd_num={hd_num} allows no {tile}x{tile} tile at all (need hd_num >= 1)")
    new_w = int(scale * tile)
    new_h = int(new_w / ratio)  # float64 division and truncation, as upstream
    if new_h < 1:
        raise ValueError(
            f"image {width if not transposed else height}x{height if not transposed else width} has an aspect "
            f"ratio too extreme for hd_num={hd_num}: its short side would shrink to {new_w / ratio:.3f} pixels "
            f"(upstream fails in the resize as well)")
    return new_w, new_h, transposed


def hd_transform(img: Image.Image, hd_num: int, tile: int = 560) -> Image.Image:
    """Upstream `Image_transform`: resize + white bottom padding (right for portrait) to multiples of `tile`."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    new_w, new_h, transposed = hd_scale(img.width, img.height, hd_num, tile)
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    padded_h = int(math.ceil(new_h / tile) * tile)
    if padded_h != new_h:
        canvas = Image.new("RGB", (new_w, padded_h), (255, 255, 255))
        canvas.paste(img, (0, 0))
        img = canvas
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    return img


def normalize(img: Union[Image.Image, np.ndarray], mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """ToTensor + Normalize: uint8 HWC RGB -> float32 [1, 3, H, W] = (x / 255 - mean) / std."""
    a = np.asarray(img)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 RGB image, got {a.dtype} {a.shape}")
    x = a.astype(np.float32) / np.float32(255)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


# ---- torch-exact bicubic (F.interpolate(mode="bicubic", align_corners=False), CPU float32) ------------------
def _fma(a, b, c):
    """float32 fused multiply-add (the product is exact in float64 for float32 inputs)."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(np.float32)


def _bicubic_taps(in_size: int, out_size: int):
    f32 = np.float32
    a = f32(-0.75)
    scale = f32(in_size) / f32(out_size)
    real = _fma(scale, np.arange(out_size).astype(f32) + f32(0.5), f32(-0.5))  # source coordinate
    idx = np.floor(real).astype(np.int64)
    t = (real - idx.astype(f32)).astype(f32)

    def conv1(x):  # |x| <= 1
        return ((a + f32(2)) * x - (a + f32(3))) * x * x + f32(1)

    def conv2(x):  # 1 < |x| < 2
        return (_fma(_fma(a, x, -f32(5) * a), x, f32(8) * a) * x - f32(4) * a).astype(f32)

    one = f32(1)
    w = np.stack([conv2(t + one), conv1(t), conv1(one - t), conv2((one - t) + one)], axis=1).astype(f32)
    ids = np.clip(idx[:, None] - 1 + np.arange(4)[None, :], 0, in_size - 1)
    return ids, w


def _taps_sum(values, weights):
    out = (values[1] * weights[1]).astype(np.float32)
    for j in (0, 2, 3):
        out = _fma(values[j], weights[j], out)
    return out


def bicubic_resize(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """x float32 [..., H, W] -> [..., out_h, out_w], bit-identical to torch's CPU bicubic (align_corners=False)."""
    x = np.asarray(x, dtype=np.float32)
    iy, wy = _bicubic_taps(x.shape[-2], out_h)
    ix, wx = _bicubic_taps(x.shape[-1], out_w)
    # width pass over every input row once, then the height pass (torch evaluates the width sum per row tap;
    # each output element sees exactly the same float operations)
    xw = _taps_sum([x[..., ix[:, j]] for j in range(4)], [wx[:, j] for j in range(4)])
    return _taps_sum([xw[..., iy[:, i], :] for i in range(4)], [wy[:, i][:, None] for i in range(4)])


def tiles_hw(pixel_values: np.ndarray, tile: int = 560) -> Tuple[int, int]:
    """(rows, cols) of tiles of a normalised pixel tensor [1, 3, rows*T, cols*T]."""
    if pixel_values.ndim != 4 or pixel_values.shape[0] != 1 or pixel_values.shape[1] != 3:
        raise ValueError(f"expected a pixel tensor [1, 3, H, W], got {list(pixel_values.shape)}")
    H, W = pixel_values.shape[2:]
    if H % tile or W % tile or H == 0 or W == 0:
        raise ValueError(f"pixel tensor {H}x{W}: both sides must be non-zero multiples of the {tile}-pixel tile")
    return H // tile, W // tile


def vit_crops(pixel_values: np.ndarray, tile: int = 560) -> Tuple[np.ndarray, Tuple[int, int]]:
    """[1, 3, h*T, w*T] -> ([1 + h*w, 3, T, T] = global view then tiles row-major, (h, w))."""
    h, w = tiles_hw(pixel_values, tile)
    tiles = pixel_values.reshape(3, h, tile, w, tile).transpose(1, 3, 0, 2, 4).reshape(h * w, 3, tile, tile)
    glb = bicubic_resize(pixel_values, tile, tile)
    return np.concatenate([glb, tiles], axis=0), (h, w)


def image_token_count(h: int, w: int, grid: int = 20) -> int:
    """Visual embeddings of one image with h x w tiles: global grid x (grid+1), one glb_GN, tiles with a sub_GN
    column: (h*w + 1) * grid^2 + 1 + (h + 1) * grid (1241 for 1 x 2 tiles at grid 20)."""
    return (h * w + 1) * grid * grid + 1 + (h + 1) * grid


@dataclass
class ProcessedImage:
    pixel_values: np.ndarray          # [1, 3, h*T, w*T] float32 (the tensor upstream feeds the vision tower)
    tiles_hw: Tuple[int, int]
    hd_image: Optional[np.ndarray] = None   # uint8 [H, W, 3] after the HD transform (None for given tensors)
    source: str = ""


def process_image(image: ImageInput, hd_num: int, tile: int = 560) -> ProcessedImage:
    """Path / PIL image -> HD transform -> normalised pixels. A float array [1, 3, H, W] is taken as an already
    normalised pixel tensor (upstream's `encode_img(tensor)`), its sides must be multiples of the tile."""
    if isinstance(image, np.ndarray) and image.dtype != np.uint8:
        px = np.asarray(image, dtype=np.float32)
        if px.ndim == 3:
            px = px[None]
        return ProcessedImage(px, tiles_hw(px, tile), None, "pixel tensor")
    if isinstance(image, np.ndarray):
        img = Image.fromarray(image)
        if img.mode != "RGB":
            img = img.convert("RGB")
        name = "uint8 array"
    else:
        img = load_image(image)
        name = image if isinstance(image, (str, os.PathLike)) else "PIL image"
    hd = hd_transform(img, hd_num, tile)
    arr = np.asarray(hd, dtype=np.uint8)
    px = normalize(arr)
    return ProcessedImage(px, (arr.shape[0] // tile, arr.shape[1] // tile), arr, os.fspath(name))




# --------------------------------------------------------------------------------------------- prompt
def build_prompt(query: str, history: Sequence[Tuple[str, str]] = (), meta_instruction: str = "") -> str:
    prompt = ""
    if meta_instruction:
        prompt += f"[UNUSED_TOKEN_146]system\n{meta_instruction}[UNUSED_TOKEN_145]\n"
    for turn in history:
        if len(turn) != 2:
            raise ValueError(f"history turns must be (query, response) pairs, got {turn!r}")
        q, a = turn
        prompt += (f"[UNUSED_TOKEN_146]user\n{q}[UNUSED_TOKEN_145]\n"
                   f"[UNUSED_TOKEN_146]assistant\n{a}[UNUSED_TOKEN_145]\n")
    prompt += f"[UNUSED_TOKEN_146]user\n{query}[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"
    return prompt


def split_prompt(prompt: str, num_images: int) -> List[str]:
    """The text parts around the images (upstream: single image without marker -> marker prepended)."""
    if num_images == 1 and IMAGE_PLACEHOLDER not in prompt:
        prompt = IMAGE_PLACEHOLDER + prompt
    parts = prompt.split(IMAGE_PLACEHOLDER)
    if len(parts) != num_images + 1:
        # upstream only prints a warning and goes on: image k still follows text part k, images beyond the
        # last part are ignored, parts beyond the last image get none
        used = min(num_images, len(parts))
        warnings.warn(f"the prompt has {len(parts) - 1} {IMAGE_PLACEHOLDER} marker(s) for {num_images} image(s); "
                      f"as upstream, image k is placed after text part k ({used} image(s) used)", stacklevel=3)
    return parts


@dataclass
class Segment:
    kind: str                                 # "text" | "image"
    ids: List[int] = field(default_factory=list)   # text ids
    image: Optional[ProcessedImage] = None
    num_tokens: int = 0


@dataclass
class ChatInputs:
    segments: List[Segment]
    max_length: int
    hd_num: int

    @property
    def total_len(self) -> int:
        return sum(s.num_tokens for s in self.segments)

    def input_ids(self) -> np.ndarray:
        """[1, L] int64 ids with -1 at every visual-embedding slot, after the max_length truncation."""
        ids: List[int] = []
        for s in self.segments:
            ids.extend(s.ids if s.kind == "text" else [-1] * s.num_tokens)
        return np.asarray(ids[: self.max_length], dtype=np.int64)[None]

    def im_mask(self) -> np.ndarray:
        return self.input_ids() < 0

    @property
    def images(self) -> List[ProcessedImage]:
        return [s.image for s in self.segments if s.kind == "image"]


def interleave(tokenizer, query: str, images: Sequence[ImageInput] = (), history=(), meta_instruction: str = "",
               hd_num: int = 24, max_length: int = 16384, tile: int = 560, grid: int = 20) -> ChatInputs:
    """Upstream `interleav_wrap_chat` on the token level: text ids and processed images in sequence order.

    Images are processed lazily in order and the walk stops once the running length exceeds max_length, as
    upstream; `ChatInputs.input_ids()` applies the final truncation to max_length."""
    images = list(images or [])
    prompt = build_prompt(query, history, meta_instruction)
    parts = split_prompt(prompt, len(images))
    if len(images) > 1:
        hd_num = MULTI_IMAGE_HD_NUM
    segments: List[Segment] = []
    total, need_bos = 0, True
    for idx, part in enumerate(parts):
        if need_bos or part:
            ids = tokenizer.encode(part, add_special_tokens=need_bos)
            need_bos = False
            segments.append(Segment("text", ids=ids, num_tokens=len(ids)))
            total += len(ids)
        if idx < len(images):
            img = process_image(images[idx], hd_num, tile)
            n = image_token_count(*img.tiles_hw, grid=grid)
            segments.append(Segment("image", image=img, num_tokens=n))
            total += n
        if total > max_length:
            warnings.warn(f"the interleaved input is longer than max_length={max_length} tokens; it is cut there "
                          f"as upstream does (the end of the prompt is lost)", stacklevel=2)
            break
    return ChatInputs(segments, max_length, hd_num)


def text_only_ids(tokenizer, query: str, history=(), meta_instruction: str = "") -> List[int]:
    """Upstream `build_inputs` (chat with image=None): the prompt starts with a literal '<s>' that the tokenizer
    splits out as BOS, and BOS is added as well -> the ids start [BOS, BOS, ...] (chat with image=[] gives one)."""
    prompt = "<s>" + build_prompt(query, history, meta_instruction)
    return tokenizer.encode(prompt, add_special_tokens=True)
