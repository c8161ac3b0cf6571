"""Layer-sequential driver.

Decoder layers are visited one at a time: the layer is moved to the compute device, its linears'
input Grams are collected from calibration activations, the recipe's stages compress it, and the
compressed layer produces the inputs of the next one. So layer i+1 is calibrated on what compressed
layer i really outputs, and the device holds one layer plus its activations, never the model.
"""

from __future__ import annotations

import copy
import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compressor import distributed, models, progress
from compressor.calibration import DriftCollector, GramCollector, one_per_group
from compressor.errors import CompressorError
from compressor.linalg import check_finite
from compressor.methods.base import RankMethod
from compressor.modules import build_module

log = logging.getLogger("compressor.pipeline")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise CompressorError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
        dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and distributed.active():  # distributed: one GPU per rank
        dev = torch.device("cuda", distributed.local_rank() % torch.cuda.device_count())
    return dev


def device_name(device: torch.device) -> str:
    """The GPU's or the CPU's model name, for reports: GPTQ's rounding decisions, and so its codes,
    differ between them (the same run gave 15.34 and 15.74 code perplexity on two CPUs, README)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    return model or platform.processor() or "cpu"


class _Stop(Exception):
    """Raised by the last recorder: nothing after the decoder layers is needed for calibration."""


class _Recorder(nn.Module):
    """Stands in for a decoder layer during capture: records what the model passes it.

    The real layer is held outside the module tree (so moving the skeleton to the GPU leaves it
    alone) but its attributes stay visible, since some models read e.g. `layer.attention_type`.
    """

    def __init__(self, inner: nn.Module, index: int, sink: list, last: bool):
        super().__init__()
        object.__setattr__(self, "_inner", inner)
        self._index, self._sink, self._last = index, sink, last

    def forward(self, hidden, *args, **kwargs):
        self._sink.append((self._index, hidden, args, kwargs))
        if self._last:
            raise _Stop
        return hidden

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_inner"), name)


@dataclass
class Activations:
    hidden: list[torch.Tensor]  # per batch: input of the current layer
    calls: list[list[tuple]]  # per layer, per batch: (args, kwargs) the model passes that layer


def capture(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device) -> Activations:
    """Inputs of layer 0 and the per-layer call arguments (masks, rotary embeddings, ...).

    Recording what the model itself passes each layer keeps this architecture-agnostic: models
    with per-layer attention types (Gemma 3's sliding and global layers) get the right mask each.
    """
    windows = distributed.share(windows, batch_size)  # distributed: this rank's windows only (all in one process)
    layers = models.decoder_layers(model)
    originals = list(layers)
    sink: list = []
    for i, layer in enumerate(originals):
        layers[i] = _Recorder(layer, i, sink, last=i == len(originals) - 1)
    hidden, calls = [], [[] for _ in originals]
    try:
        model.to(device)
        with torch.no_grad():
            for batch in progress.iterate(windows.split(batch_size), "calibration: layer-0 inputs", "batches"):
                sink.clear()
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _Stop:
                    pass
                hidden.append(sink[0][1])
                for index, _, args, kwargs in sink:
                    calls[index].append((args, kwargs))
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return Activations(hidden, calls)


def run_layer(layer: nn.Module, acts: Activations, index: int) -> list[torch.Tensor]:
    return [_forward(layer, hidden, call) for hidden, call in zip(acts.hidden, acts.calls[index])]


def _forward(layer: nn.Module, hidden: torch.Tensor, call: tuple) -> torch.Tensor:
    args, kwargs = call
    with torch.no_grad():
        out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _paired_pass(layer: nn.Module, acts: Activations, dense: list[torch.Tensor], index: int, collector: DriftCollector,
                 dense_layer: nn.Module | None = None) -> list[torch.Tensor]:
    """Per batch, the dense layer (`dense_layer`, default `layer` while it is still dense) on the
    dense model's hidden states (kept by the collector), then `layer` on the compressed model's
    (paired with them). Returns the dense model's next hidden states."""
    outputs = []
    for d, hidden, call in zip(dense, acts.hidden, acts.calls[index]):
        collector.recording = True
        outputs.append(_forward(layer if dense_layer is None else dense_layer, d, call))
        collector.recording = False
        _forward(layer, hidden, call)
    return outputs


def _group_order(model, layer: nn.Module, acts: Activations, index: int) -> list[str]:
    """The layer's linear input groups in the order a forward pass reaches them (one batch)."""
    order: list[str] = []

    def reached(group):
        def hook(module, args, output):
            if group not in order:
                order.append(group)

        return hook

    first = one_per_group(models.layer_linears(model, layer), models.arch_for(model).linears)
    handles = [module.register_forward_hook(reached(group)) for group, module in first.items()]
    try:
        _forward(layer, acts.hidden[0], acts.calls[index][0])
    finally:
        for h in handles:
            h.remove()
    return order


def collect(model, layer: nn.Module, acts: Activations, index: int, gram_dtype, dense: list | None = None, names: set[str] | None = None,
            dense_layer: nn.Module | None = None):
    """(grams, crosses or None, the dense stream's next hidden states or None) from one pass of the
    layer over the calibration batches; `names`: hook only those linears (one input group)."""
    groups = models.arch_for(model).linears
    linears = models.layer_linears(model, layer, names)
    if dense is None:
        collector = GramCollector(linears, groups, gram_dtype)
    else:
        collector = DriftCollector(linears, groups, gram_dtype, None if dense_layer is None else models.layer_linears(model, dense_layer))
    try:
        if dense is None:
            run_layer(layer, acts, index)
        else:
            dense = _paired_pass(layer, acts, dense, index, collector, dense_layer)
    finally:
        collector.close()
    if distributed.active():  # distributed: the sums over every rank's windows, added in rank order
        distributed.reduce_collector(collector)
    return collector.grams(), None if dense is None else collector.crosses(), dense


def walk(
    model: nn.Module,
    device: torch.device,
    visit: Callable[..., None],
    windows: torch.Tensor | None = None,
    batch_size: int = 8,
    gram_dtype: torch.dtype = torch.float64,
    desc: str = "layers",
    dense_stream: bool = False,
    true_sequential: bool = False,
) -> None:
    """Visit every decoder layer on `device`, with its input Grams when `windows` are given.

    dense_stream: also carry the dense model's hidden states through the walk and call
    visit(..., crosses=crosses), crosses[group] = X_d^T X / N of the dense model's inputs against
    the compressed model's (what the eora stage's `propagation` corrects for).
    true_sequential: visit each layer once per linear input group, in the order the layer runs
    them, as visit(..., only=names of that group's linears) with that group's Gram collected after
    the visits before it compressed theirs (so o_proj sees compressed q/k/v). The dense stream
    then runs through a dense copy of the layer.
    """
    arch = models.arch_for(model)
    layers = models.decoder_layers(model)
    home = next(model.parameters()).device
    acts = capture(model, windows, batch_size, device) if windows is not None else None
    dense = list(acts.hidden) if acts is not None and dense_stream else None
    # distributed (compressor/distributed.py; nothing changes in one process): with calibration
    # data every rank visits every layer and the ranks check they hold the same result; without,
    # inside distributed.layer_split, rank r visits layers r, r + N, ...
    shared = distributed.active()
    split = shared and acts is None and distributed.splitting()
    if shared and acts is not None:
        visit = distributed.synced(visit)
    try:
        for i, layer in enumerate(progress.iterate(layers, desc, "layers", interval=0)):
            if shared and not distributed.layer_turn(i, split):
                continue
            layer.to(device)
            if acts is None:
                visit(i, layer, None)
            elif not true_sequential:
                grams, crosses, dense = collect(model, layer, acts, i, gram_dtype, dense)
                visit(i, layer, grams, **({} if dense is None else {"crosses": crosses}))
            else:
                original = copy.deepcopy(layer) if dense is not None else None
                following = dense
                for group in _group_order(model, layer, acts, i):
                    names = {n for n, g in arch.linears.items() if g == group}
                    grams, crosses, following = collect(model, layer, acts, i, gram_dtype, dense, names, original)
                    visit(i, layer, grams, only=names, **({} if dense is None else {"crosses": crosses}))
                dense = following
                del original
            if acts is not None and i + 1 < len(layers):
                acts.hidden = run_layer(layer, acts, i)
            layer.to(home)
    finally:
        model.to(home)


def _targets(model, method: RankMethod, layer: nn.Module, only: set[str] | None = None) -> dict[str, nn.Module]:
    return {n: m for n, m in models.layer_linears(model, layer, only).items() if method.targets(n)}


def target_shapes(model, method) -> dict[str, tuple[int, int]]:
    """Per full module name of a linear `method` targets, its weight's (out, in); an error when
    the targets match nothing."""
    shapes = {full: tuple(models.weight_of(m).shape) for full, local, m in models.iter_linears(model) if method.targets(local)}
    if not shapes:
        raise CompressorError(
            f"{method.name}: targets {method.config.targets} match no linear layer; names look like {next(iter(models.arch_for(model).linears))}"
        )
    return shapes


def layer_energies(model, method: RankMethod, index: int, layer: nn.Module, grams: dict | None) -> dict[str, torch.Tensor]:
    """Per targeted full module name in one decoder layer, the method's component energies (descending)."""
    prefix = models.layer_prefix(model, index)
    linears = _targets(model, method, layer)
    weights = [models.weight_of(m).detach() for m in linears.values()]
    arch = models.arch_for(model)
    hs = [grams[arch.linears[n]] for n in linears] if method.needs_gram else [None] * len(weights)
    if distributed.spreading():  # distributed: each shape's matrices on one rank, results broadcast
        found = distributed.spread(weights, lambda idx: method.energies([weights[j] for j in idx], [hs[j] for j in idx]), "spectra")
        return {f"{prefix}.{name}": e.cpu() for name, e in zip(linears, found)}
    return {f"{prefix}.{name}": e.cpu() for name, e in zip(linears, method.energies(weights, hs))}


def collect_energies(model, method: RankMethod, device, windows=None, batch_size=8, gram_dtype=torch.float64) -> dict:
    """Per targeted full module name, the method's component energies (descending)."""
    energies: dict[str, torch.Tensor] = {}

    def visit(i, layer, grams):
        energies.update(layer_energies(model, method, i, layer, grams))

    walk(model, device, visit, windows if method.needs_gram else None, batch_size, gram_dtype, desc="spectra")
    return distributed.merge_split(energies)  # distributed: every rank's layers' spectra (a no-op otherwise)


def plan_ranks(model, method: RankMethod, device, windows=None, batch_size=8, gram_dtype=torch.float64) -> dict:
    """Per full module name, the rank (or None: stays dense) the method's allocation gives."""
    shapes = target_shapes(model, method)
    energies = collect_energies(model, method, device, windows, batch_size, gram_dtype) if method.needs_energies() else None
    return method.allocate(shapes, energies)


def compress_layer(model, method: RankMethod, ranks: dict, index: int, layer: nn.Module, grams: dict | None, only: set[str] | None = None) -> dict:
    """Replace the targeted linears of one decoder layer (those named in `only`, if given) by their
    factorisation; returns their specs."""
    arch = models.arch_for(model)
    prefix = models.layer_prefix(model, index)
    specs: dict[str, dict] = {}
    todo = {n: m for n, m in _targets(model, method, layer, only).items() if ranks.get(f"{prefix}.{n}") is not None}
    if not todo:
        return specs
    weights = []
    for name, module in todo.items():
        w = models.weight_of(module).detach()
        check_finite(f"weight {prefix}.{name}", w)
        weights.append(w)
    hs = [grams[arch.linears[n]] for n in todo] if method.needs_gram else [None] * len(weights)
    if distributed.spreading():  # distributed: each shape's matrices on one rank, results broadcast
        ks = [ranks[f"{prefix}.{n}"] for n in todo]
        factors = distributed.spread(weights, lambda idx: method.decompose([weights[j] for j in idx], [hs[j] for j in idx], [ks[j] for j in idx]))
    else:
        factors = method.decompose(weights, hs, [ranks[f"{prefix}.{n}"] for n in todo])
    for (name, old), w, f in zip(todo.items(), weights, factors):
        spec = method.module_spec(tuple(w.shape), ranks[f"{prefix}.{name}"], old.bias is not None)
        new = build_module(spec, old)
        state = new.state_dict()
        with torch.no_grad():
            for key, value in f.items():
                state[key].copy_(value)
            if old.bias is not None:
                new.up.bias.copy_(old.bias)
        parent, _, child = name.rpartition(".")
        setattr(layer.get_submodule(parent), child, new)
        specs[f"{prefix}.{name}"] = spec
    return specs


def apply_rank_method(model, method: RankMethod, ranks: dict, device, windows=None, batch_size=8, gram_dtype=torch.float64) -> dict:
    """Compress every targeted linear in place; returns the module specs for export."""
    specs: dict[str, dict] = {}

    def visit(i, layer, grams):
        specs.update(compress_layer(model, method, ranks, i, layer, grams))

    walk(model, device, visit, windows if method.needs_gram else None, batch_size, gram_dtype, desc=f"compressing ({method.name})")
    return specs
