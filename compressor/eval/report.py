"""Compare a dense model with compressed ones: one table (markdown + JSON) of size, parameters, metrics.

Each entry is either a results file written by `compressor eval -o` (reused as is) or a model spec,
which is evaluated here. The first entry is the reference every change is measured against.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

from compressor.errors import CompressorError
from compressor.eval.runner import evaluate_model
from compressor.eval.tasks import check_tasks
from compressor.files import write_atomic, write_json

# Metrics where a smaller number is the better model.
LOWER_IS_BETTER = {"ppl", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}
# Numbers in a task's result that describe the run, not the model's quality.
_NOT_METRICS = {"windows", "seq_len", "tokens", "n_problems", "n_samples", "seconds", "wall_seconds"}


def metrics_of(task: str, result: dict) -> dict[str, float]:
    out = {}
    for key, value in result.items():
        if key in _NOT_METRICS or "stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[key] = float(value)
    return out


def protocol_of(result: dict) -> dict:
    """What must match across models for a task's numbers to be comparable."""
    keys = ("windows", "seq_len", "n_problems", "n_samples")
    proto = {k: result[k] for k in keys if k in result}
    gen = result.get("generation")
    if isinstance(gen, dict):
        proto.update({k: gen.get(k) for k in ("max_new_tokens", "do_sample", "temperature")})
    return proto


