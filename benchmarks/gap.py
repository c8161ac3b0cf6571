"""How much of plain GPTQ's perplexity gap to dense each adapted variant closes, per calibration seed.

    python benchmarks/gap.py benchmarks/results/quant_64x16_actorder_loss*.json [--task code_ppl]

Reads the JSONs benchmarks/quant.py writes. For each seed the reference is the plain GPTQ row of a
walk without --sequential on that seed (its base is exactly what the gptq stage alone gives); every
"+ EoRA" row of any walk on that seed is then scored as (plain - adapted) / (plain - dense). Only
results from the same model, evaluation windows, GPTQ settings, calibration size and machine are
compared (GPTQ's codes differ between devices); each such group prints its own table, with the mean
and standard error of the gap closed over the seeds a variant was run on. --json writes the same.

Where the dense, plain and adapted rows carry per-window losses (quant.py records them), each cell
also gets a 95 % interval from a paired bootstrap over the evaluation windows: how much the share
could move on other windows of the same text, with the calibration draw held fixed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections import defaultdict
from pathlib import Path


def group_key(data: dict) -> str:
    cal = {k: v for k, v in data["calibration"].items() if k not in ("seed", "true_sequential")}
    host = data.get("host", {})
    return json.dumps({"model": data["model"], "bits": data["bits"], "group_size": data["group_size"], "act_order": data.get("act_order", False),
                       "calibration": cal, "eval": data["eval"], "machine": host.get("device") or host.get("cpu")}, sort_keys=True)


def variant_label(data: dict, variant: str) -> str:
    """The adapter part of a row's name, plus the walk options the name leaves out."""
    label = variant.split(" + ", 1)[1]
    if data.get("eora_sequential") and not data.get("eora_propagation") and not data.get("eora_refine"):
        label += " [sequential]"
    if data["calibration"].get("true_sequential"):
        label += " [true-sequential]"
    return label


def collect(paths: list[Path], task: str) -> dict:
    """group -> {"dense": ppl, "plain": {seed: ppl}, "adapted": {label: {seed: (ppl, file)}}, "windows":
    {(kind, seed): per-window NLL}} (kind "dense", "plain" or a variant label; dense under seed None)."""
    groups = defaultdict(lambda: {"dense": None, "plain": {}, "adapted": defaultdict(dict), "windows": {}, "tokens": None})
    for path in paths:
        data = json.loads(path.read_text())
        if "rows" not in data or "calibration" not in data:
            continue
        g = groups[group_key(data)]
        seed = data["calibration"].get("seed", 0)  # the first results predate the option
        plain_walk = not data.get("eora_sequential") and not data["calibration"].get("true_sequential")
        for row in data["rows"]:
            ppl = row.get(task)
            if ppl is None:
                continue
            windows = row.get("window_nll", {}).get(task)
            if row["variant"] == "dense fp32":
                g["dense"] = ppl
                if windows:  # the dense model does not depend on the seed: any file's windows do
                    g["windows"][("dense", None)] = windows
                    # scored tokens per window, from the perplexity itself: the evaluation caps the
                    # window at the model's context, so the requested seq_len need not be it
                    g["tokens"] = round(sum(windows) / (len(windows) * math.log(ppl)))
            elif row["variant"].endswith("(ours)") and plain_walk and " + " not in row["variant"]:
                g["plain"][seed] = ppl
                if windows:
                    g["windows"][("plain", seed)] = windows
            elif " + EoRA" in row["variant"]:
                label = variant_label(data, row["variant"])
                if seed in g["adapted"][label] and g["adapted"][label][seed][0] != ppl:
                    print(f"note: {label}, seed {seed} differs between {g['adapted'][label][seed][1]} and {path.name}; keeping the first", file=sys.stderr)
                    continue
                g["adapted"][label].setdefault(seed, (ppl, path.name))
                if windows:
                    g["windows"].setdefault((label, seed), windows)
    return groups


