"""Compression methods: one file each, registered by name for recipes.

A method is a config dataclass (its recipe options, validated on load) plus a class that turns
(W, H) pairs into compressed factors. `register` makes both reachable from a recipe's `method:` key.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from compressor.errors import CompressorError

if TYPE_CHECKING:  # the methods themselves (and torch) load on first lookup, not on import
    from compressor.methods.base import Method

REGISTRY: dict[str, type["Method"]] = {}
_discovered = False


def register(cls: type["Method"]) -> type["Method"]:
    REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    # Import every method module once. Keyed on a flag, not on an empty REGISTRY: a module imported
    # directly elsewhere registers itself early and must not hide its siblings.
    global _discovered
    if _discovered:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    _discovered = True


def get(name: str) -> type["Method"]:
    _discover()
    if name not in REGISTRY:
        raise CompressorError(f"unknown method '{name}'; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def names() -> list[str]:
    _discover()
    return sorted(REGISTRY)
