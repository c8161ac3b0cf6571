"""Size against quality: the `target` recipe at several budgets beside shipped recipes, measured.

`compressor analyze MODEL --target-size 0.7x,0.8x --against gptq4 --plots DIR` (or target_curve
here) compresses the model once per budget with the shipped `target` recipe (what `compress
--target-size` runs) and once with each recipe of `against`, each into a temporary folder that is
deleted once measured. For every output, and the dense model, it measures code perplexity and
counts what the folder stores: the bytes of the decoder linears (codes, scales, zeros, g_idx,
bias, adapter factors) per dense decoder-linear weight, the quantity a `--target-bits` budget
bounds, and the bytes of every safetensors file, what a `--target-size` budget bounds
(compressor/export/accounting.py). Each target row is then set against the best `against` row that
fits the same budget: the Pareto verdict (pareto()). DIR gets curve.png and curve.json.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from pathlib import Path

import torch

from compressor import files, progress
from compressor import recipe as recipes
from compressor.api import compress, preflight
from compressor.environment import resolve_device
from compressor.errors import CompressorError
from compressor.eval import plots
from compressor.eval.tasks import run_tasks
from compressor.export import accounting
from compressor.loading import DTYPES, load_model, source_dtype
from compressor.methods.allocate.budget import size_text

TASK = "code_ppl"
AGAINST = ("gptq4",)  # the shipped uniform recipe at the target recipe's default budget (4.25 bits)
log = progress.log  # shown by the CLI without -v: a curve takes minutes per row


def split_list(value: str, option: str) -> list[str]:
    """A comma-separated option value as its items; an empty list is an error naming the option."""
    items = [v.strip() for v in str(value).split(",") if v.strip()]
    if not items:
        raise CompressorError(f"{option} takes a comma-separated list, e.g. {option} {'0.7x,0.8x' if 'size' in option else '3.5,4'}; got {value!r}")
    return items


def parse_bits(value: str) -> list[float]:
    """--target-bits 3.5,4 as numbers (their range is checked where the recipe takes them)."""
    found = []
    for item in split_list(value, "--target-bits"):
        try:
            found.append(float(item))
        except ValueError:
            raise CompressorError(f"--target-bits takes comma-separated numbers of bits per weight such as 3.5,4; got {item!r}") from None
    return found


def budgets_of(target_sizes=(), target_bits=()) -> list[dict]:
    """Each budget as the keyword compress takes ({"target_size": "0.75x"} or {"target_bits": 3.5}),
    checked (recipe.budget_override and the allocate stage's own validation) before any work."""
    budgets = [{"target_size": s} for s in target_sizes] + [{"target_bits": float(b)} for b in target_bits]
    if not budgets:
        raise CompressorError("a curve needs budgets: pass --target-size (e.g. 0.7x,0.8x) and/or --target-bits (e.g. 3.5,4)")
    labels = [label(b) for b in budgets]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise CompressorError(f"budget {twice[0]!r} is given twice; list each budget once")
    for b in budgets:
        recipes.load(recipes.BUDGET_RECIPE, budget=recipes.budget_override(**b))  # a malformed size or bits fails here, naming the key
    return budgets


def label(budget: dict) -> str:
    return f"target {budget['target_size']}" if "target_size" in budget else f"target {budget['target_bits']:g} bits"


def pareto(rows: list[dict]) -> list[dict]:
    """Each target row against the best (lowest perplexity) `against` row that fits its budget: a
    --target-bits B budget fits rows storing at most B bits per decoder-linear weight, a
    --target-size one rows whose files take at most its bytes. verdict: "better or equal",
    "worse", or "no recipe fits" (then against is None)."""
    others = [r for r in rows if r["kind"] == "recipe"]
    found = []
    for t in (r for r in rows if r["kind"] == "target"):
        if "target_bits" in t["budget"]:
            fits = [u for u in others if u["stored_bits"] <= t["budget"]["target_bits"]]
        else:
            fits = [u for u in others if u["size_bytes"] <= t["budget_bytes"]]
        best = min(fits, key=lambda u: u[TASK], default=None)
        verdict = "no recipe fits" if best is None else "better or equal" if t[TASK] <= best[TASK] else "worse"
        found.append({"row": t["row"], TASK: t[TASK], "against": best and best["row"], f"against_{TASK}": best and best[TASK], "verdict": verdict})
    return found


def target_curve(model, target_sizes=(), target_bits=(), against=AGAINST, *, tokenizer=None, eval_limit: int | None = 8,
                 eval_seq_len: int = 512, device: str = "auto", dtype: str = "auto", calib: str | None = None, samples: int | None = None,
                 seq_len: int | None = None, out_dir: str | Path | None = None) -> dict:
    """Measure the size-quality curve of `model` (a path, hub id, GGUF file, 'demo', or a loaded
    model with its `tokenizer`); returns {"rows", "verdicts", ...} and writes curve.png and
    curve.json into `out_dir` when given.

    target_sizes: --target-size values ("700MB", "0.75x", "75%"); target_bits: --target-bits values
    (3.5). Each is one row compressed with the shipped `target` recipe at that budget. against:
    recipe names or YAML paths (e.g. "gptq4"), one row each, plus the dense model.

    Every recipe runs as shipped, with its own calibration settings (gptq4 calibrates on 64 windows
    where `target` uses 32), so a row is what `compress -r NAME` or `compress --target-size` would
    give; calib, samples and seq_len override every row alike, as they do for compress.
    Perplexity: code_ppl on the first `eval_limit` windows (None: all) of `eval_seq_len` tokens.
    dtype: the stored precision (auto: the source's); every model is evaluated in float32 holding
    the stored values, as compress's own --eval does.
    """
    budgets = budgets_of(target_sizes, target_bits)
    against = list(against)
    if len(set(against)) != len(against):
        raise CompressorError(f"--against names {sorted({a for a in against if against.count(a) > 1})[0]!r} twice; list each recipe once")
    checks = dict(samples=samples, seq_len=seq_len, eval_limit=eval_limit, eval_seq_len=eval_seq_len)
    # Everything that needs no weights is checked before the model loads (the recipes, the counts,
    # a window beyond the model's context), and the budgets before any compression below.
    planned = [(label(b), "target", preflight(model, None, **checks, **b), b) for b in budgets]
    planned += [(str(spec), "recipe", preflight(model, spec, **checks), {}) for spec in against]
    if out_dir is not None:
        files.check_output_dir(out_dir, "--plots")
        if not plots.available():
            raise CompressorError(plots.INSTALL_HINT)
    if dtype != "auto" and dtype not in DTYPES:
        raise CompressorError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)} or auto")
    name = str(model) if isinstance(model, (str, Path)) else type(model).__name__
    if isinstance(model, (str, Path)):
        stored = source_dtype(model) if dtype == "auto" else dtype
        dense, tokenizer = load_model(str(model), dtype="float32")
    else:
        stored = str(next(model.parameters()).dtype).removeprefix("torch.") if dtype == "auto" else dtype
        if tokenizer is None:
            raise CompressorError("a curve of an in-memory model needs its tokenizer (calibration and perplexity)")
        dense = copy.deepcopy(model)
    dense = dense.to(getattr(torch, stored)).float()  # the stored values, computed in float32
    for _, _, rec, _ in planned:
        for stage in rec.build():
            stage.check_model(dense, getattr(torch, stored))  # a budget this model cannot meet: refused now
    dev = resolve_device(device)
    linears = accounting.dense_linear_weights(dense)
    work = Path(tempfile.mkdtemp(prefix="compressor-curve-"))
    rows = []
    try:
        with progress.bar(len(planned) + 1, "size-quality curve", unit="row", interval=0) as bar:
            for row, kind, rec, budget in [("dense", "dense", None, {}), *planned]:
                log.info("size-quality curve: measuring %s", row)
                found = _measure(row, kind, rec, budget, dense, tokenizer, linears, work / f"row{len(rows)}", dev, stored,
                                 dict(calib=calib, samples=samples, seq_len=seq_len), eval_seq_len, eval_limit)
                rows.append(found)
                bar.set_postfix_str(f"{row}: ppl {found[TASK]:.4g}, {found['stored_bits']:.2f} bits, {size_text(found['size_bytes'])}")
                bar.update(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"model": name, "dtype": stored, "task": TASK, "eval": {"seq_len": eval_seq_len, "limit_windows": eval_limit},
              "dense_linear_weights": sum(linears.values()), "rows": rows, "verdicts": pareto(rows)}
    if out_dir is not None:
        out_dir = Path(out_dir)
        # The picture first: a failure there leaves neither file (each is written whole or not at all).
        result["files"] = [str(plots.curve(result, out_dir / "curve.png"))]
        result["files"].append(str(out_dir / "curve.json"))
        files.write_json(out_dir / "curve.json", result)
    return result