def bootstrap(dense: list[float], pairs: list[tuple[list[float], list[float]]], tokens: int, draws: int = 2000) -> tuple[float, float] | None:
    """95 % interval of the mean over `pairs` (one (plain, adapted) per seed) of (plain - adapted) /
    (plain - dense) perplexity over window resamples: every draw scores all models on the same
    windows (paired), so windows that favour the adapters for every seed move the mean together.
    Entries are per-window summed NLL; tokens: scored tokens per window (all equal)."""
    n = len(dense)
    if n < 2 or not pairs or any(len(x) != n for pair in pairs for x in pair):
        return None
    rng = random.Random(0)

    def ppl(nll, idx):
        return math.exp(sum(nll[i] for i in idx) / (n * tokens))

    means = []
    for _ in range(draws):
        idx = [rng.randrange(n) for _ in range(n)]
        d, shares = ppl(dense, idx), []
        for plain, adapted in pairs:
            p = ppl(plain, idx)
            if p <= d:  # no gap on these windows: the share is undefined, drop the draw
                break
            shares.append((p - ppl(adapted, idx)) / (p - d))
        else:
            means.append(sum(shares) / len(shares))
    if len(means) < draws // 2:
        return None
    means.sort()
    return means[int(0.025 * len(means))], means[int(0.975 * len(means)) - 1]


def summarise(group: dict) -> list[dict]:
    rows = []
    dense, plain = group["dense"], group["plain"]
    w = group["windows"]
    for label, by_seed in sorted(group["adapted"].items()):
        cells, pairs = {}, {}
        for seed, (ppl, _) in sorted(by_seed.items()):
            if seed in plain and dense is not None and plain[seed] > dense:
                cells[seed] = {"ppl": ppl, "gap_closed": (plain[seed] - ppl) / (plain[seed] - dense)}
                if ("dense", None) in w and ("plain", seed) in w and (label, seed) in w:
                    pairs[seed] = (w[("plain", seed)], w[(label, seed)])
                    cells[seed]["interval_over_windows"] = bootstrap(w[("dense", None)], [pairs[seed]], group["tokens"])
        if not cells:
            continue
        closed = [c["gap_closed"] for c in cells.values()]
        mean = sum(closed) / len(closed)
        se = math.sqrt(sum((x - mean) ** 2 for x in closed) / (len(closed) - 1) / len(closed)) if len(closed) > 1 else None
        rows.append({"variant": label, "seeds": cells, "mean_gap_closed": mean, "standard_error": se,
                     "at_least_half": sum(x >= 0.5 for x in closed)})
        if len(cells) > 1 and len(pairs) == len(cells):
            # the seeds share the evaluation windows, so the standard error over seeds leaves out
            # how much other windows would move them all at once: this interval is over those
            rows[-1]["mean_interval_over_windows"] = bootstrap(w[("dense", None)], list(pairs.values()), group["tokens"])
    return rows


def cell(found: dict) -> str:
    interval = found.get("interval_over_windows")
    around = f", {100 * interval[0]:.0f} to {100 * interval[1]:.0f}" if interval else ""
    return f"{found['ppl']:.2f} ({100 * found['gap_closed']:.0f} %{around})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", type=Path, nargs="+", help="JSONs written by benchmarks/quant.py")
    ap.add_argument("--task", default="code_ppl", help="perplexity column to score (code_ppl or wikitext2_ppl)")
    ap.add_argument("--json", type=Path, help="also write the tables here")
    args = ap.parse_args()
    found = []
    for key, group in collect(args.files, args.task).items():
        rows = summarise(group)
        if not rows:
            continue
        seeds = sorted(group["plain"])
        settings = json.loads(key)
        found.append({"settings": settings, "dense": group["dense"], "plain_gptq": group["plain"], "rows": rows})
        print(f"\n{settings['model']} on {settings['machine']}, {args.task}, {settings['eval']['limit_windows'] or 'every'} windows; "
              f"dense {group['dense']:.2f}; plain GPTQ " + ", ".join(f"seed {s}: {group['plain'][s]:.2f}" for s in seeds) + "\n")
        print("| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | mean gap closed (± s.e.) | seeds at half or more |")
        print("| --- |" + " ---: |" * (len(seeds) + 2))
        for row in rows:
            cells = [cell(row["seeds"][s]) if s in row["seeds"] else "" for s in seeds]
            se = f" ± {100 * row['standard_error']:.0f}" if row["standard_error"] is not None else ""
            if row.get("mean_interval_over_windows"):
                se += " ({:.0f} to {:.0f} over windows)".format(*(100 * x for x in row["mean_interval_over_windows"]))
            print(f"| {row['variant']} | " + " | ".join(cells)
                  + f" | {100 * row['mean_gap_closed']:.0f} %{se} | {row['at_least_half']} of {len(row['seeds'])} |")
    if not found:
        sys.exit("no adapted row had a plain GPTQ row of the same seed and settings to compare with; pass the walks without --sequential too")
    if args.json:
        args.json.write_text(json.dumps(found, indent=2) + "\n")


if __name__ == "__main__":
    main()
