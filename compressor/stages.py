"""Runs a recipe's stages (rank reduction, then quantisation, then compensation adapters) in one
layer-sequential walk.

Per decoder layer, in this order: the layer's input Grams are collected (from the inputs the
already compressed earlier layers produce), the dense weights are kept aside, the rank stage
factorises, the quantisation stage quantises dense linears or the factors, and the adapter stage
fits B A to W - W_hat. Only then does the layer compute the next layer's inputs, so every stage of
layer i+1 is calibrated on what the finished layer i really outputs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor import eora, models, modules, pipeline, sensitivity
from compressor.errors import CompressorError
from compressor.methods import eora as eora_stage
from compressor.recipe import Recipe

log = logging.getLogger("compressor.stages")

_ORDER = ("structure", "rank", "quant", "adapter")


@dataclass
class Outcome:
    specs: dict[str, dict] = field(default_factory=dict)  # full name -> compressed module spec
    adapters: dict[str, int] = field(default_factory=dict)  # full name -> adapter rank (unmerged)
    merged: dict[str, int] = field(default_factory=dict)  # full name -> adapter rank folded in
    removed: dict[str, float] = field(default_factory=dict)  # full name -> share of calibration output error the adapter removes


def plan(recipe: Recipe) -> dict:
    """The stages by kind, after checking their order: each kind at most once, in _ORDER."""
    by_kind: dict = {}
    for stage in recipe.stages:
        if stage.kind in by_kind:
            raise CompressorError(f"{recipe.source}: only one {stage.kind} stage per recipe, got '{by_kind[stage.kind].name}' and '{stage.name}'")
        later = [k for k in by_kind if _ORDER.index(k) > _ORDER.index(stage.kind)]
        if later:
            raise CompressorError(f"{recipe.source}: stage '{stage.name}' must come before '{by_kind[later[0]].name}' (order: rank reduction, quantisation, adapters)")
        by_kind[stage.kind] = stage
    if "adapter" in by_kind and len(by_kind) == 1:
        raise CompressorError(f"{recipe.source}: '{by_kind['adapter'].name}' compensates a compression error, so it needs a rank-reduction or quantisation stage before it")
    adapter, quant = by_kind.get("adapter"), by_kind.get("quant")
    if adapter is not None and adapter.config.refine and (quant is None or "rank" in by_kind):
        raise CompressorError(f"{recipe.source}: eora refine re-quantises W - B A for dense linears, so it needs a quantisation stage and no rank-reduction stage; drop 'refine'")
    if adapter is not None and adapter.config.merge and quant is not None:
        raise CompressorError(f"{recipe.source}: eora merge: true cannot fold adapters into quantised weights; drop 'merge' to keep them as a PEFT adapter")
    structure = by_kind.get("structure")
    if structure is not None:
        if "rank" in by_kind:
            raise CompressorError(f"{recipe.source}: '{structure.name}' changes the layer shapes a rank stage plans on; use one of them")
        if recipe.calibration.true_sequential:
            raise CompressorError(f"{recipe.source}: '{structure.name}' needs the whole layer's Grams at once; set calibration.true_sequential: false")
        if adapter is not None and (adapter.config.weighting != "output" or adapter.config.propagation > 0):
            raise CompressorError(
                f"{recipe.source}: after '{structure.name}' the adapters' reference is the narrower dense layer; "
                "use eora weighting: output and propagation: 0"
            )
    return by_kind


def run(model: nn.Module, recipe: Recipe, device, windows=None, batch_size: int = 8, gram_dtype=torch.float64) -> Outcome:
    stages = plan(recipe)
    structure, rank, quant, adapter = (stages.get(k) for k in _ORDER)
    arch = models.arch_for(model)
    ranks = pipeline.plan_ranks(model, rank, device, windows, batch_size, gram_dtype) if rank else {}
    if quant is not None:
        shapes = pipeline.target_shapes(model, quant)
        quant.check(shapes, {n for n, r in ranks.items() if r is not None})
    # Measured on the dense model, before any stage changes it.
    weights = {}
    if adapter is not None and adapter.config.weighting != "output":
        weights = sensitivity.output_sensitivity(model, windows, device, adapted_names(model, adapter), full=adapter.config.weighting == "loss-full")
    if structure is not None:
        structure.prepare(model, device, windows, batch_size, gram_dtype)
    outcome = Outcome()
    deferred: list[tuple[nn.Module, str, str, nn.Module]] = []
    fitted: dict[str, tuple] = {}  # full name -> (component energies, nominal rank, shape)

    def visit(i, layer, grams, crosses=None, only=None):
        # only: with true_sequential, the linears of one input group (the rest are done or to come)
        prefix = models.layer_prefix(model, i)
        todo = [n for n in arch.linears if only is None or n in only]
        clock = _Clock()
        if structure is not None:
            # the layer's new shapes are the dense reference of every later stage
            with clock(structure.name):
                changed, grams = structure.apply(model, i, layer, grams)
            outcome.specs.update(changed)
        dense = {n: models.weight_of(m).detach().clone() for n, m in models.layer_linears(model, layer, todo).items()} if adapter else {}
        if rank is not None:
            with clock(rank.name):
                outcome.specs.update(pipeline.compress_layer(model, rank, ranks, i, layer, grams, only))
        for name in todo:
            full = f"{prefix}.{name}"
            H = grams[arch.linears[name]] if grams is not None else None
            module = layer.get_submodule(name)
            cross = crosses[arch.linears[name]] if crosses is not None else None
            quantised = quant is not None and quant.targets(name)
            adapted = adapter is not None and adapter.targets(name)
            fit = None  # (B, A, energies) when the base was fitted together with its adapters
            if quantised and adapted and adapter.config.refine:
                # the base is quantised inside the adapter fit, from W - B A
                def quantize(w, bias=module.bias):  # Conv1D's bias is (out,) too
                    return quant.quantize_module(modules.linear_from(w, None if bias is None else bias.detach()), H, None)
                with clock(f"{quant.name}+{adapter.name} refine"):
                    module, spec, *fit = adapter.refined(dense[name].to(H.device), quantize, H, adapter.fit_rank(name), weights.get(full), cross)
            elif quantised:
                with clock(quant.name):
                    module, spec = quant.quantize_module(module, H, outcome.specs.get(full))
            if quantised:
                models.replace_linear(layer, name, module)
                outcome.specs[full] = spec
            if not adapted or outcome.specs.get(full, {}).get("type") in (None, "dense"):
                continue
            with clock(adapter.name):
                B, A, energies = fit or adapter.adapters(dense[name].to(H.device), module, H, adapter.fit_rank(name), weights.get(full), cross)
                fitted[full] = (energies, min(adapter.rank_for(name), energies.numel()), tuple(dense[name].shape))
                module, outcome.specs[full] = adapter.attach(module, B, A, outcome.specs[full], H)
            (outcome.merged if adapter.config.merge else outcome.adapters)[full] = A.shape[0]
            if adapter.config.sequential or adapter.config.merge:
                models.replace_linear(layer, name, module)
            else:
                deferred.append((layer, name, full, module))
        log.info("layer %d%s: %s", i, "" if only is None else f" ({', '.join(sorted(only))})", clock)

    needs_gram = any(s.needs_gram for s in stages.values())
    names = "+".join(s.name for s in recipe.stages)
    propagate = adapter is not None and adapter.config.propagation > 0
    pipeline.walk(model, device, visit, windows if needs_gram else None, batch_size, gram_dtype, desc=f"compressing ({names})",
                  dense_stream=propagate, true_sequential=recipe.calibration.true_sequential)
    home = next(model.parameters()).device
    final = adapter.allocate(fitted) if adapter is not None else {}
    for layer, name, full, module in deferred:
        if final[full] != outcome.adapters[full]:
            module = eora_stage.truncate(module, final[full])
            if final[full]:
                outcome.adapters[full] = final[full]
            else:
                del outcome.adapters[full]
        models.replace_linear(layer, name, module.to(home))
    outcome.removed = {n: eora.removed_share(e, final[n]) for n, (e, _, _) in fitted.items()}
    if structure is not None:
        structure.finish(model, outcome.specs)
    return outcome


class _Clock:
    """Seconds spent per stage within one layer, for the -v log."""

    def __init__(self):
        self.spent: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - start

    def __str__(self) -> str:
        return ", ".join(f"{name} {secs:.1f} s" for name, secs in self.spent.items()) or "nothing to do"


def adapted_names(model: nn.Module, adapter) -> set[str]:
    """Full names of the linears the adapter stage may fit (before knowing which get compressed)."""
    return {full for full, name, _ in models.iter_linears(model) if adapter.targets(name)}
