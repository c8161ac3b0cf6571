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

# What a stage does to a layer, in the order stages run: change its shapes (structured widths),
# factorise linears, fit the changed layer's float weights to the dense layer's outputs, quantise
# them, compensate the error with adapters. One stage per kind.
KINDS = ("structure", "rank", "heal", "quant", "adapter")

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


def check_stages(stages: list["Method"], calibration, source: str) -> None:
    """The recipe-wide rules: one stage per kind, in KINDS order; then each stage's own `bind`."""
    seen: dict[str, Method] = {}
    for stage in stages:
        if stage.kind in seen:
            raise CompressorError(f"{source}: only one {stage.kind} stage per recipe, got '{seen[stage.kind].name}' and '{stage.name}'")
        later = [k for k in seen if KINDS.index(k) > KINDS.index(stage.kind)]
        if later:
            raise CompressorError(
                f"{source}: stage '{stage.name}' must come before '{seen[later[0]].name}' (order: structure, rank reduction, healing, quantisation, adapters)"
            )
        seen[stage.kind] = stage
    for stage in stages:
        try:
            stage.bind(stages, calibration)
        except CompressorError as exc:
            raise CompressorError(f"{source}: {exc}") from None


def of_kind(stages: list["Method"], kind: str) -> "Method | None":
    return next((s for s in stages if s.kind == kind), None)
