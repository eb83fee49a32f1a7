"""Registry of model families.

A family module describes itself once with :class:`Family` and calls :func:`register`.
The converter, the loader, the parity harness, Appflow and the CLI all look families up here,
so adding a family never touches those modules.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

# Modules that register a family when imported (kept in one place so `load_all` is cheap and explicit).
FAMILY_MODULES = (
    "paddlevl.models.points",
    "paddlevl.models.qwen_vl",
    "paddlevl.models.internlm_xc2d5",
)

_FAMILIES: dict[str, "Family"] = {}


@dataclass
class Family:
    name: str
    architectures: Sequence[str]
    parse_config: Callable[[dict], Any]
    build_model: Callable[[Any], Any]
    rules: Callable[[dict, Sequence[str]], list]
    model_types: Sequence[str] = ()
    extra_files: Sequence[str] = ()
    # optional: decides between families sharing an architecture name, or refines detection by key names
    detect: Optional[Callable[[dict, Sequence[str]], bool]] = None
    golden: Optional[Callable[..., dict]] = None
    chat_session: Optional[Callable[..., Any]] = None
    description: str = ""
    extras: dict = field(default_factory=dict)


def register(family: Family) -> Family:
    if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
        raise ValueError(f"family {family.name!r} registered twice")
    _FAMILIES[family.name] = family
    return family


def load_all() -> dict[str, Family]:
    """Import every family module (each registers itself) and return the registry."""
    for mod in FAMILY_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a family that has not landed yet
            if e.name is None or not mod.startswith(e.name):
                raise
    return dict(_FAMILIES)


def get(name: str) -> Family:
    fams = load_all()
    if name not in fams:
        raise KeyError(f"unknown family {name!r}; known: {', '.join(sorted(fams)) or '(none)'}")
    return fams[name]


def detect_family(config: dict, source_keys: Sequence[str] = ()) -> Family:
    """Pick the family of an upstream checkpoint from its config.json (and key names when needed)."""
    fams = load_all()
    tag = (config.get("paddlevl") or {}).get("family")
    if tag:
        return get(tag)
    archs = set(config.get("architectures") or [])
    mtype = config.get("model_type")
    hits = []
    for fam in fams.values():
        if archs & set(fam.architectures) or (mtype and mtype in fam.model_types):
            if fam.detect is None or fam.detect(config, source_keys):
                hits.append(fam)
    if len(hits) == 1:
        return hits[0]
    known = "; ".join(f"{f.name} (architectures {', '.join(f.architectures)})" for f in fams.values())
    if not hits:
        raise UnknownModelError(
            f"unsupported model: architectures={sorted(archs) or None}, model_type={mtype!r}. "
            f"Supported: {known or '(no family installed)'}")
    raise UnknownModelError(f"ambiguous model: matches {[f.name for f in hits]}")


class UnknownModelError(ValueError):
    pass


def read_family_tag(folder) -> str:
    """The family name a converted folder was written for (config.json "paddlevl": {"family": ...})."""
    import json
    import os

    path = os.path.join(os.fspath(folder), "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing — is {folder} a folder written by `paddlevl convert`?") from None
    tag = (cfg.get("paddlevl") or {}).get("family")
    if not tag:
        raise ValueError(f"{path}: no \"paddlevl\" family tag — convert the upstream folder with `paddlevl convert`")
    return tag
