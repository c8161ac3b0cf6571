"""Where a compression's result goes: a folder written once at the end, or shards written layer by
layer with a resume journal (--stream). Both end in the same export (export/checkpoint.py: declare,
write_declared), so a streamed folder holds what the in-memory run writes.

Resume. Every finished layer is written atomically (temporary name, then rename) and only then
recorded in `progress.json`, with the specs of its compressed linears, its float adapters (kept
beside it until the end, when they become the PEFT folder) and what each stage keeps of it for its
report and its end-of-walk decisions (Method.layer_state). So after a kill the partial folder always
describes a prefix of finished layers. A resumed run does not trust activations saved from the dead
process (there are none): it replays the forward pass of the finished layers, read back from their
shards, to regenerate the calibration inputs of the first unfinished layer. The replay computes what
the uninterrupted run computed (the same stored weights, inputs and kernels), so the output is
byte-identical; it costs forward passes only. Nothing written depends on wall-clock time.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from compressor import files, models
from compressor.errors import CompressorError, EnvironmentFault, Interrupted, environment_fault
from compressor.export import checkpoint
from compressor.export.peft import adapted
from compressor.modules import LoraAdapted, ModuleSpec, specs_from_json
from compressor.pipeline.sources import load_finished

PROGRESS = "progress.json"


class FolderSink:
    """The whole model written to `out` at the end, atomically (export/checkpoint.py: save)."""

    streamed = False
    write = True  # the one process that has a folder sink writes (a streamed sink may only read)

    def __init__(self, out, overwrite: bool = False):
        self.out, self.overwrite = Path(out), overwrite

    def begin(self, identity: dict, model, stages) -> tuple[int, dict]:
        return 0, {}

    def layer_writer(self):
        return None

    def replayer(self, model, specs, device):
        return None

    def finish(self, model, tokenizer, specs: dict, record: dict, report: dict, extra: dict) -> Path:
        checkpoint.save(model, tokenizer, self.out, specs, record, report, overwrite=self.overwrite, extra=extra)
        return self.out

    def failed(self, exc: BaseException) -> BaseException:
        return exc


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def _side_name(index: int) -> str:
    """Per finished layer: its float adapters and its stages' tensors, kept until the end."""
    return f"layer-{index + 1:05d}.state.safetensors"


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None = None) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CompressorError(f"tensor {name} holds NaN or Inf values, so the output would be broken; check the source checkpoint")
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    files.write_atomic(path, lambda tmp: save_file(cpu, tmp, metadata={"format": "pt"}), suffix=".safetensors.tmp")


def _write_json_atomic(obj, path: Path) -> None:
    files.write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json) + "\n")


