"""Where a compression's model comes from: a model in memory, or safetensors shards read one decoder
layer at a time.

Both sources hand the session the same things: a model whose decoder layers the driver walks, the
tokenizer, the output dtype, and a layer source for the driver (calibration/driver.py: MemoryLayers
and its subclass ShardLayers here). Weights are computed on in float32 after being rounded to the
output dtype, and each finished layer is rounded to the output dtype again before the next layer's
inputs are computed (MemoryLayers.settle): what later layers are calibrated on is what the export
stores, and a resumed streamed run, which reads finished layers back from their stored bytes,
computes exactly what the uninterrupted run did.

The shard source keeps the model as a skeleton on the meta device. Only the parts outside the
decoder layers (embeddings, final norm, head) are materialised; each decoder layer is read from the
shards for its turn and put back on the meta device after it (its compressed structure stays, so
the accounting and the export declarations read shapes from it). Peak host memory is about one
layer plus the calibration activations, whatever the depth of the model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from compressor import models
from compressor.calibration import driver
from compressor.errors import CompressorError
from compressor.loading import DTYPES, check_checkpoint, load_model, resolve_model, source_dtype, source_size
from compressor.models import guard_token_ids
from compressor.modules import build_module


def _output_dtype(dtype: str, found: str) -> str:
    out = found if dtype == "auto" else dtype
    if out not in DTYPES:
        raise CompressorError(f"unknown dtype '{out}'; use one of {', '.join(DTYPES)} or auto")
    return out


def round_to(module: nn.Module, dtype: torch.dtype) -> None:
    """Round a module's floating-point tensors to `dtype` and back to float32, in place (what storing
    them in `dtype` keeps). QuantLinear keeps its fp16 scales (modules.QuantLinear._apply)."""
    if dtype != torch.float32:
        module.to(dtype).float()


class MemorySource:
    """A model given in memory or loaded whole from a path, hub id, GGUF file or built-in name."""

    streamed = False

    def __init__(self, model, tokenizer=None, dtype: str = "auto"):
        self.spec, self.tokenizer, self.dtype = model, tokenizer, dtype
        self.source_bytes = None

    def open(self):
        """(model in float32 as the output dtype stores it, tokenizer, output dtype name)."""
        model, tokenizer = self.spec, self.tokenizer
        if isinstance(model, (str, Path)):
            out_dtype = _output_dtype(self.dtype, source_dtype(model))
            self.source_bytes = source_size(model)
            model, tokenizer = load_model(str(model), dtype="float32")
        else:
            out_dtype = _output_dtype(self.dtype, str(next(model.parameters()).dtype).removeprefix("torch."))
            guard_token_ids(model)
        self.out_dtype = getattr(torch, out_dtype)
        model = model.to(self.out_dtype).float()
        return model, tokenizer, out_dtype

    def layers(self, model, sink=None, finished: int = 0, replay=None) -> driver.MemoryLayers:
        return driver.MemoryLayers(model, self.out_dtype)


class Checkpoint:
    """Where each tensor of a safetensors checkpoint lives; reads tensors on demand."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.where = dict(json.loads(index.read_text())["weight_map"])
        elif (folder / "model.safetensors").is_file():
            with safe_open(folder / "model.safetensors", framework="pt") as f:
                self.where = {k: "model.safetensors" for k in f.keys()}
        else:
            raise CompressorError(f"{folder} holds no safetensors checkpoint (model.safetensors or model.safetensors.index.json); streaming reads only those")

    def read(self, names: list[str], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        """The named tensors, floating-point ones rounded to `dtype` and computed on in float32."""
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        out = {}
        for file, keys in by_file.items():
            with safe_open(self.folder / file, framework="pt") as f:
                for k in keys:
                    t = f.get_tensor(k)
                    out[k] = (t.to(dtype).float() if t.is_floating_point() else t).to(device)
        return out


def _split(model: nn.Module):
    """(parent of the decoder-layer list, its attribute name)."""
    path = models.arch_for(model).layers
    parent, _, child = path.rpartition(".")
    return model.get_submodule(parent) if parent else model, child


def outside_layers_to(model: nn.Module, device) -> None:
    """Move everything but the (meta) decoder layers, which cannot be moved."""
    parent, child = _split(model)
    layers = getattr(parent, child)
    setattr(parent, child, nn.ModuleList())
    try:
        model.to(device)
    finally:
        setattr(parent, child, layers)


def skeleton(folder: Path, ckpt: Checkpoint, dtype: torch.dtype) -> nn.Module:
    """The model on the meta device (float32), with its non-layer parts loaded from the checkpoint."""
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    layer_prefix = models.arch_for(model).layers + "."
    outside = [k for k in ckpt.where if not k.startswith(layer_prefix)]
    state = ckpt.read(outside, dtype, torch.device("cpu"))
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CompressorError(f"{folder}: tensor {name} contains NaN or Inf values; the checkpoint is corrupt, so re-download or re-export it")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise CompressorError(f"{folder}: checkpoint tensors the model does not have: {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    # Non-persistent buffers (rotary inverse frequencies) are not in checkpoints: rebuild their
    # modules for real. Only modules outside the decoder layers are touched.
    parent, child = _split(model)
    layers = getattr(parent, child)
    setattr(parent, child, nn.ModuleList())
    try:
        shell = None
        for name, module in list(model.named_modules()):
            if any(b.is_meta for b in module.buffers(recurse=False)):
                owner, _, attr = name.rpartition(".")
                try:
                    setattr(model.get_submodule(owner) if owner else model, attr, type(module)(config=getattr(module, "config", config)))
                except TypeError:
                    # Not built from a config (Gemma 3's scaled embedding): take its buffers from a real
                    # copy of the model without decoder layers, built once.
                    shell = shell if shell is not None else _layerless(config)
                    for key, buf in shell.get_submodule(name).named_buffers(recurse=False):
                        module.register_buffer(key, buf, persistent=key not in module._non_persistent_buffers_set)
        left = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
        if left:
            raise CompressorError(f"{folder}: checkpoint lacks {left[:3]}")
    finally:
        setattr(parent, child, layers)
    return model


def _layerless(config) -> nn.Module:
    """The model on the CPU with no decoder layers: the non-layer modules with their real buffers."""
    small = copy.deepcopy(config)
    small.num_hidden_layers = 0
    if getattr(small, "layer_types", None) is not None:
        small.layer_types = []
    # A one-token vocabulary: the embedding and head are what streaming keeps from the checkpoint
    # anyway, and at full size (Gemma 3's 262k x 640) this copy would cost as much again.
    small.vocab_size = 1
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if hasattr(small, key):
            setattr(small, key, None)
    try:
        return AutoModelForCausalLM.from_config(small, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - any failure means: this architecture cannot be streamed
        raise CompressorError(f"streaming cannot rebuild the non-layer modules of this architecture ({type(e).__name__}: {e}); run without --stream") from None


class ShardSource:
    """A local safetensors folder, read one decoder layer at a time (--stream)."""

    streamed = True

    def __init__(self, spec, tokenizer=None, dtype: str = "auto"):
        self.tokenizer, self.dtype = tokenizer, dtype
        found = resolve_model(spec)
        if found.kind == "gguf" and found.convert_to is not None:
            # A built-in model ships as GGUF: its dequantised folder is made once (in memory: these
            # are small models) and streamed from then on.
            load_model(str(spec), dtype="float32")
            found = resolve_model(spec)
        self.folder = Path(found.location)
        if found.kind != "folder" or not (self.folder / "config.json").is_file():
            raise CompressorError(f"--stream needs a local model folder with config.json and safetensors shards; {spec} is not one")
        self.source_bytes = source_size(spec)
        self.source_dtype = source_dtype(spec)

    def open(self):
        out_dtype = _output_dtype(self.dtype, self.source_dtype)
        self.out_dtype = getattr(torch, out_dtype)
        check_checkpoint(self.folder)  # a causal LM, intact shards, no tensor missing, unexpected or mis-shaped
        self.ckpt = Checkpoint(self.folder)
        model = skeleton(self.folder, self.ckpt, self.out_dtype)
        guard_token_ids(model)
        tokenizer = self.tokenizer
        if tokenizer is None:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(self.folder)
            except (OSError, ValueError, KeyError) as e:
                tokenizer = None
                self.tokenizer_error = f"{self.folder} has no usable tokenizer ({type(e).__name__}), which calibration needs; save one beside the model"
        return model, tokenizer, out_dtype

    def layers(self, model, sink=None, finished: int = 0, replay=None) -> ShardLayers:
        return ShardLayers(model, self.ckpt, self.out_dtype, sink, finished, replay)


def load_layer(model, ckpt: Checkpoint, index: int, dtype, device) -> nn.Module:
    layers = models.decoder_layers(model)
    prefix = f"{models.layer_prefix(model, index)}."
    names = [k for k in ckpt.where if k.startswith(prefix)]
    state = {k[len(prefix):]: v for k, v in ckpt.read(names, dtype, device).items()}
    layer = layers[index]
    layer.load_state_dict(state, strict=True, assign=True)
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CompressorError(f"{ckpt.folder}: tensor {prefix}{name} contains NaN or Inf values; the checkpoint is corrupt, so re-download or re-export it")
    return layer


def load_finished(model, shard: Path, index: int, specs: dict, device) -> nn.Module:
    """A finished layer back from the shard the sink wrote: compressed structure, stored bytes
    (floating-point tensors in float32 for the forward pass)."""
    layer = models.decoder_layers(model)[index]
    prefix = f"{models.layer_prefix(model, index)}."
    for name, spec in specs.items():
        if name.startswith(prefix):
            local = name[len(prefix):]
            parent, _, child = local.rpartition(".")
            owner = layer.get_submodule(parent) if parent else layer
            with torch.device("meta"):
                setattr(owner, child, build_module(spec, nn.Linear(1, 1, device="meta")))
    state = {}
    try:
        with safe_open(shard, framework="pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                # QuantLinear scales stay fp16 in memory as in the format.
                state[k[len(prefix):]] = (t.float() if t.is_floating_point() and not k.endswith(".scales") else t).to(device)
        layer.load_state_dict(state, strict=True, assign=True)
    except (OSError, RuntimeError, SafetensorError) as e:
        raise CompressorError(f"{shard}, a finished layer of the unfinished run, is corrupt "
                              f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); "
                              "pass --overwrite instead of --resume to start over") from None
    return layer


def _release_host_memory() -> None:
    """Hand freed heap pages back to the OS after each layer.

    glibc serves allocations below its (adaptive, up to 32 MB) mmap threshold from the heap and
    keeps freed heap pages: with layers of small tensors the resident size then grows with every
    layer, which defeats streaming (tests/pipeline/test_streaming.py checks the peak stays flat).
    malloc_trim is glibc-only; other C libraries are left alone.
    """
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


class ShardLayers(driver.MemoryLayers):
    """The driver's layer source for a meta skeleton: each layer is read from the source shards for
    its turn and put back on the meta device after it; in the compressing walk (`sink`), a finished
    layer is first handed to the sink. Layers before `finished` are done already: `replay` reads
    them back from the output, only to run their forward pass."""

    def __init__(self, model, ckpt: Checkpoint, dtype, sink=None, finished: int = 0, replay=None):
        self.model, self.ckpt, self.dtype = model, ckpt, dtype
        self.layers = models.decoder_layers(model)
        self.sink, self.finished, self._replay = sink, finished, replay

    def load(self, index, device):
        return load_layer(self.model, self.ckpt, index, self.dtype, device)

    def replay(self, index, device):
        return self._replay(index, device)

    def release(self, index, layer, visited):
        kept = self.sink(index, layer, visited) if self.sink is not None else {}
        self.layers[index] = layer.to("meta")
        for path, module in kept.items():  # what must stay real (float adapters, written at the end)
            layer.set_submodule(path, module)
        _release_host_memory()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def captured(self, model):
        outside_layers_to(model, "cpu")

    def close(self, model):
        pass  # the outside parts went home after capture; the layers are meta

    def reader(self):
        return ShardLayers(self.model, self.ckpt, self.dtype)
