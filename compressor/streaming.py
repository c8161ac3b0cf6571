"""Compression of models larger than memory: one decoder layer at a time, from safetensors shards.

The model is a skeleton on the meta device. Only the parts outside the decoder layers (embeddings,
final norm, head: a few percent of a 7B model) are materialised; each decoder layer is read from
the shards when its turn comes, compressed on the device, written out as its own shard and put
back on the meta device. Peak host and GPU memory are therefore about one layer plus the
calibration activations, whatever the depth of the model.

Resume. Every finished layer is written atomically (temporary name, then rename) and only then
recorded in `progress.json`, so after a kill the folder always describes a prefix of finished
layers. A resumed run does not trust activations saved from the dead process (there are none): it
replays the forward pass of the finished, already compressed layers, read back from their shards,
to regenerate the calibration inputs of the first unfinished layer. The replay computes exactly
what the uninterrupted run computed (same weights, same inputs, same kernels), so the output is
byte-identical; it costs forward passes only, no decompositions. Nothing written depends on
wall-clock time: timings go to the returned report, not to the folder.

Scope: recipes with one rank-reduction stage (every rank method and allocation). Quantisation and
adapter stages are refused with a message, not silently skipped.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from compressor import files, models
from compressor import recipe as recipes
from compressor.calibration import driver
from compressor.calibration.windows import calibration_windows
from compressor.environment import device_name, resolve_device, versions
from compressor.errors import CompressorError, EnvironmentFault, Interrupted, environment_fault
from compressor.export import checkpoint
from compressor.loading import check_checkpoint, source_dtype
from compressor.methods.base import RankMethod, target_shapes
from compressor.models import guard_token_ids
from compressor.modules import build_module
from compressor.ownership import owns_output, source_identity

PROGRESS = "progress.json"


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

    def params(self) -> int:
        """Stored values of floating-point tensors (index buffers are not parameters)."""
        n = 0
        for file in sorted(set(self.where.values())):
            with safe_open(self.folder / file, framework="pt") as f:
                for k in f.keys():
                    t = f.get_slice(k)
                    n += _nbytes(t.get_shape(), "U8") if t.get_dtype() not in ("I64", "I32") else 0
        return n

    def read(self, names: list[str], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        out = {}
        for file, keys in by_file.items():
            with safe_open(self.folder / file, framework="pt") as f:
                for k in keys:
                    t = f.get_tensor(k)
                    out[k] = (t.to(dtype) if t.is_floating_point() else t).to(device)
        return out


def _split(model: nn.Module):
    """(parent of the decoder-layer list, its attribute name)."""
    path = models.arch_for(model).layers
    parent, _, child = path.rpartition(".")
    return model.get_submodule(parent) if parent else model, child


def _outside_layers_to(model: nn.Module, device) -> None:
    """Move everything but the (meta) decoder layers, which cannot be moved."""
    parent, child = _split(model)
    layers = getattr(parent, child)
    setattr(parent, child, nn.ModuleList())
    try:
        model.to(device)
    finally:
        setattr(parent, child, layers)


def skeleton(folder: Path, ckpt: Checkpoint, dtype: torch.dtype) -> nn.Module:
    """The model on the meta device, with its non-layer parts loaded from the checkpoint."""
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
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
        for name, module in list(model.named_modules()):
            if any(b.is_meta for b in module.buffers(recurse=False)):
                owner, _, attr = name.rpartition(".")
                try:
                    setattr(model.get_submodule(owner) if owner else model, attr, type(module)(config=getattr(module, "config", config)))
                except TypeError as e:
                    raise CompressorError(f"streaming cannot rebuild {name} ({type(module).__name__}) of this architecture: {e}") from None
        left = [n for n, p in model.named_parameters() if p.is_meta]
        if left:
            raise CompressorError(f"{folder}: checkpoint lacks {left[:3]}")
    finally:
        setattr(parent, child, layers)
    return model


def _load_layer(model, ckpt: Checkpoint, index: int, dtype, device) -> nn.Module:
    layers = models.decoder_layers(model)
    prefix = f"{models.layer_prefix(model, index)}."
    names = [k for k in ckpt.where if k.startswith(prefix)]
    state = {k[len(prefix):]: v for k, v in ckpt.read(names, dtype, device).items()}
    layer = layers[index]
    layer.load_state_dict(state, strict=True, assign=True)
    return layer


def _load_finished(model, folder: Path, index: int, specs: dict, dtype, device) -> nn.Module:
    """A finished layer back from the shard this module wrote: compressed structure, stored bytes."""
    layer = models.decoder_layers(model)[index]
    prefix = f"{models.layer_prefix(model, index)}."
    for name, spec in specs.items():
        if name.startswith(prefix):
            local = name[len(prefix):]
            parent, _, child = local.rpartition(".")
            owner = layer.get_submodule(parent) if parent else layer
            with torch.device("meta"):
                setattr(owner, child, _build_meta(spec, dtype))
    state = {}
    shard = folder / _shard_name(index, _count(model))
    try:
        with safe_open(shard, framework="pt") as f:
            for k in f.keys():
                state[k[len(prefix):]] = f.get_tensor(k).to(device)
        layer.load_state_dict(state, strict=True, assign=True)
    except (OSError, RuntimeError, SafetensorError) as e:
        raise CompressorError(f"{shard}, a finished layer of the unfinished run, is corrupt "
                              f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); "
                              "pass --overwrite instead of --resume to start over") from None
    return layer


def _build_meta(spec: dict, dtype) -> nn.Module:
    like = nn.Linear(1, 1, device="meta", dtype=dtype)
    return build_module(spec, like)


def _count(model) -> int:
    return len(models.decoder_layers(model)) + 1


def _shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CompressorError(f"tensor {name} holds NaN or Inf values, so the output would be broken; check the source checkpoint")
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    files.write_atomic(path, lambda tmp: save_file(cpu, tmp, metadata={"format": "pt"}), suffix=".safetensors.tmp")


def _write_json_atomic(obj, path: Path) -> None:
    files.write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _release_host_memory() -> None:
    """Hand freed heap pages back to the OS after each layer.

    glibc serves allocations below its (adaptive, up to 32 MB) mmap threshold from the heap and
    keeps freed heap pages: with layers of small tensors the resident size then grows with every
    layer, which defeats streaming (tests/test_streaming.py checks the peak stays flat). 7B-sized
    tensors are above the threshold and never had the problem. malloc_trim is glibc-only; other
    C libraries are left alone.
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
    layer is first written as its own shard. Layers before `finished` are done already: they are
    read back compressed from the output only to replay their forward pass."""

    def __init__(self, model, ckpt: Checkpoint, dtype, sink=None, finished: int = 0, replay=None):
        self.model, self.ckpt, self.dtype = model, ckpt, dtype
        self.layers = models.decoder_layers(model)
        self.sink, self.finished, self._replay = sink, finished, replay

    def load(self, index, device):
        return _load_layer(self.model, self.ckpt, index, self.dtype, device)

    def replay(self, index, device):
        return self._replay(index)

    def release(self, index, layer, visited):
        if visited and self.sink is not None:
            self.sink(index, layer)
        self.layers[index] = layer.to("meta")
        _release_host_memory()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def captured(self, model):
        _outside_layers_to(model, "cpu")

    def close(self, model):
        pass  # the outside parts went home after capture; the layers are meta

    def reader(self):
        return ShardLayers(self.model, self.ckpt, self.dtype)


@owns_output  # holds .OUT.lock: no other run may touch OUT or its .partial meanwhile (compressor/ownership.py)
def compress_streaming(
    source: str | Path,
    recipe: str | recipes.Recipe,
    out: str | Path,
    *,
    tokenizer=None,
    ratio: float | None = None,
    calib: str | None = None,
    samples: int | None = None,
    seq_len: int | None = None,
    device: str = "auto",
    dtype: str = "float32",
    overwrite: bool = False,
    resume: bool = False,
    _after_layer=None,
):
    """Compress the safetensors checkpoint in folder `source` into `out`, layer by layer.

    With resume=True, a run that stopped (killed, out of disk) continues from its last finished
    layer; the result is byte-identical to an uninterrupted run. `_after_layer(i)` is a test hook
    called after layer i is durably written.
    """
    started = time.time()
    source, out = Path(source), Path(out)
    if not (source / "config.json").is_file():
        raise CompressorError(f"streaming needs a local model folder with config.json and safetensors shards; {source} is not one")
    if isinstance(recipe, str):
        recipe = recipes.load(recipe, ratio)
    if len(recipe.stages) != 1 or not isinstance(recipe.stages[0], RankMethod):  # the export below writes low-rank layers only
        raise CompressorError(f"{recipe.source}: streaming supports recipes with one rank-reduction stage; run quantisation or adapter stages without --stream")
    if recipe.calibration.true_sequential:
        raise CompressorError(f"{recipe.source}: streaming collects each layer's Grams in one pass; drop calibration.true_sequential or run without --stream")
    method = recipe.stages[0]
    if out.exists() and not overwrite:
        raise CompressorError(f"output folder {out} already exists; pass --overwrite or choose another -o")
    work = out.with_name(f".{out.name}.partial")
    if dtype == "auto":
        dtype = source_dtype(source)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise CompressorError(f"unknown dtype '{dtype}'; use one of float32, bfloat16, float16 or auto")
    torch_dtype = getattr(torch, dtype)
    dev = resolve_device(device)
    # Everything that can be refused is refused here, before the partial folder exists.
    check_checkpoint(source)  # a causal LM, intact shards, no tensor missing, unexpected or mis-shaped
    ckpt = Checkpoint(source)
    model = skeleton(source, ckpt, torch_dtype)
    guard_token_ids(model)
    total = _count(model)
    if tokenizer is None and recipe.needs_calibration:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, KeyError) as e:
            raise CompressorError(f"{source} has no usable tokenizer ({type(e).__name__}), which calibration needs; save one beside the model") from None

    # What the source holds, not only where it is: weights replaced at the same path refuse --resume.
    identity = {"source": str(source.resolve()), "weights": source_identity(source),
                "recipe": recipe.to_dict(), "dtype": dtype, "calib": calib, "samples": samples, "seq_len": seq_len}
    progress = None
    if work.exists() and not resume:
        if not overwrite:
            raise CompressorError(f"{work} holds an unfinished run of this -o; pass --resume to continue it, or --overwrite to discard it and start over")
        shutil.rmtree(work)
    if work.exists():
        progress = _read_progress(work, total) if (work / PROGRESS).is_file() else None
        if progress is not None and progress["identity"] != identity:
            raise CompressorError(f"{work} was started with other settings (source or its weights, recipe, dtype or calibration); "
                                  "pass --overwrite instead of --resume to start over")
        for torn in work.glob("*.tmp"):  # a write the killed process did not finish
            torn.unlink()

    windows = calibration_windows(recipe, tokenizer, calib, samples, seq_len) if recipe.needs_calibration else None
    cal = recipe.calibration
    gram_dtype = getattr(torch, cal.gram_dtype)
    shapes = target_shapes(model, method)
    created, landing = not work.exists(), False
    try:
        work.mkdir(parents=True, exist_ok=True)
        if progress is None:
            progress = {"identity": identity, "done": 0, "specs": {}}
            _write_json_atomic(progress, work / PROGRESS)
        specs = progress["specs"]

        def sink(i, layer):
            prefix = f"{models.layer_prefix(model, i)}."
            _save_atomic({prefix + k: v for k, v in layer.state_dict().items()}, work / _shard_name(i, total))
            progress["done"] = i + 1
            _write_json_atomic(progress, work / PROGRESS)
            if _after_layer is not None:
                _after_layer(i)

        # The one driver, with layers from the shards; a resumed run plans the same ranks again
        # (the same spectra of the same source) and replays its finished layers.
        source = ShardLayers(model, ckpt, torch_dtype, sink, progress["done"], lambda i: _load_finished(model, work, i, specs, torch_dtype, dev))
        driver.run(model, recipe.stages, dev, windows, cal.batch_size, gram_dtype, layers=source, specs=specs)
        ranks = method.ranks

        # Everything outside the decoder layers, as the checkpoint has it, in the last shard.
        layer_prefix = models.arch_for(model).layers + "."
        outside = {n: p for n, p in model.state_dict().items() if not n.startswith(layer_prefix)}
        kept, seen = {}, set()
        for n, t in outside.items():
            if t.data_ptr() in seen:
                continue  # a tied weight is stored once, as save_pretrained does
            seen.add(t.data_ptr())
            kept[n] = t
        _save_atomic(kept, work / _shard_name(total - 1, total))
        weight_map, size, params_after = {}, 0, 0
        for i in range(total):
            with safe_open(work / _shard_name(i, total), framework="pt") as f:
                for k in f.keys():
                    weight_map[k] = _shard_name(i, total)
                    t = f.get_slice(k)
                    size += _nbytes(t.get_shape(), t.get_dtype())
                    params_after += _nbytes(t.get_shape(), "U8") if t.get_dtype() not in ("I64", "I32") else 0
        _write_json_atomic({"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}, work / "model.safetensors.index.json")

        linear_before = sum(s[0] * s[1] for s in shapes.values())
        linear_after = sum(s[0] * s[1] if ranks[n] is None else specs[n]["rank"] * (s[0] + s[1]) + method.extra_params(s) for n, s in shapes.items())
        record = {"method": method.name, "recipe": recipe.to_dict(), "target_ratio": getattr(method.config, "ratio", None)}
        config = model.config
        base = checkpoint.base_class(config)
        config.compression = {"format_version": checkpoint.FORMAT_VERSION, **record, "modules": dict(sorted(specs.items()))}
        config.auto_map = {"AutoModelForCausalLM": f"{checkpoint.SHIM_NAME}.CompressedForCausalLM"}
        config.save_pretrained(work)
        if tokenizer is not None:
            tokenizer.save_pretrained(work)
        (work / f"{checkpoint.SHIM_NAME}.py").write_text(checkpoint.shim_source(base.__name__))
        report = {
            **record,
            "streamed": True,
            "params_before": ckpt.params(),
            "params_after": params_after,
            "achieved_linear_ratio": 1.0 - linear_after / linear_before,
            "linear_params_before": linear_before,
            "linear_params_after": linear_after,
            "per_module": {n: ranks[n] if ranks[n] is not None else "dense" for n in sorted(shapes)},
            "calibration": None if windows is None else {"dataset": calib or cal.dataset, "samples": windows.shape[0], "seq_len": windows.shape[1]},
            "device": str(dev),
            "device_name": device_name(dev),
            "versions": versions(),
        }
        (work / "compression_report.json").write_text(json.dumps(report, indent=2) + "\n")
        (work / PROGRESS).unlink()
        landing = True
        files.land(work, out, overwrite)
    except BaseException as exc:
        done = (progress or {}).get("done", 0)
        if landing and files.landed(work, out):  # the signal came after the final rename
            note = f"{out} was written completely before the interruption"
        elif done == 0 and created:
            shutil.rmtree(work, ignore_errors=True)  # nothing finished: leave nothing behind
            note = f"nothing was kept ({work} removed)"
        else:
            note = f"{work} keeps {done} of {total - 1} finished layers: rerun with --resume to continue, or --overwrite to start over"
        noted = _with_note(exc, note, work)
        if noted is exc:
            raise
        raise noted from exc

    report["wall_seconds"] = round(time.time() - started, 3)
    return driver.Result(None, tokenizer, report, out)


def _read_progress(work: Path, total: int) -> dict:
    """The progress file of an unfinished run, checked: readable, and naming shards that are there."""
    path = work / PROGRESS
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
        done, _ = progress["done"], progress["specs"]
        progress["identity"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CompressorError(f"{path} is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}); "
                              "pass --overwrite instead of --resume to start over") from None
    if not isinstance(done, int) or not 0 <= done < total:
        raise CompressorError(f"{path} is damaged (done: {done!r}); pass --overwrite instead of --resume to start over")
    for i in range(done):
        shard = work / _shard_name(i, total)
        try:
            with safe_open(shard, framework="pt") as f:
                list(f.keys())  # the header, checked against the file's size
        except (OSError, SafetensorError) as e:
            why = "missing" if not shard.exists() else f"corrupt ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
            raise CompressorError(f"{shard}, a finished layer of the unfinished run, is {why}; pass --overwrite instead of --resume to start over") from None
    return progress


def _with_note(exc: BaseException, kept: str, work: Path) -> BaseException:
    """The failure of a streamed run, saying what was kept of the partial folder and how to go on."""
    if isinstance(exc, Interrupted):
        exc.hint = kept
        return exc
    if isinstance(exc, CompressorError):
        return type(exc)(f"{exc}; {kept}")
    fault = environment_fault(exc, f"writing {work}")
    if fault is not None:
        return EnvironmentFault(f"{fault}; {kept}")
    return exc  # an internal error: the CLI reports it as such


def _nbytes(shape, dtype: str) -> int:
    size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}[dtype]
    n = 1
    for d in shape:
        n *= d
    return n * size
