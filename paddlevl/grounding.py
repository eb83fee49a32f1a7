"""Grounding output of Qwen-VL: `<ref>name</ref><box>(x1,y1),(x2,y2)</box>` in a response.

Coordinates are on a 0..1000 grid; they are scaled to the picture with `int(v / 1000 * size)` (truncation) and drawn
on the latest picture of the conversation (the last `<img>` in the response, else in the newest history turn that
has one) with Pillow. Parsing follows upstream `_fetch_all_box_with_ref`: a box gets a ref only when the element
right before it is a `<ref>` (so the second box of a ref, or a box after a space, has none)."""
from __future__ import annotations

import math
import os
import random
import re
import unicodedata
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

TAGS = {"image": ("<img>", "</img>"), "ref": ("<ref>", "</ref>"), "box": ("<box>", "</box>"),
        "quad": ("<quad>", "</quad>")}
# tokens the tokenizer splits on (the vision tags plus <imgpad> and <|endoftext|>); other text is plain
_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in
                                    [t for pair in TAGS.values() for t in pair] + ["<imgpad>", "<|endoftext|>"]) + ")")
# matplotlib's TABLEAU_COLORS, the palette upstream picks from
TABLEAU_COLORS = {
    "tab:blue": "#1f77b4", "tab:orange": "#ff7f0e", "tab:green": "#2ca02c", "tab:red": "#d62728",
    "tab:purple": "#9467bd", "tab:brown": "#8c564b", "tab:pink": "#e377c2", "tab:gray": "#7f7f7f",
    "tab:olive": "#bcbd22", "tab:cyan": "#17becf",
}
FONT_FILE = "SimSun.ttf"  # shipped in the Qwen-VL-Chat folder; Pillow's default font is used when absent
_DPI = 100.0  # upstream draws with matplotlib at its default dpi; sizes below are in points


def to_list_format(text: str) -> list[dict]:
    """Split text into [{'text'}, {'image'}, {'ref'}, {'box'}, {'quad'}] elements (closed tag pairs only)."""
    text = unicodedata.normalize("NFC", text)
    parts = [p for p in _SPLIT.split(text) if p != ""]
    starts = {pair[0]: (key, pair[1]) for key, pair in TAGS.items()}
    out, pending = [], ""
    i = 0
    while i < len(parts):
        p = parts[i]
        if p in starts:
            key, closing = starts[p]
            try:
                j = parts.index(closing, i + 1)
            except ValueError:
                raise ValueError("Unclosed image token") from None
            if pending:
                out.append({"text": pending})
                pending = ""
            out.append({key: "".join(parts[i + 1:j])})
            i = j + 1
            continue
        pending += p
        i += 1
    if pending:
        out.append({"text": pending})
    return out


def parse_boxes(text: str) -> list[dict]:
    """[{'box': (x1, y1, x2, y2), 'ref': name?}, ...] in the 0..1000 grid."""
    elements = to_list_format(text)
    out = []
    for i, ele in enumerate(elements):
        if "box" not in ele:
            continue
        raw = ele["box"].replace("(", "").replace(")", "").split(",")
        try:
            box = tuple(int(v) for v in raw)
        except ValueError:
            raise ValueError(f"malformed box <box>{ele['box']}</box>: expected (x1,y1),(x2,y2)") from None
        if len(box) != 4:
            raise ValueError(f"malformed box <box>{ele['box']}</box>: expected 4 numbers, got {len(box)}")
        item = {"box": box}
        if i > 0 and "ref" in elements[i - 1]:
            item["ref"] = elements[i - 1]["ref"].strip()
        out.append(item)
    return out


def latest_picture(response: str, history: Optional[Sequence] = None) -> Optional[str]:
    """Path/URL of the last <img> in the response, else in the newest history query (or response) that has one."""
    turns = list(history or []) + [(response, None)]
    for query, _ in reversed(turns):
        for ele in reversed(to_list_format(query)):
            if "image" in ele:
                return ele["image"]
    return None


