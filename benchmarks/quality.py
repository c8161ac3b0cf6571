"""Quality of each rank-reduction method on a real pretrained model: perplexity against reduction.

Rows are shipped recipes, columns are linear-parameter reductions; each cell holds code and
WikiText-2 perplexity (papers' protocol, see compressor/eval/perplexity.py) and the compression wall time.
Every cell starts from the same dense weights and is evaluated on the same windows, so the table
compares methods, not noise. Results are written after every cell so a long run that is stopped
keeps what it measured.

    python benchmarks/quality.py                       # Gemma 3 270M, all methods, 10-40 %
    python benchmarks/quality.py --methods svd,welore --ratios 0.2 --eval-limit 2   # a quick look
    python benchmarks/quality.py --ratios 0.3 --keep   # add missing cells to an earlier run's file
    python benchmarks/quality.py --methods structured,structured-budget,whiten,whiten-budget --speed \
        --out benchmarks/results/structured.json     # structured against whitened SVD, with tokens/s

Each cell also records its size in bfloat16 (`size_mb`: every stored tensor at 2 bytes, as a
bf16 export holds it) and, with --speed, prefill and decode tokens/s of the compressed model
(bench_compress.speed: a 512-token prompt, then greedy decode with the KV cache, batch 1).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from compressor.api import compress
from compressor.eval import tasks as eval_tasks
from compressor.loading import load_model

METHODS = "svd,welore,whiten,whiten-budget,lord,lord-weight,lost"
TASKS = ["code_ppl", "wikitext2_ppl"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="anything compressor.loading.load_model accepts")
    p.add_argument("--methods", default=METHODS, help="comma-separated shipped recipe names")
    p.add_argument("--ratios", default="0.1,0.2,0.3,0.4", help="comma-separated linear-parameter reductions")
    p.add_argument("--eval-limit", type=int, default=4, help="windows per perplexity task")
    p.add_argument("--eval-seq-len", type=int, default=2048)
    p.add_argument("--samples", type=int, default=None, help="calibration windows (default: the recipe's)")
    p.add_argument("--calib-seq-len", type=int, default=None, help="calibration window length (default: the recipe's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="benchmarks/results/quality.json")
    p.add_argument("--speed", action="store_true", help="also measure prefill and decode tokens/s of dense and every cell")
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument(
        "--keep",
        action="store_true",
        help="add to OUT instead of replacing it: its dense row is reused and cells it has are skipped "
        "(refused when OUT was measured with other evaluation or calibration settings)",
    )
    return p.parse_args(argv)


def _earlier(out: Path, result: dict) -> dict | None:
    """OUT's earlier results when they were measured the same way as this run, else an error."""
    if not out.is_file():
        return None
    old = json.loads(out.read_text())
    for key in ("model", "eval", "calibration"):
        if old.get(key) != result[key]:
            raise SystemExit(f"error: {out} was measured with {key}={old.get(key)}, this run has {result[key]}; drop --keep or use another --out")
    return old


def _ppl(model, tokenizer, args, device) -> dict:
    res = eval_tasks.run_tasks(model, tokenizer, TASKS, args.eval_seq_len, args.eval_limit, device)
    return {task: res[task]["ppl"] for task in TASKS}


def _size_mb(model) -> float:
    """Megabytes the model's tensors take at 2 bytes each (a bf16 export), tied weights once."""
    seen, n = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen and t.is_floating_point():
            seen.add(id(t))
            n += t.numel()
    return round(n * 2 / 1e6, 1)


def _speed(model, args, device) -> dict:
    from bench_compress import speed  # benchmarks/ is the script's folder, so on sys.path

    res = speed(model, model.config, device, args.prefill_len, 1, args.decode_tokens)
    return {k: round(v, 1) for k, v in res.items()}


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "inf"
    return f"{x:.2f}" if x < 1000 else f"{x:.3g}"


def table(result: dict) -> str:
    ratios = sorted(result["ratios"])
    dense = result["dense"]
    head = "| method | " + " | ".join(f"{int(r * 100)} %: code / wiki (s)" for r in ratios) + " |"
    lines = [head, "|---" * (len(ratios) + 1) + "|"]
    lines.append("| dense | " + " | ".join(f"{_fmt(dense['code_ppl'])} / {_fmt(dense['wikitext2_ppl'])}" for _ in ratios) + " |")
    for method, cells in result["cells"].items():
        row = []
        for r in ratios:
            c = cells.get(str(r))
            row.append("-" if c is None else f"{_fmt(c['code_ppl'])} / {_fmt(c['wikitext2_ppl'])} ({c['compress_seconds']:.0f})")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    ratios = [float(r) for r in args.ratios.split(",") if r]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    from compressor.environment import resolve_device

    device = resolve_device(args.device)
    t = time.time()
    base, tokenizer = load_model(args.model)
    base.eval()
    result = {
        "model": args.model,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "eval": {"tasks": TASKS, "limit": args.eval_limit, "seq_len": args.eval_seq_len},
        "calibration": {"samples": args.samples, "seq_len": args.calib_seq_len},
        "ratios": ratios,
        "load_seconds": round(time.time() - t, 1),
        "cells": {},
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
    }
    old = _earlier(out, result) if args.keep else None
    if old is not None:
        result["dense"], result["cells"] = old["dense"], old["cells"]
        result["ratios"] = sorted(set(old["ratios"]) | set(ratios))
        result["command"] = old["command"] + " ; " + result["command"]
    else:
        t = time.time()
        result["dense"] = _ppl(base.to(device), tokenizer, args, device)
        result["dense"]["eval_seconds"] = round(time.time() - t, 1)
        result["dense"]["size_mb"] = _size_mb(base)
        if args.speed:
            result["dense"].update(_speed(base, args, device))
        base.to("cpu")
    print(f"dense: {result['dense']}", flush=True)

    for method in methods:
        result["cells"].setdefault(method, {})
    # Ratio-major, so a run cut short still has every method at the ratios listed first.
    for ratio in ratios:
        for method in methods:
            if str(ratio) in result["cells"][method]:
                continue
            model = copy.deepcopy(base)
            t = time.time()
            res = compress(model, method, None, tokenizer=tokenizer, ratio=ratio, samples=args.samples, seq_len=args.calib_seq_len, device=args.device)
            seconds = time.time() - t
            t = time.time()
            cell = _ppl(res.model.to(device), tokenizer, args, device)
            cell.update(
                compress_seconds=round(seconds, 1),
                eval_seconds=round(time.time() - t, 1),
                achieved_linear_ratio=round(res.report["achieved_linear_ratio"], 4),
                params_after=res.report["params_after"],
                size_mb=_size_mb(res.model),
            )
            if args.speed:
                cell.update(_speed(res.model, args, device))
            result["cells"][method][str(ratio)] = cell
            print(f"{method} @ {ratio}: {cell}", flush=True)
            out.write_text(json.dumps(result, indent=1))
            del model, res
    out.write_text(json.dumps(result, indent=1))
    print()
    print(table(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