def _measure(row, kind, rec, budget, dense, tokenizer, linears, folder: Path, dev, stored: str, calib: dict, eval_seq_len, eval_limit) -> dict:
    """One row: compress a copy of `dense` into `folder` (or save dense itself), count the folder,
    evaluate, and delete the folder."""
    start = time.time()
    report = None
    if rec is None:
        model = dense
        dense.to(getattr(torch, stored)).save_pretrained(folder)  # exact: dense holds values of that dtype
        dense.float()
    else:
        spec = None if budget else row  # a target row: the shipped budget recipe, as `compress --target-size` runs it
        res = compress(copy.deepcopy(dense), spec, folder, tokenizer=tokenizer, device=str(dev), dtype=stored, **calib, **budget)
        model, report = res.model.float(), res.report
    seconds = round(time.time() - start, 1)
    bits, nbytes = accounting.folder_linear_bits(folder, linears)
    found = {"row": row, "kind": kind, "budget": budget, "stored_bits": round(bits, 4), "linear_bytes": nbytes,
             "size_bytes": accounting.weight_bytes(folder), "compress_seconds": 0.0 if rec is None else seconds}
    shutil.rmtree(folder, ignore_errors=True)
    t = time.time()
    try:
        found[TASK] = round(run_tasks(model.to(dev), tokenizer, [TASK], eval_seq_len, eval_limit, dev)[TASK]["ppl"], 4)
    finally:
        model.to("cpu")
    found["eval_seconds"] = round(time.time() - t, 1)
    if report is not None:
        found["calibration"] = report.get("calibration")
        if rec is not None and not budget:
            found["recipe"] = rec.to_dict()
        a = report.get("allocation")
        if a:
            found.update(budget_bytes=a["budget_bytes"], planned_linear_bits=a["linear_bits_per_weight"], counts=a["counts"],
                         estimated_loss_increase=a["estimated_loss_increase"], fell_back_to_uniform=a["fell_back_to_uniform"])
    return found


