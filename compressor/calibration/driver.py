"""The one layer-sequential driver. It knows no method: a recipe's stages are plug-ins
(compressor/methods/base.py: Method) and this file only moves layers and statistics.

    for each stage: stage.prepare(run)            # on the dense model: plans, spectra, sensitivities
    for each decoder layer i (on the compute device):
        collect what the stages need from the calibration inputs of layer i (input Grams, and with
            a dense stream the cross-Grams against the dense model's inputs), in one pass;
        for each stage, in recipe order: stage.apply(LayerWork)   # change the layer's linears
            (with a stage that asks, LayerWork also holds the layer's calibration inputs and the
            dense layer's outputs, so a stage can fit the changed layer to them)
        run the finished layer to get layer i+1's inputs
    for each stage: stage.finish(run)             # decisions that need every layer (allocations)

So layer i+1 is calibrated on what the finished layer i really outputs, and the device holds one
layer plus its activations, never the model. With `true_sequential`, a layer is visited once per
linear input group (q/k/v, then o, gate/up, then down), each group's Gram collected after the
groups before it were compressed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor import distributed, models, progress
from compressor.calibration.collect import DriftCollector, GramCollector, one_per_group

log = logging.getLogger("compressor.driver")


@dataclass
class Result:
    """What a compression returns (api.compress)."""

    model: nn.Module | None
    tokenizer: object
    report: dict
    out: object = None  # the output folder (a Path), or None when nothing was written


@dataclass
class Run:
    """What one compression run shares with its stages."""

    model: nn.Module
    device: torch.device
    windows: torch.Tensor | None  # calibration token windows (None: data-free)
    batch_size: int
    gram_dtype: torch.dtype
    layers: MemoryLayers | None = None  # where the layers come from (None: the model in memory)
    store_dtype: torch.dtype = torch.float32  # the dtype the output is written in (what a stage budgeting bytes counts)
    specs: dict[str, dict] = field(default_factory=dict)  # full linear name -> compressed module spec (for export)
    plan: dict[str, dict] = field(default_factory=dict)  # full linear name -> the spec a stage plans for it (in prepare)
    # How stages map independent work (a plain call in one process; over the ranks in a distributed
    # run): built here, after the process group is up, so no method imports compressor.distributed.
    executor: distributed.Executor = field(default_factory=distributed.executor)

    def walk(self, visit: Callable, desc: str, with_grams: bool = True, samples: int | None = None) -> None:
        """A walk over the layers of the model as it is now (a stage's prepare, e.g. spectra on the
        dense model), with input Grams when `with_grams` and calibration windows exist; over the
        first `samples` windows only, when given (a cheaper pass for estimates)."""
        windows = self.windows if with_grams else None
        if windows is not None and samples is not None:
            windows = windows[:samples]
        walk(self.model, self.device, visit, windows, self.batch_size, self.gram_dtype, desc=desc,
             layers=None if self.layers is None else self.layers.reader())


@dataclass
class LayerWork:
    """One decoder layer as the stages see it, visit by visit.

    grams / crosses: per linear input group, the Gram of what the layer's linears receive (and the
    cross-Gram against the dense model's inputs), as the layer is now; a stage that changes a
    layer's shapes replaces them. reference: per linear, the weight later stages measure their
    error against (the layer before any approximating stage touched it)."""

    run: Run
    index: int
    layer: nn.Module
    grams: dict | None = None
    crosses: dict | None = None
    only: set[str] | None = None  # true_sequential: the linears of this visit's input group
    reference: dict[str, torch.Tensor] = field(default_factory=dict)
    io: LayerIO | None = None  # with a stage whose needs_layer_io() is true: what the layer sees and should give

    @property
    def inputs(self) -> list[torch.Tensor] | None:
        """Per calibration batch, the layer's input hidden states (the compressed model's)."""
        return None if self.io is None else self.io.inputs

    @property
    def calls(self) -> list[tuple] | None:
        """Per calibration batch, the (args, kwargs) the model passes the layer besides its input."""
        return None if self.io is None else self.io.calls

    @property
    def targets(self) -> list[torch.Tensor] | None:
        """Per batch, the dense layer's output on the dense model's inputs (the dense model's next
        hidden states); None without a dense stream."""
        return None if self.io is None else self.io.targets

    @property
    def own_targets(self) -> list[torch.Tensor] | None:
        """Per batch, the dense layer's output on `inputs` (before any stage changed the layer)."""
        return None if self.io is None else self.io.own_targets

    def regather(self) -> None:
        """Collect the input Grams again from `inputs`, for a stage that changed the layer's weights
        (not only its shapes) before later stages read them; crosses no longer apply and go."""
        if self.io is None:
            raise RuntimeError("regather needs the layer's inputs: the stage must declare needs_layer_io()")
        acts = Activations(self.io.inputs, {self.index: self.io.calls})
        self.grams, _, _ = collect(self.run.model, self.layer, acts, self.index, self.run.gram_dtype)
        self.crosses = None

    @property
    def prefix(self) -> str:
        return models.layer_prefix(self.run.model, self.index)

    @property
    def names(self) -> list[str]:
        """The layer's linears this visit covers, in the architecture's order."""
        return [n for n in models.arch_for(self.run.model).linears if self.only is None or n in self.only]

    def full(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def gram(self, name: str) -> torch.Tensor | None:
        return None if self.grams is None else self.grams[models.arch_for(self.run.model).linears[name]]

    def cross(self, name: str) -> torch.Tensor | None:
        return None if self.crosses is None else self.crosses[models.arch_for(self.run.model).linears[name]]

    def module(self, name: str) -> nn.Module:
        return self.layer.get_submodule(name)

    def replace(self, name: str, module: nn.Module, spec: dict | None = None) -> None:
        models.replace_linear(self.layer, name, module)
        if spec is not None:
            self.run.specs[self.full(name)] = spec


@dataclass
class LayerIO:
    """One layer's calibration inputs and the dense layer's outputs, kept for stages that fit the
    changed layer to them (Method.needs_layer_io). Shared lists: a stage must not change them."""

    inputs: list[torch.Tensor]
    calls: list[tuple]
    own_targets: list[torch.Tensor]
    targets: list[torch.Tensor] | None = None


def run(model: nn.Module, stages: list, device: torch.device, windows: torch.Tensor | None = None, batch_size: int = 8,
        gram_dtype: torch.dtype = torch.float64, true_sequential: bool = False, layers: MemoryLayers | None = None,
        specs: dict | None = None, executor: distributed.Executor | None = None, store_dtype: torch.dtype | None = None) -> Run:
    """Run `stages` (built and cross-checked by the recipe loader) on `model`, in place.
    layers: the layer source (see walk); specs: those of layers a resumed run finished before;
    executor: what the stages map their work with (default: the one this process needs);
    store_dtype: the dtype the output is written in (default: the model's)."""
    state = Run(model, device, windows, batch_size, gram_dtype, layers)
    state.store_dtype = store_dtype or next(model.parameters()).dtype
    if executor is not None:
        state.executor = executor
    if specs is not None:
        state.specs = specs
    for stage in stages:
        with progress.timed(f"prepare:{stage.name}"):
            stage.prepare(state)
    wants_reference = any(stage.needs_reference() for stage in stages)

    def visit(i, layer, grams, crosses=None, only=None, io=None):
        work = LayerWork(state, i, layer, grams, crosses, only, io=io)
        clock = _Clock()
        stale = True
        for stage in stages:
            if wants_reference and stale and not stage.sets_reference:
                work.reference = {n: models.weight_of(m).detach().clone() for n, m in models.layer_linears(model, layer, work.names).items()}
                stale = False
            with clock(stage.name):
                stage.apply(work)
            stale = stale or stage.sets_reference
        log.info("layer %d%s: %s", i, "" if only is None else f" ({', '.join(sorted(only))})", clock)

    names = "+".join(stage.name for stage in stages)
    needs_gram = any(stage.needs_gram for stage in stages)
    walk(model, device, visit, windows if needs_gram else None, batch_size, gram_dtype, desc=f"compressing ({names})",
         dense_stream=any(stage.needs_dense_stream() for stage in stages), true_sequential=true_sequential, layers=layers,
         layer_io=any(stage.needs_layer_io() for stage in stages))
    for stage in stages:
        with progress.timed(f"finish:{stage.name}"):
            stage.finish(state)
    return state


class _Clock:
    """Seconds spent per stage within one layer, for the -v log."""

    def __init__(self):
        self.spent: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        with progress.timed(f"stage:{name}"):  # the run's totals per stage (benchmarks read them)
            start = time.perf_counter()
            try:
                yield
            finally:
                self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - start

    def __str__(self) -> str:
        return ", ".join(f"{name} {secs:.1f} s" for name, secs in self.spent.items()) or "nothing to do"


# ----------------------------------------------------------------------------- the walk


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
                 dense_layer: nn.Module | None = None, own: list | None = None) -> list[torch.Tensor]:
    """Per batch, the dense layer (`dense_layer`, default `layer` while it is still dense) on the
    dense model's hidden states (kept by the collector), then `layer` on the compressed model's
    (paired with them; its outputs appended to `own` when given). Returns the dense model's next
    hidden states."""
    outputs = []
    for d, hidden, call in zip(dense, acts.hidden, acts.calls[index]):
        collector.recording = True
        outputs.append(_forward(layer if dense_layer is None else dense_layer, d, call))
        collector.recording = False
        out = _forward(layer, hidden, call)
        if own is not None:
            own.append(out)
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
            dense_layer: nn.Module | None = None, own: list | None = None):
    """(grams, crosses or None, the dense stream's next hidden states or None) from one pass of the
    layer over the calibration batches; `names`: hook only those linears (one input group); `own`:
    a list that receives the layer's outputs on acts.hidden (the pass computes them anyway)."""
    groups = models.arch_for(model).linears
    linears = models.layer_linears(model, layer, names)
    if dense is None:
        collector = GramCollector(linears, groups, gram_dtype)
    else:
        collector = DriftCollector(linears, groups, gram_dtype, None if dense_layer is None else models.layer_linears(model, dense_layer))
    try:
        if dense is None:
            outputs = run_layer(layer, acts, index)
            if own is not None:
                own.extend(outputs)
        else:
            dense = _paired_pass(layer, acts, dense, index, collector, dense_layer, own)
    finally:
        collector.close()
    if distributed.active():  # distributed: the sums over every rank's windows, added in rank order
        distributed.reduce_collector(collector)
    return collector.grams(), None if dense is None else collector.crosses(), dense


