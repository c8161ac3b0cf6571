"""What every method provides to the pipeline."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from compressor import ranks as rank_policies
from compressor.errors import CompressorError, check_choice, check_int, check_patterns


@dataclass
class RankConfig:
    """Options shared by every rank-reduction method.

    ratio: fraction of the targeted linears' parameters to remove (0 < ratio < 1).
    allocation: how ranks are spread across matrices (see compressor/ranks.py).
    rank: one fixed rank for every targeted matrix instead of a ratio.
    targets: glob patterns on linear names inside a decoder layer (e.g. "mlp.*").
    """

    ratio: float = 0.2
    allocation: str = "uniform"
    rank: int | None = None
    targets: list[str] = field(default_factory=lambda: ["*"])

    def __post_init__(self):
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 < self.ratio < 1.0:
            raise CompressorError(f"key 'ratio' must be strictly between 0 and 1, got {self.ratio!r}")
        check_choice("allocation", self.allocation, sorted(rank_policies.POLICIES))
        check_int("rank", self.rank, 1, optional=True)
        check_patterns("targets", self.targets)


class Method:
    name: ClassVar[str]
    Config: ClassVar[type]
    needs_gram: ClassVar[bool] = False
    kind: ClassVar[str] = "rank"

    def __init__(self, config):
        self.config = config

    def report(self) -> dict:
        """Entries this stage adds to compression_report.json (after the run)."""
        return {}

    def targets(self, linear_name: str) -> bool:
        """Whether the linear named `linear_name` inside a decoder layer is this stage's to change
        (every method's config has `targets`: glob patterns on those names)."""
        return any(fnmatch.fnmatch(linear_name, pat) for pat in self.config.targets)


class RankMethod(Method):
    """Replaces a weight W (out x in) by factors up (out x r) @ down (r x in)."""

    Config = RankConfig

    def energies(self, weights: list[torch.Tensor], grams: list) -> list[torch.Tensor]:
        """Per matrix, the squared singular values of what gets truncated, descending."""
        raise NotImplementedError

    def decompose(self, weights: list[torch.Tensor], grams: list, ranks: list[int]) -> list[dict]:
        """Per matrix, tensors keyed by the compressed module's state-dict names:
        "up.weight" (out x r), "down.weight" (r x in), plus extras such as sparse columns."""
        raise NotImplementedError

    def extra_params(self, shape: tuple[int, int]) -> int:
        """Values a compressed matrix stores beyond its factors (LOST's sparse columns)."""
        return 0

    def allocate(self, shapes, energies) -> dict:
        cfg = self.config
        extra = {n: self.extra_params(s) for n, s in shapes.items()}
        if cfg.rank is not None:
            return rank_policies.fixed(shapes, cfg.rank, extra)
        return rank_policies.allocate(cfg.allocation, shapes, cfg.ratio, energies, extra)

    def needs_energies(self) -> bool:
        return self.config.rank is None and self.config.allocation != "uniform"

    def module_spec(self, shape: tuple[int, int], rank: int, bias: bool) -> dict:
        return {"type": "lowrank", "out": shape[0], "in": shape[1], "rank": rank, "bias": bias}
