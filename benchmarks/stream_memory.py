"""Peak host memory of a streamed compression against the in-memory one, on the demo model.

Each run is its own process, and the peak is its VmHWM (the resident high-water mark) at the end,
minus nothing: both paths load the same libraries. `structured` and `gptq4-eora32` are the recipes
issue 26 names; gptq4-eora32 weighs its adapters by the loss gradient (a backward pass through the
whole model), which a streamed run cannot do, so both of its runs use the same recipe with
`weighting: output` (gptq4-eora32-output below) and the table says so.

    python benchmarks/stream_memory.py                       # demo, 16 x 256 calibration tokens
    python benchmarks/stream_memory.py --samples 64 --seq-len 512 --recipes structured

Prints a table and writes benchmarks/results/stream_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
_CHILD = textwrap.dedent(
    """
    import json, sys, time, torch
    from compressor.api import compress

    def peak():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024

    model, recipe, out, samples, seq_len, stream = sys.argv[1:7]
    start = time.time()
    result = compress(model, recipe, out, samples=int(samples), seq_len=int(seq_len), device="cpu", stream=stream == "1")
    print(json.dumps({"peak_bytes": peak(), "seconds": round(time.time() - start, 1), "output_bytes": result.report.get("output_bytes")}))
    """
)


def _recipe_file(name: str, folder: Path) -> str:
    if name != "gptq4-eora32-output":
        return name
    from compressor.recipe import RECIPES_DIR

    data = yaml.safe_load((RECIPES_DIR / "gptq4-eora32.yaml").read_text())
    for stage in data["stages"]:
        if stage["method"] == "eora":
            stage["weighting"] = "output"
    path = folder / "gptq4-eora32-output.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--recipes", default="structured,gptq4-eora32-output")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default=str(HERE / "results" / "stream_memory.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.recipes.split(","):
            recipe = _recipe_file(name, tmp)
            row = {"recipe": name}
            for stream in (False, True):
                out = tmp / f"{name}-{int(stream)}"
                print(f"{name}: {'streamed' if stream else 'in memory'} ...", file=sys.stderr, flush=True)
                done = subprocess.run([sys.executable, "-c", _CHILD, args.model, recipe, str(out), str(args.samples), str(args.seq_len), str(int(stream))],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"{name} (stream={stream}) failed:\n{done.stderr[-3000:]}")
                row["stream" if stream else "memory"] = json.loads(done.stdout.strip().splitlines()[-1])
            row["peak_ratio"] = round(row["stream"]["peak_bytes"] / row["memory"]["peak_bytes"], 3)
            rows.append(row)
    print(f"{'recipe':<22} {'in-memory peak MB':>18} {'streamed peak MB':>17} {'ratio':>6} {'s (mem / stream)':>17}")
    for r in rows:
        m, s = r["memory"], r["stream"]
        peaks = f"{m['peak_bytes'] / 1e6:>18,.0f} {s['peak_bytes'] / 1e6:>17,.0f} {r['peak_ratio']:>6.2f}"
        print(f"{r['recipe']:<22} {peaks} {m['seconds']:>8.0f} / {s['seconds']:<7.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "samples": args.samples, "seq_len": args.seq_len, "measured": time.strftime("%Y-%m-%d"),
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