def load_results(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompressorError(f"cannot read results file {path} ({e}); pass a file written by `compressor eval -o`") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise CompressorError(f"{path} is not a results file of `compressor eval -o` (no 'tasks' mapping)")
    return data


def is_results_file(spec: str) -> bool:
    return str(spec).lower().endswith(".json") and Path(spec).is_file()


def gather(specs: list[str], tasks: list[str] | None, **eval_options) -> list[dict]:
    """Results for every spec: a results file is read, anything else is evaluated on `tasks`."""
    if len(specs) < 2:
        raise CompressorError("compare needs the dense model and at least one compressed model")
    for spec in specs:
        if str(spec).lower().endswith(".json") and not Path(spec).is_file():
            raise CompressorError(f"results file {spec} does not exist; check the path")
    to_evaluate = [s for s in specs if not is_results_file(s)]
    if to_evaluate:
        if not tasks:
            raise CompressorError(f"{to_evaluate[0]} is a model, not a results file, so --tasks must name what to evaluate")
        check_tasks(tasks)
    out = []
    for spec in specs:
        if is_results_file(spec):
            out.append(load_results(spec))
        else:
            out.append(evaluate_model(str(spec), tasks, **eval_options))
            gc.collect()  # one model in memory at a time
    return out


def _label(results: dict, seen: set) -> str:
    model = str(results.get("model", "model"))
    label = Path(model).name or model
    base, i = label, 2
    while label in seen:
        label, i = f"{base} ({i})", i + 1
    seen.add(label)
    return label


def compare(results: list[dict], labels: list[str] | None = None) -> dict:
    """The comparison as data: rows (the first is the reference), metric columns, changes, warnings."""
    if len(results) < 2:
        raise CompressorError("compare needs the dense model and at least one compressed model")
    seen: set = set()
    labels = labels or [_label(r, seen) for r in results]
    columns, warnings = [], []
    for res in results:
        for task, task_result in res["tasks"].items():
            for metric in metrics_of(task, task_result):
                key = f"{task}/{metric}"
                if all(c["key"] != key for c in columns):
                    label = task if metric == "ppl" else f"{task} {metric}"
                    columns.append({"key": key, "task": task, "metric": metric, "label": label, "lower_is_better": metric in LOWER_IS_BETTER})
    for task in dict.fromkeys(t for r in results for t in r["tasks"]):
        protos = {json.dumps(protocol_of(r["tasks"][task]), sort_keys=True) for r in results if task in r["tasks"]}
        if len(protos) > 1:
            warnings.append(f"{task} was run with different settings across models ({'; '.join(sorted(protos))}); its numbers are not comparable")
        missing = [lab for lab, r in zip(labels, results) if task not in r["tasks"]]
        if missing:
            warnings.append(f"{task} is missing for {', '.join(missing)}")
    ref = results[0]
    rows = []
    for label, res in zip(labels, results):
        info = res.get("model_info") or {}
        row = {
            "label": label,
            "model": res.get("model"),
            "parameters": info.get("parameters"),
            "disk_bytes": info.get("disk_bytes"),
            "compression": info.get("compression"),
            "metrics": {c["key"]: metrics_of(c["task"], res["tasks"][c["task"]]).get(c["metric"]) for c in columns if c["task"] in res["tasks"]},
            "seconds": res.get("wall_seconds"),
        }
        rows.append(row)
    ref_row = rows[0]
    for row in rows:
        row["change"] = {
            "parameters": _relative(row["parameters"], ref_row["parameters"]),
            "disk_bytes": _relative(row["disk_bytes"], ref_row["disk_bytes"]),
        }
        for c in columns:
            value, base = row["metrics"].get(c["key"]), ref_row["metrics"].get(c["key"])
            # Perplexities change multiplicatively, rates and accuracies additively.
            row["change"][c["key"]] = _relative(value, base) if c["lower_is_better"] else _absolute(value, base)
    settings = {t: protocol_of(ref["tasks"][t]) for t in ref["tasks"]}
    return {"reference": labels[0], "rows": rows, "metrics": columns, "settings": settings, "warnings": warnings}


def _relative(value, base):
    if value is None or base in (None, 0):
        return None
    return value / base - 1.0


def _absolute(value, base):
    if value is None or base is None:
        return None
    return value - base


def _fmt_count(n) -> str:
    if n is None:
        return "–"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _fmt_change(change, relative: bool) -> str:
    if change is None:
        return ""
    if relative and change > 9:  # "+257922.8%" reads worse than a factor
        return f" (x{change + 1:,.0f})"
    return f" ({change:+.1%})" if relative else f" ({change:+.3f})"


def markdown(table: dict) -> str:
    cols = table["metrics"]
    head = ["model", "parameters", "size on disk"] + [c["label"] + (" ↓" if c["lower_is_better"] else " ↑") for c in cols] + ["eval time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for i, row in enumerate(table["rows"]):
        ch = row["change"] if i else {}
        cells = [
            row["label"] + (" (reference)" if i == 0 else ""),
            _fmt_count(row["parameters"]) + _fmt_change(ch.get("parameters"), True),
            ("–" if row["disk_bytes"] is None else f"{row['disk_bytes'] / 1e6:.1f} MB") + _fmt_change(ch.get("disk_bytes"), True),
        ]
        for c in cols:
            value = row["metrics"].get(c["key"])
            text = "–" if value is None else (f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}")
            cells.append(text + _fmt_change(ch.get(c["key"]), c["lower_is_better"]))
        cells.append("–" if row["seconds"] is None else f"{row['seconds']:.0f} s")
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", "↓ lower is better, ↑ higher is better. Changes against the reference: relative for perplexities, "
             "sizes and parameter counts; absolute for rates and accuracies."]
    for task, proto in table["settings"].items():
        if proto:
            notes.append(f"- {task}: " + ", ".join(f"{k} {v}" for k, v in proto.items()))
    for w in table["warnings"]:
        notes.append(f"- **warning**: {w}")
    return "\n".join(lines + notes) + "\n"


def write(table: dict, out: str | Path, results: list[dict] | None = None) -> tuple[Path, Path]:
    """`out` as markdown and the same stem with .json (the table plus every model's full results)."""
    out = Path(out)
    md_path = out if out.suffix.lower() == ".md" else out.with_suffix(".md")
    json_path = md_path.with_suffix(".json")
    payload = dict(table)
    if results is not None:
        payload["results"] = results
    write_json(json_path, payload)
    write_atomic(md_path, markdown(table))
    return md_path, json_path