def _json(value):
    if isinstance(value, ModuleSpec):
        return value.to_json()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class ShardSink:
    """Finished layers written one by one into `.OUT.partial`, renamed to OUT at the end."""

    streamed = True

    def __init__(self, out, overwrite: bool = False, resume: bool = False, after_layer=None, write: bool = True):
        self.out, self.overwrite, self.resume = Path(out), overwrite, resume
        self.work = self.out.with_name(f".{self.out.name}.partial")
        self.after_layer = after_layer  # tests: called after layer i is durably written
        self.write = write  # False on the non-primary ranks of a distributed run: they only read
        self.progress: dict | None = None
        self.created = False

    # --- before the walk

    def begin(self, identity: dict, model, stages) -> tuple[int, dict]:
        """(layers finished by an earlier run, their specs); stages get their finished layers' state
        back. Everything that can be refused is refused before the partial folder is created."""
        self.model, self.stages, self.dtype = model, stages, identity.get("dtype")
        self.total = len(models.decoder_layers(model)) + 1
        work = self.work
        if self.write and work.exists() and not self.resume:
            if not self.overwrite:
                raise CompressorError(f"{work} holds an unfinished run of this -o; pass --resume to continue it, or --overwrite to discard it and start over")
            shutil.rmtree(work)
        progress = self._read_progress() if work.exists() and (work / PROGRESS).is_file() else None
        if progress is not None and progress["identity"] != identity:
            raise CompressorError(f"{work} was started with other settings (source or its weights, recipe, dtype or calibration); "
                                  "pass --overwrite instead of --resume to start over")
        if self.write:
            if work.exists():
                for torn in work.glob("*.tmp"):  # a write the killed process did not finish
                    torn.unlink()
            self.created = not work.exists()
            work.mkdir(parents=True, exist_ok=True)
            if progress is None:
                progress = {"identity": identity, "done": 0, "specs": {}, "layers": {}}
                _write_json_atomic(progress, work / PROGRESS)
        elif progress is None:
            progress = {"identity": identity, "done": 0, "specs": {}, "layers": {}}
        self.progress = progress
        for i in range(progress["done"]):
            self._restore(i, progress["layers"].get(str(i), {}))
        return progress["done"], progress["specs"]

    def _restore(self, index: int, record: dict) -> None:
        side = self.work / _side_name(index)
        tensors = load_file(str(side)) if side.is_file() else {}
        for stage in self.stages:
            state = record.get("stages", {}).get(stage.name)
            if state is not None:
                own = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"stage:{stage.name}.")}
                stage.load_layer_state(index, state, own)

    # --- the walk

    def layer_writer(self):
        return self._layer

    def _layer(self, index: int, layer, visited: bool = True) -> dict:
        """Write a finished layer (visited: the stages just finished it; False: an earlier run did,
        and it was only replayed): its weights (float adapters unwrapped) as its own shard, the
        adapters and the stages' state beside it, then the journal. Returns the float adapters'
        factors as real modules, which stay in the skeleton for the final adapter folder."""
        prefix = f"{models.layer_prefix(self.model, index)}."
        found = adapted(layer, peft_only=True)
        kept = {}
        for name, wrapper in found.items():
            for part in ("lora_A", "lora_B"):
                kept[f"{name}.{part}"] = copy.deepcopy(getattr(wrapper, part)).to("cpu")
        if not visited:
            return kept
        record = {"adapters": {name: wrapper.lora_A.out_features for name, wrapper in found.items()}, "stages": {}}
        side = {f"adapter:{path}": module.weight for path, module in kept.items()}
        for stage in self.stages:
            state = stage.layer_state(index)
            if state is None:
                continue
            tensors = state.pop("tensors", {}) if isinstance(state, dict) else {}
            record["stages"][stage.name] = state
            side.update({f"stage:{stage.name}.{k}": v for k, v in tensors.items()})
        if self.write:
            stored = copy.deepcopy(layer).to("cpu")
            if self.dtype != "float32":
                stored.to(getattr(torch, self.dtype))
            for name in found:
                stored.set_submodule(name, stored.get_submodule(name).base)
            _save_atomic({prefix + k: v for k, v in stored.state_dict().items()}, self.work / shard_name(index, self.total))
            del stored
            if side:
                _save_atomic(side, self.work / _side_name(index))
            self.progress["done"] = index + 1  # its "specs" is the run's own dict, filled as layers finish
            self.progress["layers"][str(index)] = record
            _write_json_atomic(self.progress, self.work / PROGRESS)
        if self.after_layer is not None:
            self.after_layer(index)
        return kept

    def replayer(self, model, specs: dict, device):
        """Reads a finished layer back, its float adapters around it, for its forward pass."""

        def replay(index: int, dev) -> torch.nn.Module:
            layer = load_finished(model, self.work / shard_name(index, self.total), index, specs, dev)
            record = self.progress["layers"].get(str(index), {})
            side = self.work / _side_name(index)
            if record.get("adapters"):
                tensors = load_file(str(side))
                for name in record["adapters"]:
                    A, B = (tensors[f"adapter:{name}.lora_{k}"] for k in "AB")
                    base = layer.get_submodule(name)
                    layer.set_submodule(name, LoraAdapted.from_factors(base, B.to(dev), A.to(dev), dev, torch.float32))
            return layer

        return replay

    # --- after the walk

    def finish(self, model, tokenizer, specs: dict, record: dict, report: dict, extra: dict) -> Path:
        work, total = self.work, self.total
        model.to(getattr(torch, self.dtype))  # the meta layers change dtype only; the outside parts and kept adapters as stored
        declared = checkpoint.declare(model, dict(sorted(specs.items())), record, extra)

        def write_weights(folder: Path) -> None:
            # Everything outside the decoder layers, as the checkpoint has it, in the last shard.
            layer_prefix = models.arch_for(model).layers + "."
            outside, seen = {}, set()
            for n, t in model.state_dict().items():
                if n.startswith(layer_prefix) or t.data_ptr() in seen:
                    continue  # a tied weight is stored once, as save_pretrained does
                seen.add(t.data_ptr())
                outside[n] = t
            _save_atomic(outside, folder / shard_name(total - 1, total))
            weight_map, size = {}, 0
            for i in range(total):
                with safe_open(folder / shard_name(i, total), framework="pt") as f:
                    for k in f.keys():
                        weight_map[k] = shard_name(i, total)
                        t = f.get_slice(k)
                        size += _nbytes(t.get_shape(), t.get_dtype())
            _write_json_atomic({"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}, folder / "model.safetensors.index.json")
            model.config.save_pretrained(folder)
            if model.can_generate() and getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(folder)  # as save_pretrained does

        # Nothing written depends on wall-clock time, so a resumed run's folder equals an uninterrupted
        # one's byte for byte; the time is in the report the run returns.
        stored = {k: v for k, v in report.items() if k != "wall_seconds"}
        checkpoint.write_declared(work, model, declared, tokenizer, stored, write_weights)
        for i in range(total - 1):
            (work / _side_name(i)).unlink(missing_ok=True)
        (work / PROGRESS).unlink()
        self.landing = True
        files.land(work, self.out, self.overwrite)
        return self.out

    def failed(self, exc: BaseException) -> BaseException:
        """The failure of a streamed run, saying what was kept of the partial folder and how to go on."""
        if not self.write:
            return exc
        work = self.work
        done = (self.progress or {}).get("done", 0)
        if getattr(self, "landing", False) and files.landed(work, self.out):  # the signal came after the final rename
            kept = f"{self.out} was written completely before the interruption"
        elif done == 0 and self.created:
            shutil.rmtree(work, ignore_errors=True)  # nothing finished: leave nothing behind
            kept = f"nothing was kept ({work} removed)"
        else:
            kept = f"{work} keeps {done} of {self.total - 1} finished layers: rerun with --resume to continue, or --overwrite to start over"
        if isinstance(exc, Interrupted):
            exc.hint = kept
            return exc
        if isinstance(exc, CompressorError):
            return type(exc)(f"{exc}; {kept}")
        fault = environment_fault(exc, f"writing {work}")
        if fault is not None:
            return EnvironmentFault(f"{fault}; {kept}")
        return exc  # an internal error: the CLI reports it as such

    def _read_progress(self) -> dict:
        """The journal of an unfinished run, checked: readable, and naming shards that are there."""
        path, total = self.work / PROGRESS, self.total
        try:
            progress = json.loads(path.read_text(encoding="utf-8"))
            done, _ = progress["done"], progress["layers"]
            progress["specs"] = specs_from_json(progress["specs"])
            progress["identity"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CompressorError(f"{path} is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}); "
                                  "pass --overwrite instead of --resume to start over") from None
        if not isinstance(done, int) or not 0 <= done < total:
            raise CompressorError(f"{path} is damaged (done: {done!r}); pass --overwrite instead of --resume to start over")
        for i in range(done):
            for shard in (self.work / shard_name(i, total), self.work / _side_name(i)):
                if shard.name == _side_name(i) and not shard.exists():
                    continue  # a layer with nothing kept beside it
                try:
                    with safe_open(shard, framework="pt") as f:
                        list(f.keys())  # the header, checked against the file's size
                except (OSError, SafetensorError) as e:
                    why = "missing" if not shard.exists() else f"corrupt ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
                    raise CompressorError(f"{shard}, a finished layer of the unfinished run, is {why}; "
                                          "pass --overwrite instead of --resume to start over") from None
        return progress


def _nbytes(shape, dtype: str) -> int:
    size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}[dtype]
    n = 1
    for d in shape:
        n *= d
    return n * size