class MemoryLayers:
    """Where the walk gets each decoder layer and puts it back: for a model in memory, the layer
    moves to the compute device for its turn and back home after it. (compressor/pipeline/sources.py
    has the other source: layers read from safetensors shards and handed to a sink as they finish.)"""

    finished = 0  # layers before this one are done already (a resumed run): replayed, never visited

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32):
        self.layers = models.decoder_layers(model)
        self.home = next(model.parameters()).device
        self.dtype = dtype

    def settle(self, index: int, layer: nn.Module) -> None:
        """The stages are done with `layer`: round it to the dtype the export stores, so the layers
        after it are calibrated on what will really be there (a no-op for float32)."""
        if self.dtype != torch.float32:
            layer.to(self.dtype).float()

    def load(self, index: int, device: torch.device) -> nn.Module:
        return self.layers[index].to(device)

    def replay(self, index: int, device: torch.device) -> nn.Module:
        """A finished layer, for its forward pass only (the inputs of the layers after it)."""
        raise NotImplementedError

    def release(self, index: int, layer: nn.Module, visited: bool) -> None:
        """The walk is done with `layer` (visited: the stages changed it; False: replayed)."""
        layer.to(self.home)

    def captured(self, model: nn.Module) -> None:
        """The layer-0 inputs are recorded: what sits outside the layers may leave the device."""

    def close(self, model: nn.Module) -> None:
        model.to(self.home)

    def reader(self) -> MemoryLayers:
        """The source for a walk that only reads (spectra, error curves), not the one that compresses."""
        return self


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
    layers: MemoryLayers | None = None,
    layer_io: bool = False,
) -> None:
    """Visit every decoder layer on `device`, with its input Grams when `windows` are given.

    dense_stream: also carry the dense model's hidden states through the walk and call
    visit(..., crosses=crosses), crosses[group] = X_d^T X / N of the dense model's inputs against
    the compressed model's (for stages that correct what earlier layers' compression changed in a
    layer's input).
    true_sequential: visit each layer once per linear input group, in the order the layer runs
    them, as visit(..., only=names of that group's linears) with that group's Gram collected after
    the visits before it compressed theirs (so o_proj sees compressed q/k/v). The dense stream
    then runs through a dense copy of the layer.
    layers: where the layers come from and go to (MemoryLayers(model) by default).
    layer_io: also call visit(..., io=LayerIO): the layer's inputs and call arguments per batch,
    the layer's outputs on them before any visit changed it, and with a dense stream the dense
    model's next hidden states (the collecting pass computes all of these; keeping them costs
    memory only, about two more copies of the calibration hidden states).
    """
    arch = models.arch_for(model)
    source = layers if layers is not None else MemoryLayers(model)
    count = len(models.decoder_layers(model))
    with progress.timed("capture"):
        acts = capture(model, windows, batch_size, device) if windows is not None else None
    if acts is not None:
        source.captured(model)
    dense = list(acts.hidden) if acts is not None and dense_stream else None
    # distributed (compressor/distributed/policy.py; nothing changes in one process): with
    # calibration data every rank visits every layer and the ranks check they hold the same result;
    # without, inside distributed.layer_split, rank r visits layers r, r + N, ...
    shared = distributed.active()
    split = shared and acts is None and distributed.in_layer_split()
    if shared and acts is not None:
        visit = distributed.synced(visit)
    try:
        for i in progress.iterate(range(count), desc, "layers", interval=0):
            if i < source.finished:
                if acts is not None:
                    layer = source.replay(i, device)
                    acts.hidden = run_layer(layer, acts, i)
                    source.release(i, layer, visited=False)
                continue
            if shared and not distributed.layer_turn(i, split):
                continue
            with progress.timed("move"):
                layer = source.load(i, device)
            if acts is None:
                visit(i, layer, None)
            elif not true_sequential:
                own = [] if layer_io else None
                with progress.timed("grams"):
                    grams, crosses, dense = collect(model, layer, acts, i, gram_dtype, dense, own=own)
                extra = {} if dense is None else {"crosses": crosses}
                if layer_io:
                    extra["io"] = LayerIO(acts.hidden, acts.calls[i], own, dense)
                visit(i, layer, grams, **extra)
                del grams, crosses, extra
            else:
                original = copy.deepcopy(layer) if dense is not None else None
                following = dense
                io = None
                for group in _group_order(model, layer, acts, i):
                    names = {n for n, g in arch.linears.items() if g == group}
                    # The first group's pass runs the still-dense layer: its outputs are the targets.
                    own = [] if layer_io and io is None else None
                    with progress.timed("grams"):
                        grams, crosses, following = collect(model, layer, acts, i, gram_dtype, dense, names, original, own=own)
                    extra = {} if dense is None else {"crosses": crosses}
                    if layer_io:
                        io = io or LayerIO(acts.hidden, acts.calls[i], own, following)
                        extra["io"] = io
                    visit(i, layer, grams, only=names, **extra)
                dense = following
                del original, io
            source.settle(i, layer)
            if acts is not None and i + 1 < count:
                with progress.timed("forward"):
                    acts.hidden = run_layer(layer, acts, i)
            with progress.timed("move"):
                source.release(i, layer, visited=True)
    finally:
        source.close(model)
