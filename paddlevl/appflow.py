"""PaddleMIX-style task pipelines over converted local folders (no hub lookups).

    from paddlevl.appflow import Appflow
    task = Appflow(app="image2text_generation", models=["./qwen-vl-chat-pd"])
    task(image="bus.png", prompt="Describe the picture.")      # -> {"result": "...", ...}
    task(prompt="框出图中公交车的位置")                            # continues the conversation (same image)
    task.reset()                                                 # forget the conversation

A family plugs in by giving its Family record a `chat_session(folder, model, **options)` factory returning an
object with `ask(prompt, images=None, **generation) -> dict` (at least {"result": text}) and `reset()`.
"""
from __future__ import annotations

import os
from typing import Callable

_TASKS: dict[str, Callable] = {}


def register_task(name: str):
    def deco(cls):
        _TASKS[name] = cls
        return cls
    return deco


class Appflow:
    def __init__(self, app: str, models, dtype: str = "float32", **options):
        if app not in _TASKS:
            raise ValueError(f"unknown app {app!r}; available: {', '.join(sorted(_TASKS))}")
        if isinstance(models, (str, os.PathLike)):
            models = [models]
        if not models:
            raise ValueError("Appflow needs models=[<converted model folder>]")
        self.app = app
        self.task = _TASKS[app](list(models), dtype=dtype, **options)

    def __call__(self, **inputs):
        return self.task(**inputs)

    def reset(self):
        self.task.reset()


@register_task("image2text_generation")
class Image2TextGeneration:
    """Multi-turn image chat: a call with an image starts or extends the conversation with that picture; a call
    without one continues the conversation about the pictures already given."""

    def __init__(self, models, dtype="float32", **options):
        from .checkpoint import load_model
        from .models.registry import get, read_family_tag

        folder = os.fspath(models[0])
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: not a folder. Appflow takes local converted folders "
                                    f"(run `paddlevl convert UPSTREAM_DIR {folder}` first); nothing is downloaded.")
        family = get(read_family_tag(folder))
        if family.chat_session is None:
            raise NotImplementedError(f"family {family.name} has no chat support yet")
        model = load_model(folder, dtype=dtype)
        self.session = family.chat_session(folder, model, **options)

    def __call__(self, image=None, prompt=None, **generation):
        if prompt is None:
            raise ValueError("image2text_generation needs prompt=...")
        images = None if image is None else (list(image) if isinstance(image, (list, tuple)) else [image])
        out = self.session.ask(prompt, images=images, **generation)
        if "result" not in out:
            raise RuntimeError("chat session returned no 'result'")
        return out

    def reset(self):
        self.session.reset()
