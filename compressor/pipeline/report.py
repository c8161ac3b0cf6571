"""compression_report.json: the facts every run has, then what each stage says of its own work.

Nothing here names a method: a stage's entries come from its `report`, and the lines the summary
prints about what was done come from its `summary_lines` (stored as "actions", so the summary and
any later reader need only the JSON).
"""

from __future__ import annotations

from compressor import models
from compressor.environment import device_name, versions
from compressor.export import accounting


def per_module(model, specs: dict) -> dict:
    """Per decoder linear: the rank of its factorisation, or "dense" (plain, narrowed or quantised)."""
    found = {}
    for name, _, _ in models.iter_linears_any(model):
        spec = specs.get(name)
        found[name] = spec.rank if spec is not None and spec.factorised else "dense"
    return found


def build(*, recipe, stages, model, specs: dict, before: dict, out_dtype: str, source_bytes, windows, calib, evaluation: dict,
          device, streamed: bool) -> dict:
    """The report of one run. before: {"params", "linear_params"} of the model as loaded."""
    linear_after = accounting.linear_params(model)
    entries, actions = {}, []
    for stage in stages:
        own = stage.report(model, specs)
        entries.update(own)
        actions += stage.summary_lines(model, specs, own)
    cal = recipe.calibration
    report = {
        "method": "+".join(s.name for s in stages),
        "recipe": recipe.to_dict(),
        "target_ratio": next((s.config.ratio for s in stages if hasattr(s.config, "ratio")), None),
        "achieved_linear_ratio": 1.0 - linear_after / before["linear_params"],
        "params_before": before["params"],
        "params_after": accounting.model_values(model),
        "linear_params_before": before["linear_params"],
        "linear_params_after": linear_after,
        "per_module": per_module(model, specs),
        "bits_per_dense_weight": accounting.bits_per_dense_weight(model),
        **entries,
        "actions": actions,
        "dtype": out_dtype,
        "source_bytes": source_bytes,
        "calibration": None if windows is None else {"dataset": calib or cal.dataset, "samples": windows.shape[0], "seq_len": windows.shape[1]},
        "eval": evaluation or None,
        "device": str(device),
        "device_name": device_name(device),
        "versions": versions(),
    }
    if streamed:
        report["streamed"] = True
    return report