def scale_box(box: Sequence[int], width: int, height: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = box
    return int(x1 / 1000 * width), int(y1 / 1000 * height), int(x2 / 1000 * width), int(y2 / 1000 * height)


def plan_drawing(boxes: list[dict], width: int, height: int, rng=None) -> list[dict]:
    """The draw calls upstream makes: a colour is picked at the start and anew for every box with a ref."""
    rng = random if rng is None else rng
    names = list(TABLEAU_COLORS)
    color = rng.choice(names)
    calls = []
    for item in boxes:
        if "ref" in item:
            color = rng.choice(names)
        x1, y1, x2, y2 = scale_box(item["box"], width, height)
        calls.append({"draw_box": [x1, y1, x2, y2], "edge_color": color})
        if "ref" in item:
            calls.append({"draw_text": item["ref"], "position": [x1, y1], "color": color})
    return calls


def _font_points(width: int, height: int) -> float:
    return max(math.sqrt(width * height) // 30, 15)


def _text_color(hex_color: str) -> tuple[int, int, int]:
    rgb = [int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    rgb = [max(c, 0.2) for c in rgb]
    k = rgb.index(max(rgb))
    rgb[k] = max(0.8, rgb[k])
    return tuple(int(round(c * 255)) for c in rgb)


def _load_font(font_path: Optional[str], pixels: int):
    if font_path and os.path.isfile(font_path):
        return ImageFont.truetype(font_path, pixels)
    try:
        return ImageFont.load_default(size=pixels)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def line_width(width: int, height: int) -> int:
    """Box outline width in pixels (upstream: max(font_size / 4, 1) points)."""
    return max(1, int(round(max(_font_points(width, height) / 4, 1) * _DPI / 72)))


def draw_plan(image: Image.Image, calls: list[dict], font_path: Optional[str] = None) -> Image.Image:
    """Draw the planned boxes/labels on a copy of the RGB image."""
    out = image.convert("RGB").copy()
    w, h = out.size
    lw = line_width(w, h)
    half = lw // 2
    font = _load_font(font_path, max(1, int(round(_font_points(w, h) * _DPI / 72))))
    draw = ImageDraw.Draw(out)
    for call in calls:
        if "draw_box" in call:
            x1, y1, x2, y2 = call["draw_box"]
            x1, x2 = sorted((x1, x2))
            y1, y2 = sorted((y1, y2))
            # centred on the box edges, as matplotlib strokes a Rectangle patch
            draw.rectangle([x1 - half, y1 - half, x2 + half, y2 + half], outline=TABLEAU_COLORS[call["edge_color"]],
                           width=lw)
    overlay = Image.new("RGBA", out.size, (0, 0, 0, 0))
    odraw = ImageDraw.Draw(overlay)
    for call in calls:
        if "draw_text" in call:
            x, y = call["position"]
            left, top, right, bottom = odraw.textbbox((x, y), call["draw_text"], font=font)
            pad = max(1, lw // 2)
            odraw.rectangle([left - pad, top - pad, right + pad, bottom + pad], fill=(0, 0, 0, 204))
            color = _text_color(TABLEAU_COLORS[call.get("color", "tab:gray")])
            odraw.text((x, y), call["draw_text"], font=font, fill=color + (255,))
    return Image.alpha_composite(out.convert("RGBA"), overlay).convert("RGB")


def draw_bbox_on_latest_picture(response: str, history: Optional[Sequence] = None, *, base_dir: Optional[str] = None,
                                font_path: Optional[str] = None, rng=None) -> Optional[Image.Image]:
    """Boxes of `response` drawn on the latest picture of the conversation; None without a picture or boxes."""
    from paddlevl.models.qwen_vl.processing import load_image

    path = latest_picture(response, history)
    if path is None:
        return None
    image = load_image(path, base_dir)
    boxes = parse_boxes(response)
    if not boxes:
        return None
    calls = plan_drawing(boxes, image.width, image.height, rng)
    return draw_plan(image, calls, font_path)
