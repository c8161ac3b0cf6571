"""The one interface every method implements, and the shared base of rank-reduction methods.

A method is a stage of a recipe. The recipe loader builds it from its config (which validates its
own values) and calls `bind` with the whole recipe, where the method checks the rules it has with
other stages. The driver (compressor/calibration/driver.py) then calls, knowing nothing else:

    prepare(run)    once, on the dense model, before the layer walk (plans, spectra, sensitivities)
    apply(work)     per decoder layer (per input group with true_sequential): change the layer's
                    linears through work.replace, recording each new module's spec
    finish(run)     once after the walk (decisions that need every layer)
    report(model, specs)   entries for compression_report.json
    export(model, specs)   entries the export writes (see compressor/export/checkpoint.py: save)

and reads `needs_gram`, `needs_dense_stream()`, `needs_layer_io()`, `needs_reference()` and
`sets_reference` to know what to collect. Stages run in the order of methods.KINDS inside every layer.

Independent pieces of work (a layer's decompositions, its linears' quantisation) go through
`run.executor.map_by_cost` (compressor/distributed/executor.py), which is the plain call in one
process and shares them out by cost over the ranks of a distributed run; a method never asks.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from compressor import models
from compressor import ranks as rank_policies
from compressor.errors import CompressorError, check_choice, check_int, check_patterns, shown
from compressor.linalg import check_finite
from compressor.modules import ModuleSpec, build_module


class Method:
    name: ClassVar[str]
    Config: ClassVar[type]
    kind: ClassVar[str] = "rank"
    needs_gram: ClassVar[bool] = False
    # True when what this stage leaves is the model later stages approximate (a structured stage
    # gives a smaller dense model, the reference for the adapters' error).
    sets_reference: ClassVar[bool] = False

    def __init__(self, config):
        self.config = config
        self._handed_off: list[Callable[[str], bool]] = []

    # --- recipe time

    def bind(self, stages: list[Method], calibration) -> None:
        """Check the rules this stage has with the recipe's other stages and its calibration
        settings (raise CompressorError naming the fix); link to the stages it works with."""

    def hand_off(self, takes: Callable[[str], bool]) -> None:
        """Another stage does this stage's work on the linears `takes` accepts (eora's refine
        quantises inside its own fit)."""
        self._handed_off.append(takes)

    def targets(self, linear_name: str) -> bool:
        """Whether the linear named `linear_name` inside a decoder layer is this stage's to change
        (every method's config has `targets`: glob patterns on those names)."""
        return any(fnmatch.fnmatch(linear_name, pat) for pat in self.config.targets)

    def does(self, linear_name: str) -> bool:
        """targets, less what was handed off to another stage."""
        return self.targets(linear_name) and not any(takes(linear_name) for takes in self._handed_off)

    # --- what the walk must collect

    def needs_dense_stream(self) -> bool:
        """Carry the dense model's hidden states beside the compressed ones (crosses in LayerWork)."""
        return False

    def needs_layer_io(self) -> bool:
        """Keep each layer's calibration inputs, call arguments and the dense layer's outputs on them
        (work.inputs, work.calls, work.own_targets; work.targets with a dense stream)."""
        return False

    def needs_reference(self) -> bool:
        """Keep each layer's weights as they were before the approximating stages (work.reference)."""
        return False

    # --- run time

    def check_model(self, model, store_dtype) -> None:
        """Checks that need the model's shapes and the output dtype but no calibration data (a size
        budget it cannot meet), for a caller that wants to refuse before any long work."""

    def prepare(self, run) -> None:
        """Before the walk, on the dense model."""

    def apply(self, work) -> None:
        raise NotImplementedError

    def finish(self, run) -> None:
        """After the walk."""

    def report(self, model, specs: dict) -> dict:
        """Entries this stage adds to compression_report.json (after the run; specs: every
        compressed linear's spec)."""
        return {}

    def export(self, model, specs: dict) -> dict:
        """Entries for the export: "quantization_config" (a GPTQ v1 config to declare) and
        "adapter_required" (the base is no model without its adapters)."""
        return {}

    def summary_lines(self, model, specs: dict, entry: dict) -> list[str]:
        """What this stage did, in lines for the summary `compressor compress` prints (entry: what
        its `report` returned)."""
        return []

    # --- streaming (compressor/pipeline): state kept per finished layer, for a resumed run

    def layer_state(self, index: int) -> dict | None:
        """What this stage keeps of decoder layer `index` once it is finished (for its report and
        its `finish`), as JSON values plus an optional "tensors" dict; None: nothing. A streamed run
        journals it with the layer, and a resumed one hands it back through load_layer_state."""
        return None

    def load_layer_state(self, index: int, state: dict, tensors: dict) -> None:
        """Take back what layer_state gave for a layer an interrupted run finished."""

    def stream_refusal(self) -> str | None:
        """Why this stage, as configured, cannot run on a streamed model (one layer in memory at a
        time), or None when it can."""
        return None


def target_shapes(model, method: Method) -> dict[str, tuple[int, int]]:
    """Per full module name of a linear `method` targets, its weight's (out, in); an error when
    the targets match nothing."""
    shapes = {full: tuple(models.weight_of(m).shape) for full, local, m in models.iter_linears(model) if method.targets(local)}
    if not shapes:
        raise CompressorError(
            f"{method.name}: targets {method.config.targets} match no linear layer; names look like {next(iter(models.arch_for(model).linears))}"
        )
    return shapes


def decomposition_cost(shape) -> int:
    """Relative cost of factorising one m x n weight with its n x n Gram: m n min(m, n) + n^3 (the
    SVD of W and the eigh of the Gram), what an executor packs work over ranks by."""
    m, n = int(shape[0]), int(shape[1])
    return m * n * min(m, n) + n**3


# ----------------------------------------------------------------------------- rank reduction


@dataclass
class RankConfig:
    """Options shared by every rank-reduction method.

    ratio: fraction of the targeted linears' parameters to remove (0 < ratio < 1).
    allocation: how ranks are spread across matrices (see compressor/ranks.py).
    rank: one fixed rank for every targeted matrix instead of a ratio.
    targets: glob patterns on linear names inside a decoder layer (e.g. "mlp.*").
    align: ratio-allocated ranks are rounded to multiples of this power of two, within the budget
    (ranks.align_ranks; smaller matrices get a smaller step, see ranks.aligned_step). Default: 64,
    or 128 when a quantisation stage follows (vLLM's GPTQ-Marlin needs a factor's input side
    divisible by 128). 1: no rounding. A fixed `rank` is used as given.
    """

    ratio: float = 0.2
    allocation: str = "uniform"
    rank: int | None = None
    targets: list[str] = field(default_factory=lambda: ["*"])
    align: int | None = None

    def __post_init__(self):
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 < self.ratio < 1.0:
            raise CompressorError(f"key 'ratio' must be strictly between 0 and 1, got {shown(self.ratio)}")
        check_choice("allocation", self.allocation, sorted(rank_policies.POLICIES))
        check_int("rank", self.rank, 1, optional=True)
        check_patterns("targets", self.targets)
        check_align(self.align)


def check_align(align) -> None:
    check_int("align", align, 1, optional=True)
    if align is not None and align & (align - 1):
        raise CompressorError(f"key 'align' must be a power of two (1, 8, 16, 32, 64, 128, ...), got {align}")


def resolve_align(align: int | None, stages: list[Method]) -> int:
    """A stage's `align` option as used: the given value, or 64, or 128 before a quantisation stage."""
    if align is not None:
        return align
    return rank_policies.QUANT_ALIGN if any(s.kind == "quant" for s in stages) else rank_policies.DEFAULT_ALIGN


class RankMethod(Method):
    """Replaces a weight W (out x in) by factors up (out x r) @ down (r x in). A method provides
    `energies` and `decompose`; planning ranks and rebuilding the layer are shared here."""

    Config = RankConfig

    def __init__(self, config):
        super().__init__(config)
        self.ranks: dict[str, int | None] = {}  # full name -> rank (None: stays dense)
        self.shapes: dict[str, tuple[int, int]] = {}  # full name -> (out, in) of the targeted weights
        self.align = resolve_align(config.align, [])  # bind() sees the whole recipe

    def bind(self, stages, calibration) -> None:
        self.align = resolve_align(self.config.align, stages)

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
        return rank_policies.allocate(cfg.allocation, shapes, cfg.ratio, energies, extra, self.align)

    def needs_energies(self) -> bool:
        return self.config.rank is None and self.config.allocation != "uniform"

    def report(self, model, specs: dict) -> dict:
        """How the ranks met the hardware alignment: `unaligned` lists the factorised matrices whose
        rank is no multiple of a step > 1 (small matrices, fixed ranks, ranks below one step)."""
        steps = {n: rank_policies.aligned_step(self.shapes[n], self.align) for n, k in self.ranks.items() if k is not None and n in self.shapes}
        return {"rank_alignment": {"align": self.align, "fixed_rank": self.config.rank is not None,
                                   "aligned": sum(1 for n, st in steps.items() if st > 1 and self.ranks[n] % st == 0),
                                   "unaligned": sorted(n for n, st in steps.items() if st == 1 or self.ranks[n] % st)}}

    def module_spec(self, shape: tuple[int, int], rank: int, bias: bool) -> ModuleSpec:
        return ModuleSpec("lowrank", shape[0], shape[1], bias, rank=rank)

    def _linears(self, model, layer: nn.Module, only: set[str] | None = None) -> dict[str, nn.Module]:
        return {n: m for n, m in models.layer_linears(model, layer, only).items() if self.targets(n)}

    def layer_energies(self, model, index: int, layer: nn.Module, grams: dict | None, executor) -> dict[str, torch.Tensor]:
        """Per targeted full module name in one decoder layer, the component energies (descending).
        executor: the run's (Run.executor), which may share the matrices out by cost."""
        prefix = models.layer_prefix(model, index)
        linears = self._linears(model, layer)
        weights = [models.weight_of(m).detach() for m in linears.values()]
        arch = models.arch_for(model)
        hs = [grams[arch.linears[n]] for n in linears] if self.needs_gram else [None] * len(weights)
        found = executor.map_by_cost(lambda idx: self.energies([weights[j] for j in idx], [hs[j] for j in idx]), range(len(weights)),
                                     lambda j: decomposition_cost(weights[j].shape), lambda j: tuple(weights[j].shape), "spectra")
        return {f"{prefix}.{name}": e.cpu() for name, e in zip(linears, found)}

    def plan_ranks(self, model, energies: dict | None) -> dict:
        """Per full module name, the rank (or None: stays dense) the allocation gives."""
        self.shapes = target_shapes(model, self)
        return self.allocate(self.shapes, energies)

    def prepare(self, run) -> None:
        energies = None
        if self.needs_energies():
            energies = {}
            run.walk(lambda i, layer, grams: energies.update(self.layer_energies(run.model, i, layer, grams, run.executor)), "spectra", self.needs_gram)
            energies = run.executor.merge_layers(energies, "spectra")  # a walk split over ranks by layer saw some layers each
        self.ranks = self.plan_ranks(run.model, energies)
        run.plan.update({n: {"type": "lowrank", "rank": r} for n, r in self.ranks.items() if r is not None})

    def apply(self, work) -> None:
        work.run.specs.update(self.compress_layer(work.run.model, work.index, work.layer, work.grams, work.run.executor, work.only))

    def summary_lines(self, model, specs: dict, entry: dict) -> list[str]:
        ranks = [r for r in self.ranks.values() if r is not None]
        if not ranks:
            return []
        total = sum(1 for _ in models.iter_linears_any(model))
        return [f"factorised {len(ranks)} of {total} decoder linears with {self.name} (ranks {min(ranks)}..{max(ranks)})"]

    def compress_layer(self, model, index: int, layer: nn.Module, grams: dict | None, executor, only: set[str] | None = None) -> dict:
        """Replace the targeted linears of one decoder layer (those named in `only`, if given) by
        their factorisation; returns their specs. executor: the run's (Run.executor), which may
        share the decompositions out by cost."""
        arch = models.arch_for(model)
        prefix = models.layer_prefix(model, index)
        specs: dict[str, ModuleSpec] = {}
        todo = {n: m for n, m in self._linears(model, layer, only).items() if self.ranks.get(f"{prefix}.{n}") is not None}
        if not todo:
            return specs
        weights = []
        for name, module in todo.items():
            w = models.weight_of(module).detach()
            check_finite(f"weight {prefix}.{name}", w)
            weights.append(w)
        hs = [grams[arch.linears[n]] for n in todo] if self.needs_gram else [None] * len(weights)
        ks = [self.ranks[f"{prefix}.{n}"] for n in todo]
        # Matrices of one shape stay together: decompose batches them by shape (a shape's matrices
        # get the largest rank asked of any; the randomized SVD's test matrix depends on the position
        # in the batch), so every result is what one call on all of them computes.
        factors = executor.map_by_cost(lambda idx: self.decompose([weights[j] for j in idx], [hs[j] for j in idx], [ks[j] for j in idx]),
                                       range(len(weights)), lambda j: decomposition_cost(weights[j].shape), lambda j: tuple(weights[j].shape),
                                       "decompositions")
        for (name, old), w, f, k in zip(todo.items(), weights, factors, ks):
            spec = self.module_spec(tuple(w.shape), k, old.bias is not None)
            new = build_module(spec, old)
            state = new.state_dict()
            with torch.no_grad():
                for key, value in f.items():
                    state[key].copy_(value)
                if old.bias is not None:
                    new.up.bias.copy_(old.bias)
            models.replace_linear(layer, name, new)
            specs[f"{prefix}.{name}"] = spec
        return specs
