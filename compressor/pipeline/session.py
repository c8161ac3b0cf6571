"""One compression run, from a layer source to a sink, through the one driver.

    source.open()                 the model (in memory, or a meta skeleton for --stream), tokenizer, dtype
    sink.begin(identity)          a resumed run gets its finished layers and their stages' state back
    driver.run(stages, layers)    fresh stages built from the recipe's configs; finished layers go to the sink
    report.build(stages)          common facts + each stage's own entries and summary lines
    sink.finish(declarations)     the export, declared by the stages (Method.export)

It names no method: what is method-specific comes from the stages.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from compressor import distributed, models
from compressor.calibration import driver
from compressor.calibration.windows import calibration_windows
from compressor.environment import resolve_device
from compressor.errors import CompressorError
from compressor.eval.tasks import run_tasks
from compressor.export import accounting
from compressor.linalg import check_finite
from compressor.ownership import source_identity
from compressor.pipeline import report as reports

log = logging.getLogger("compressor")


def _evaluate(model, tokenizer, tasks, seq_len, limit, device) -> dict:
    home = next(model.parameters()).device
    try:
        return run_tasks(model.to(device), tokenizer, tasks, seq_len, limit, device)
    finally:
        model.to(home)


class Session:
    """A recipe run from `source` to `sink` (None: nothing written)."""

    def __init__(self, recipe, source, sink=None, *, calib=None, samples=None, seq_len=None, device="auto", eval_tasks=None, eval_limit=None,
                 eval_seq_len=2048, identity: dict | None = None):
        self.recipe, self.source, self.sink = recipe, source, sink
        self.calib, self.samples, self.seq_len = calib, samples, seq_len
        self.device = device
        self.eval_tasks, self.eval_limit, self.eval_seq_len = eval_tasks, eval_limit, eval_seq_len
        self.identity = identity or {}

    def run(self) -> driver.Result:
        start = time.time()
        recipe = self.recipe
        dev = resolve_device(self.device)
        model, tokenizer, out_dtype = self.source.open()
        streamed = self.source.streamed
        if not streamed:
            for name, _, module in models.iter_linears(model):
                check_finite(f"weight {name}", models.weight_of(module).detach())
        before = {"params": models.count_params(model), "linear_params": accounting.linear_params(model)}
        evaluation = {}
        if self.eval_tasks:
            evaluation["before"] = _evaluate(model, tokenizer, self.eval_tasks, self.eval_seq_len, self.eval_limit, dev)

        windows = None
        if recipe.needs_calibration:
            if tokenizer is None:
                raise CompressorError(getattr(self.source, "tokenizer_error", None)
                                      or "this recipe needs calibration data, so a tokenizer must be passed with an in-memory model")
            windows = calibration_windows(recipe, tokenizer, self.calib, self.samples, self.seq_len)
        cal = recipe.calibration
        stages = recipe.build()  # fresh per run: a Recipe reused never carries one run's state into the next

        sink = self.sink
        finished, specs = 0, {}
        try:
            if sink is not None:
                finished, specs = self._begin(sink, model, stages, out_dtype)
            layers = self.source.layers(model, sink.layer_writer() if sink is not None else None, finished,
                                        sink.replayer(model, specs, dev) if sink is not None else None)
            # distributed: a data-free recipe's layers are split over the ranks, unless streamed
            # (a streamed layer lives on one rank's disk write; every rank then visits every layer).
            with distributed.layer_split(windows is None and not streamed):
                run = driver.run(model, stages, dev, windows, cal.batch_size, getattr(torch, cal.gram_dtype), cal.true_sequential,
                                 layers=layers, specs=specs, store_dtype=getattr(torch, out_dtype))
                distributed.gather_specs(model, run.specs, sync=bool(self.eval_tasks))
            specs = run.specs
            if not streamed:
                model.to(getattr(torch, out_dtype)).float()  # rounded as it will be stored (layers are already)
            if self.eval_tasks:
                evaluation["after"] = _evaluate(model, tokenizer, self.eval_tasks, self.eval_seq_len, self.eval_limit, dev)
            report = reports.build(recipe=recipe, stages=stages, model=model, specs=specs, before=before, out_dtype=out_dtype,
                                   source_bytes=self.source.source_bytes, windows=windows, calib=self.calib, evaluation=evaluation,
                                   device=dev, streamed=streamed)
            report.update(distributed.describe())  # {} in one process
            report["wall_seconds"] = round(time.time() - start, 3)
            extra = {}
            for stage in stages:
                extra.update(stage.export(model, specs))
            if not streamed:
                model.to(getattr(torch, out_dtype))
            distributed.barrier("the end of compression")  # distributed: rank 0 writes once every rank is done
            out = None
            if sink is not None and sink.write:
                record = {"method": report["method"], "recipe": report["recipe"], "target_ratio": report["target_ratio"], "dtype": out_dtype}
                out = sink.finish(model, tokenizer, specs, record, report, extra)
                report["output_bytes"] = accounting.weight_bytes(out)
                log.info("wrote %s", out)
        except BaseException as exc:
            if sink is None:
                raise
            noted = sink.failed(exc)
            if noted is exc:
                raise
            raise noted from exc
        return driver.Result(None if streamed else model, tokenizer, report, out)

    def _begin(self, sink, model, stages, out_dtype):
        identity = {**self.identity, "recipe": self.recipe.to_dict(), "dtype": out_dtype, "calib": self.calib, "samples": self.samples,
                    "seq_len": self.seq_len}
        if not distributed.active() or not sink.streamed:  # only a streamed run has a sink on every rank
            return sink.begin(identity, model, stages)
        # distributed: rank 0 prepares the partial folder (removes or resumes it) before the others read it
        found = sink.begin(identity, model, stages) if distributed.is_primary() else None
        distributed.barrier("the partial folder")
        return found if found is not None else sink.begin(identity, model, stages)


def stream_identity(source: str | Path) -> dict:
    """What a resumed streamed run must share with the run it continues, besides the recipe and
    calibration settings: the source it reads, and what it holds (weights replaced at the same path
    refuse --resume instead of being mixed in)."""
    return {"source": str(Path(source).resolve()), "weights": source_identity(source)}
