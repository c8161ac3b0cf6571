"""Data-parallel compression on CPU: 1 process against --nproc N (docs/guides/distributed.md).

Runs `python -m compressor compress MODEL -r RECIPE ...` as a user does, once per recipe and process
count, and records per run: wall time of the whole command (start-up and model loading included:
every rank loads the model), the compression report's own wall_seconds (from after argument checks
to before writing), the peak resident memory of the largest process (ru_maxrss of the children:
the launcher or one rank), and how far the output is from the one-process output (the largest
difference of any linear's effective weight, up @ down for factorised ones, relative to that
matrix's largest entry; for GPTQ the share of 4-bit codes that differ) and the perplexity the
report measured after compression (--eval).

Each process count N gets cores / N threads per process (what --nproc sets), so on a 2-core
machine one process computes with 2 threads and each of 2 ranks with 1: the speed-up there is
whatever splitting the work beats the threads' own parallelism by.

    python benchmarks/bench_distributed.py                     # the demo model (Gemma 3 270M)
    python benchmarks/bench_distributed.py --model PATH --nproc 1,2,4 --samples 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from compressor.environment import device_name

RECIPES = ("whiten", "gptq4", "svd")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names or YAML paths")
    p.add_argument("--nproc", default="1,2", help="process counts to time (the first is the reference)")
    p.add_argument("--samples", type=int, default=32, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=128, help="calibration window length")
    p.add_argument("--eval-limit", type=int, default=4, help="code_ppl windows measured before and after compression (0: none)")
    p.add_argument("--eval-seq-len", type=int, default=128)
    p.add_argument("--out", default="benchmarks/results/distributed_cpu.json")
    return p.parse_args(argv)


def run(model, recipe, out: Path, nproc: int, args) -> dict:
    cmd = [sys.executable, "-m", "compressor", "compress", model, "-r", recipe, "-o", str(out), "--device", "cpu",
           "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    if args.eval_limit:
        cmd += ["--eval", "code_ppl", "--eval-limit", str(args.eval_limit), "--eval-seq-len", str(args.eval_seq_len)]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores() // nproc))}
    # ru_maxrss of RUSAGE_CHILDREN is the largest of the finished children: measure each run in its
    # own child (this script's earlier runs would otherwise set the floor).
    probe = ("import resource, subprocess, sys, json, time; t = time.perf_counter(); "
             "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(json.dumps({'rc': p.returncode, 'stderr': p.stderr[-2000:], 'seconds': time.perf_counter() - t, "
             "'peak_rss_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
    load = round(os.getloadavg()[0], 2)  # other jobs on the machine skew the times: recorded
    done = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, env=env)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    if found["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{found['stderr']}")
    report = json.loads((out / "compression_report.json").read_text())
    before, after = (((report.get("eval") or {}).get(k) or {}).get("code_ppl", {}).get("ppl") for k in ("before", "after"))
    return {"nproc": nproc, "threads_per_process": int(env["OMP_NUM_THREADS"]), "load_before": load, "load_after": round(os.getloadavg()[0], 2),
            "command_seconds": round(found["seconds"], 2),
            "compress_seconds": report["wall_seconds"], "peak_rss_mib": round(found["peak_rss_mib"]), "ppl_before": before, "ppl_after": after}


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def difference(ref: Path, out: Path) -> dict:
    """How far `out` is from the reference output."""
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    worst, flipped, codes = 0.0, 0, 0
    for key, x in a.items():
        y = b[key]
        if key.endswith(".down.weight"):
            continue
        if key.endswith(".up.weight"):
            stem = key[: -len(".up.weight")]
            x, y = x.double() @ a[f"{stem}.down.weight"].double(), y.double() @ b[f"{stem}.down.weight"].double()
        if key.endswith(".qweight"):
            unpack = lambda q: torch.stack([(q >> (4 * i)) & 15 for i in range(8)])  # noqa: E731
            flipped += int((unpack(x) != unpack(y)).sum())
            codes += unpack(x).numel()
        elif x.dtype.is_floating_point:
            worst = max(worst, float((x.double() - y.double()).abs().max() / x.double().abs().max().clamp_min(1e-30)))
        elif not torch.equal(x, y):
            worst = max(worst, float("inf"))
    return {"max_rel_weight_diff": worst, **({"code_flip_share": flipped / codes} if codes else {})}


def table(rows: list[dict]) -> str:
    head = "| recipe | processes | threads each | command s | speed-up | compress s | speed-up | peak RSS MiB | ppl after | max rel weight diff vs 1 |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        diff = r.get("max_rel_weight_diff")
        shown = "reference" if diff is None else f"{diff:.1e}" + (f", {r['code_flip_share']:.1e} of codes" if "code_flip_share" in r else "")
        ppl = "-" if r["ppl_after"] is None else f"{r['ppl_after']:.4f}"
        lines.append(f"| {r['recipe']} | {r['nproc']} | {r['threads_per_process']} | {r['command_seconds']:.1f} | {r['command_speedup']:.2f}x | "
                     f"{r['compress_seconds']:.1f} | {r['compress_speedup']:.2f}x | {r['peak_rss_mib']} | {ppl} | {shown} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    counts = [int(n) for n in args.nproc.split(",")]
    rows: list[dict] = []
    result = {
        "model": args.model, "samples": args.samples, "seq_len": args.seq_len, "eval_limit": args.eval_limit, "eval_seq_len": args.eval_seq_len,
        "cores": cores(), "cpu": device_name(torch.device("cpu")), "torch": torch.__version__,
        "command": " ".join(["python", "benchmarks/bench_distributed.py", *(argv if argv is not None else sys.argv[1:])]),
        "rows": rows, "complete": False,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        for recipe in args.recipes.split(","):
            ref = None
            for n in counts:
                out = Path(tmp) / f"{Path(recipe).stem}-{n}"
                print(f"{recipe}: {n} process(es) ...", file=sys.stderr, flush=True)
                row = {"recipe": recipe, **run(args.model, recipe, out, n, args)}
                if ref is None:
                    ref, base = out, row
                else:
                    row.update(difference(ref, out))
                row["command_speedup"] = round(base["command_seconds"] / row["command_seconds"], 3)
                row["compress_speedup"] = round(base["compress_seconds"] / row["compress_seconds"], 3)
                rows.append(row)
                path.write_text(json.dumps(result, indent=2) + "\n")  # after every run: a killed benchmark keeps what it measured
    result["complete"] = True
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
