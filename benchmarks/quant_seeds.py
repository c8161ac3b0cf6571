"""Run benchmarks/quant.py over several calibration seeds, plain and adapted walks, then benchmarks/gap.py.

    python benchmarks/quant_seeds.py --seeds 0 1 2 3 4 --jobs 5 --device cuda --limit 0 \\
        --out-dir results-gpu -- --sequential --propagation 0.25 --refine 4

Everything after `--` goes to the adapted walk only. Both walks get --act-order --weighting loss
--ranks 32 (the shipped gptq4-eora32's settings), --device, --limit and --tasks, and any other
quant.py option given before `--` (e.g. --model, --samples).
Each seed's plain walk (GPTQ, and EoRA without --sequential) is what gap.py measures the adapted
walk against. --jobs runs walks side by side: on a GPU, GPTQ's column loop is bound by kernel
launches, so a few processes share one card well; on a CPU keep 1. Each walk's log is kept beside
its JSON; a failed walk is reported and the others go on. Only the first walk evaluates the dense
and RTN models (the others pass --no-reference), so keep it among the JSONs handed to gap.py.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    argv = sys.argv[1:]
    adapted = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--jobs", type=int, default=1, help="walks run side by side")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--limit", type=int, default=16, help="evaluation windows per task (0: every window)")
    ap.add_argument("--tasks", default="code_ppl,wikitext2_ppl")
    ap.add_argument("--out-dir", type=Path, required=True)
    args, both = ap.parse_known_args(argv[: argv.index("--")] if "--" in argv else argv)
    if not adapted:
        ap.error("pass the adapted walk's quant.py options after --, e.g. -- --sequential --propagation 0.25 --refine 4")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    common = ["--act-order", "--weighting", "loss", "--ranks", "32", "--device", args.device, "--limit", str(args.limit), "--tasks", args.tasks, *both]
    walks = [(f"{kind}_seed{s}", common + ["--seed", str(s)] + extra) for s in args.seeds for kind, extra in (("plain", []), ("adapted", adapted))]
    # dense and RTN do not depend on the seed: the first walk evaluates them for all
    walks = walks[:1] + [(name, options + ["--no-reference"]) for name, options in walks[1:]]

    def run(walk):
        name, options = walk
        out = args.out_dir / f"{name}.json"
        with open(args.out_dir / f"{name}.log", "w") as log:
            rc = subprocess.call([sys.executable, str(HERE / "quant.py"), *options, "--out", str(out)], stdout=log, stderr=subprocess.STDOUT)
        print(f"{name}: {'done' if rc == 0 else f'failed (exit {rc}), see {name}.log'}", flush=True)
        return out if rc == 0 or out.exists() else None

    with ThreadPoolExecutor(args.jobs) as pool:
        found = [p for p in pool.map(run, walks) if p is not None]
    if not found:
        sys.exit("no walk wrote results; see the logs in " + str(args.out_dir))
    for task in args.tasks.split(","):
        subprocess.call([sys.executable, str(HERE / "gap.py"), *map(str, found), "--task", task, "--json", str(args.out_dir / f"gap_{task}.json")])


if __name__ == "__main__":
    main()
