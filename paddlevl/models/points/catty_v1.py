"""CATTY image splitting of POINTS 1.0 (WePOINTS ``catty.split_image_with_catty``), written from its description.

An image is cut into ``nw x nh`` overlapping square crops of ``image_size`` pixels after a resize that keeps the aspect
ratio, and a thumbnail of the resized image is appended last. The geometry is computed by :func:`catty_plan` (pure
integers/floats, testable without pixels); :func:`split_image_with_catty` applies it with the same PIL calls as
upstream (BILINEAR = resample 2), so the crops are bit-identical.

Also here: the InternVL-style ``split_image`` used by ``chat(..., catty=False)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from PIL import Image

BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, the value upstream passes


def factor_pairs(n: int) -> List[Tuple[int, int]]:
    """All (a, n // a) with a dividing n, a ascending (upstream order)."""
    return [(a, n // a) for a in range(1, n + 1) if n % a == 0]


def grid_candidates(max_splits: int) -> dict:
    """ratio a/b -> list of grids (a, b), over n = 1..max_splits, in insertion order (the order decides ties)."""
    table: dict = {}
    for n in range(1, max_splits + 1):
        for a, b in factor_pairs(n):
            table.setdefault(a / b, []).append((a, b))
    return table


def best_grid(width_slices: float, height_slices: float, ratio: float, max_splits: int) -> Tuple[int, int]:
    """The (columns, rows) grid CATTY picks: nearest ratio on the image's side of 1, then nearest crop count."""
    table = grid_candidates(max_splits)
    if ratio < 1:
        table = {k: v for k, v in table.items() if k <= ratio}
    elif ratio > 1:
        table = {k: v for k, v in table.items() if k >= ratio}
    best_ratio = min(table, key=lambda k: abs(k - ratio))  # min keeps the first on ties
    area = width_slices * height_slices
    return min(table[best_ratio], key=lambda g: abs(g[0] * g[1] - area))


@dataclass
class CattyPlan:
    image_size: Tuple[int, int]              # (W, H) given
    stretched_to: Optional[Tuple[int, int]]  # (W, H) after the aspect-ratio clamp, None when not needed
    best_slices: Tuple[int, int]             # (columns, rows)
    resized_to: Tuple[int, int]              # (W, H) the crops are cut from
    crop_boxes: List[Tuple[int, int, int, int]] = field(default_factory=list)  # (x0, y0, x1, y1), output order
    add_thumbnail: bool = True

    @property
    def num_crops(self) -> int:
        return len(self.crop_boxes) + (1 if self.add_thumbnail else 0)


def _strides(width: int, height: int, window: int, grid: Tuple[int, int]) -> Tuple[int, int]:
    nw, nh = grid
    sx = (width - window) // (nw - 1) if nw > 1 else 0
    sy = (height - window) // (nh - 1) if nh > 1 else 0
    # upstream replaces a zero stride (single column/row, or a degenerate division) by the window size
    return (sx or window), (sy or window)


def catty_plan(width: int, height: int, image_size: int = 336, max_splits: int = 8, do_resize: bool = True,
               add_thumbnail: bool = True) -> CattyPlan:
    if width < 1 or height < 1:
        raise ValueError(f"CATTY: image has no pixels ({width}x{height})")
    if max_splits < 1:
        raise ValueError(f"CATTY: max_splits must be >= 1, got {max_splits}")
    if image_size < 1:
        raise ValueError(f"CATTY: image_size must be >= 1, got {image_size}")
    given = (width, height)
    stretched = None
    ratio = width / height
    if ratio > max_splits or ratio < 1 / max_splits:
        if not do_resize:
            raise ValueError(f"CATTY: aspect ratio {ratio:.2f} of a {width}x{height} image is outside "
                             f"(1/{max_splits}, {max_splits}); pass do_resize=True to stretch it")
        if width > height:
            width, height = max_splits * height, height
        else:
            width, height = width, max_splits * width
        stretched = (width, height)
        ratio = width / height
    width_slices, height_slices = width / image_size, height / image_size
    grid = best_grid(width_slices, height_slices, ratio, max_splits)
    nw, nh = grid
    if width_slices < height_slices:
        new_w = nw * image_size
        new_h = int(height / width * new_w)
    else:
        new_h = nh * image_size
        new_w = int(width / height * new_h)
    sx, sy = _strides(new_w, new_h, image_size, grid)
    boxes = [(x, y, x + image_size, y + image_size)
             for y in range(0, new_h - image_size + 1, sy)
             for x in range(0, new_w - image_size + 1, sx)]
    return CattyPlan(given, stretched, grid, (new_w, new_h), boxes, add_thumbnail)


def split_image_with_catty(image: Image.Image, image_size: int = 336, max_splits: int = 8, do_resize: bool = True,
                           add_thumbnail: bool = True) -> List[Image.Image]:
    """Crops of ``image`` in CATTY order (row-major tiles, thumbnail last). Pixels are not converted (the CLIP
    processor converts every crop to RGB afterwards, as upstream)."""
    plan = catty_plan(image.width, image.height, image_size, max_splits, do_resize, add_thumbnail)
    if plan.stretched_to is not None:
        image = image.resize(plan.stretched_to, resample=BILINEAR)
    image = image.resize(plan.resized_to, resample=BILINEAR)
    crops = [image.crop(box) for box in plan.crop_boxes]
    if add_thumbnail:
        crops.append(image.resize((image_size, image_size), resample=BILINEAR))
    return crops


def split_image(image: Image.Image, image_size: int = 336, max_splits: int = 8) -> List[Image.Image]:
    """The non-CATTY split (``chat(..., catty=False)``): resize to the grid whose ratio is nearest to the image's
    (no side filter), non-overlapping tiles row-major, then a thumbnail of the ORIGINAL image appended last."""
    thumbnail = image.resize((image_size, image_size), resample=BILINEAR)
    table = grid_candidates(max_splits)
    ratio = image.width / image.height
    best_ratio = min(table, key=lambda k: abs(k - ratio))
    area = image.width * image.height
    nw, nh = min(table[best_ratio], key=lambda g: abs(g[0] * image_size * g[1] * image_size - area))
    resized = image.resize((nw * image_size, nh * image_size), resample=BILINEAR)
    crops = [resized.crop((j * image_size, i * image_size, (j + 1) * image_size, (i + 1) * image_size))
             for i in range(nh) for j in range(nw)]
    crops.append(thumbnail)
    return crops
