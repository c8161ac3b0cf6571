"""Data-free structured MLP-width reduction by weight magnitude: the baseline `structured` must beat.

Each intermediate channel j of an MLP is row j of gate/up (c_fc) and column j of down (c_proj).
Its score is the product of those rows' and that column's norms, ||gate_j|| ||up_j|| ||down_:,j||,
a bound on how large its contribution to the output can get for a unit input; the k highest-scoring
channels stay in every layer and nothing is refitted (no calibration data). With the same k in every
layer the result is a standard checkpoint whose config says `intermediate_size: k`.

Recipe:
    - method: magnitude
      ratio: 0.2        # of ALL decoder-linear parameters, taken from the MLPs
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compressor import models
from compressor.errors import CompressorError, check_float, check_int
from compressor.methods import register
from compressor.methods.base import Method
from compressor.methods.structured import MAX_MULTIPLE, mlp_layout, narrow_mlp, standard_width, uniform_width, width_lines


@dataclass
class MagnitudeConfig:
    """ratio: fraction of ALL decoder-linear parameters to remove, taken from the MLPs.
    multiple_of: the kept width is a multiple of this."""

    ratio: float = 0.2
    multiple_of: int = 32
    targets: list[str] = field(default_factory=lambda: ["mlp.*"])

    def __post_init__(self):
        check_float("ratio", self.ratio, 0, 1, low_open=True, high_open=True)
        check_int("multiple_of", self.multiple_of, 1, most=MAX_MULTIPLE)
        if self.targets != ["mlp.*"]:
            raise CompressorError("magnitude: only the MLP width is reduced (targets: ['mlp.*'])")


def channel_scores(inputs: list[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    """Per intermediate channel: the product of its input rows' norms and its output column's norm."""
    score = output.double().norm(dim=0)
    for w in inputs:
        score = score * w.double().norm(dim=1)
    return score


@register
class Magnitude(Method):
    name = "magnitude"
    Config = MagnitudeConfig
    kind = "structure"
    sets_reference = True  # later stages approximate the narrower dense layer

    def __init__(self, config):
        super().__init__(config)
        self.width: int | None = None
        self.intermediate: int | None = None

    def bind(self, stages, calibration) -> None:
        if any(s.kind == "rank" for s in stages):
            raise CompressorError(f"'{self.name}' changes the layer shapes a rank stage plans on; use one of them")

    def prepare(self, run) -> None:
        self.intermediate, self.width = uniform_width(run.model, self.config.ratio, self.config.multiple_of, self.name)

    def apply(self, work) -> None:
        mlp = mlp_layout(work.run.model)
        if self.width >= self.intermediate:
            return
        down = models.weight_of(work.module(mlp.output)).detach()
        inputs = [models.weight_of(work.module(n)).detach() for n in mlp.inputs]
        kept = channel_scores(inputs, down).topk(self.width).indices.sort().values
        specs, work.grams = narrow_mlp(work.run.model, work.index, work.layer, work.grams, kept, down[:, kept.to(down.device)])
        work.run.specs.update(specs)

    def finish(self, run) -> None:
        standard_width(run, self.width)

    def report(self, model, specs: dict) -> dict:
        return {"magnitude": {"intermediate_size_before": self.intermediate, "width": self.width, "standard_architecture": True}}

    def summary_lines(self, model, specs: dict, entry: dict) -> list[str]:
        return width_lines(self.intermediate, [min(self.width, self.intermediate)] * len(models.decoder_layers(model)))