def lines(result: dict) -> list[str]:
    """The rows and verdicts as text (what the CLI prints)."""
    dense = next(r[TASK] for r in result["rows"] if r["kind"] == "dense")
    ev = result["eval"]
    out = [f"{result['model']} ({result['dtype']}): code perplexity on {ev['limit_windows'] or 'every'} window(s) of {ev['seq_len']} tokens",
           f"{'row':<28} {'bits/weight':>11} {'size':>12} {'code ppl':>10} {'vs dense':>9}"]
    for r in sorted(result["rows"], key=lambda r: (r["kind"] != "dense", r["size_bytes"])):
        change = f"{(r[TASK] / dense - 1) * 100:+.1f}%" if r["kind"] != "dense" and dense else ""
        out.append(f"{r['row']:<28} {r['stored_bits']:>11.3f} {size_text(r['size_bytes']):>12} {r[TASK]:>10.4f} {change:>9}")
    for v in result["verdicts"]:
        if v["against"] is None:
            out.append(f"{v['row']}: no recipe of --against fits its budget")
        else:
            out.append(f"{v['row']} (ppl {v[TASK]:.4f}) against {v['against']} (ppl {v['against_' + TASK]:.4f}), the best that fits: {v['verdict']}")
    return out + [f"wrote {p}" for p in result.get("files", [])]
