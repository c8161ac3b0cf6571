"""--target-bits against the uniform GPTQ recipes: size against code perplexity on the demo model.

    nice python benchmarks/target_size.py      # demo model; writes benchmarks/results/target_size.json and docs/results/target_size.png

Rows (every one calibrated on the same 32 x 512 windows of the shipped `code` set, and scored on
the same first 8 windows of 512 tokens of the held-out code text):
    dense                 the loaded model, evaluated once;
    gptq2, gptq3, gptq4   uniform GPTQ, group 128, act-order, symmetric (the grid the allocation uses);
    gptqN-eora32          the same plus a float rank-32 EoRA adapter per linear (weighting output,
                          sequential: true; no refine or propagation, to keep it cheap);
    target-B              the shipped `target` recipe with its budget set to B bits per decoder-linear
                          weight (what `compress(model, out=..., target_bits=B)` and `--target-bits B`
                          run), for B in --bits (2.5 3.0 3.5 4.0 4.5).

Each row's size is counted from its output folder in one way for every row
(compressor.export.accounting.folder_linear_bits): the bytes of every
safetensors tensor that belongs to a decoder linear (codes, scales, zeros, g_idx, bias, the adapter
folder's factors; file headers left out) x 8 / the dense model's decoder-linear weight count. That
is the quantity a `--target-bits` budget bounds, so a target row's stored bits never exceed B.

The model is loaded and compressed in --dtype (bfloat16 by default: what `compressor compress demo`
stores, so adapters and unquantised tensors cost 2 bytes a value); the dense row is that model.

After the table the script prints (a) the Pareto check: at each uniform row's stored bits, the
target curve's perplexity (linear between target rows) against the uniform row's; (a2) each
target row against the best uniform row that fits its budget (what a user could pick instead); (b) the moonshot
share at 3.0 bits, (ppl gptq3 - ppl target-3.0) / (ppl gptq3 - ppl dense); (c) Spearman rank
correlations between the allocation's estimated error and the measured log(ppl / dense), over the
target rows, and over the target rows plus the plain GPTQ rows priced by the allocation report's
"uniform" estimates. The PNG draws stored bits against code perplexity, each point annotated.

The JSON is rewritten after every row, so an interrupted run keeps what it measured (--resume
skips the rows it holds when its settings match). Compressed folders go to a temporary directory
(or --out-dir) and are deleted after each row unless --keep.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "target_size.json"
PLOT = HERE.parent / "docs" / "results" / "target_size.png"
TASK = "code_ppl"
UNIFORM_BITS = (2, 3, 4)
TARGET_BITS = (2.5, 3.0, 3.5, 4.0, 4.5)
MOONSHOT_BITS = 3.0
ADAPTER_RANK = 32


def row_names(uniform_bits, adapters: str, target_bits) -> list[str]:
    names = ["dense"]
    for b in uniform_bits:
        if adapters in ("both", "without"):
            names.append(f"gptq{b}")
        if adapters in ("both", "with"):
            names.append(f"gptq{b}-eora{ADAPTER_RANK}")
    return names + [f"target-{b:.1f}" for b in target_bits]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="model spec for compressor.loading.load_model (a folder, hub id, GGUF file or 'demo')")
    p.add_argument("--bits", type=float, nargs="+", default=list(TARGET_BITS), help="--target-bits budgets, one target row each")
    p.add_argument("--widths", type=int, nargs="+", choices=[2, 3, 4, 8], help="the GPTQ widths target rows may choose from (default: the recipe's)")
    p.add_argument("--uniform-bits", type=int, nargs="+", default=list(UNIFORM_BITS), choices=[2, 3, 4, 8], help="uniform GPTQ widths")
    p.add_argument("--adapters", choices=["both", "without", "with"], default="both",
                   help=f"uniform rows without adapters (gptqN), with rank-{ADAPTER_RANK} EoRA (gptqN-eora{ADAPTER_RANK}), or both")
    p.add_argument("--rows", default=None, help="comma-separated subset of the rows above (e.g. dense,gptq3,target-3.0)")
    p.add_argument("--samples", type=int, default=32, help="calibration windows, every row alike")
    p.add_argument("--seq-len", type=int, default=512, help="calibration window length")
    p.add_argument("--seed", type=int, default=0, help="calibration seed (where the windows are drawn), every row alike; another seed shows how much of a gap "
                   "is calibration noise")
    p.add_argument("--limit", type=int, default=8, help="evaluation windows of the code text (0: every window)")
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--group-size", type=int, default=128, help="GPTQ group size of every row (tiny test models need 32)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="dtype the model is loaded, compressed and stored in")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto (GPTQ's codes differ between devices: compare rows from one device)")
    p.add_argument("--out-dir", type=Path, default=None, help="where the compressed folders go (default: a fresh temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep each row's compressed folder (default: deleted once measured, to save disk)")
    p.add_argument("--resume", action="store_true", help="keep the rows --json already holds when its settings match, and measure the rest")
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument("--png", type=Path, default=PLOT)
    args = p.parse_args(argv)
    if any(not 0 < b <= 32 for b in args.bits) or len(set(args.bits)) != len(args.bits):
        p.error(f"--bits takes distinct budgets in (0, 32] bits per weight, got {args.bits}")
    counts = (("--samples", args.samples, 1), ("--seq-len", args.seq_len, 2), ("--limit", args.limit, 0), ("--eval-seq-len", args.eval_seq_len, 2))
    for name, value, least in counts:
        if value < least:
            p.error(f"{name} must be at least {least}, got {value}")
    every = row_names(args.uniform_bits, args.adapters, args.bits)
    if args.rows is None:
        args.row_names = every
    else:
        wanted = [r for r in args.rows.split(",") if r]
        unknown = [r for r in wanted if r not in every]
        if unknown or not wanted:
            p.error(f"unknown row(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(every)}")
        args.row_names = [r for r in every if r in wanted]
    return args


# ----------------------------------------------------------------------------- recipes


def target_recipe(bits: float, group_size: int, samples: int, seq_len: int, widths: list[int] | None = None, seed: int = 0) -> dict:
    """The shipped 'target' recipe with its budget at `bits` per decoder-linear weight (what
    --target-bits sets), the group size and the calibration counts of this run; `widths` replaces
    the widths the allocation may choose from (an experiment, --widths)."""
    from compressor import recipe

    data = recipe.load("target", budget=recipe.budget_override(target_bits=bits)).to_dict()
    data["calibration"].update(samples=samples, seq_len=seq_len, seed=seed)
    (stage,) = data["stages"]
    stage["group_size"] = group_size
    if widths:
        stage["bits"] = list(widths)
    return data


def uniform_recipe(name: str, group_size: int, samples: int, seq_len: int, seed: int = 0) -> dict:
    """gptqN or gptqN-eoraR on the target recipe's grid (sym, act_order, damp) and calibration, so
    that the rows differ in how bits are spent only."""
    base = target_recipe(TARGET_BITS[0], group_size, samples, seq_len, seed=seed)
    grid = base["stages"][0]
    bits = int(name[len("gptq"):].split("-")[0])
    stages = [{"method": "gptq", "bits": bits, "group_size": group_size, "sym": grid["sym"], "act_order": grid["act_order"], "damp": grid["damp"]}]
    if name.endswith(f"-eora{ADAPTER_RANK}"):
        stages.append({"method": "eora", "rank": ADAPTER_RANK, "weighting": "output", "sequential": True})
    return {"name": name, "calibration": base["calibration"], "stages": stages}


def recipe_of(name: str, args) -> dict | None:
    if name == "dense":
        return None
    if name.startswith("target-"):
        return target_recipe(float(name[len("target-"):]), args.group_size, args.samples, args.seq_len, args.widths, args.seed)
    return uniform_recipe(name, args.group_size, args.samples, args.seq_len, args.seed)


# ----------------------------------------------------------------------------- summaries


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rho: Pearson's correlation of the ranks (ties averaged); None with fewer than 3
    points or when either side is constant."""
    if len(x) != len(y) or len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else None


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """y of the polyline through `points` (x, y) at x; None outside their x range."""
    pts = sorted(points)
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1]  # a single point, at exactly its x


def summary(results: dict) -> list[str]:
    rows = {r["row"]: r for r in results["rows"]}
    dense = rows.get("dense", {}).get(TASK)
    targets = [r for r in results["rows"] if r["row"].startswith("target-") and TASK in r]
    uniform = [r for r in results["rows"] if r["row"].startswith("gptq") and TASK in r]
    curve = [(r["stored_bits"], r[TASK]) for r in targets]
    lines = ["(a) Pareto check: the target curve's code ppl at each uniform row's stored bits (linear between target rows)"]
    for u in uniform:
        at = interpolate(curve, u["stored_bits"])
        if at is None:
            head = f"    {u['row']} ({u['stored_bits']:.3f} bits, ppl {u[TASK]:.3f}): outside the target rows' range"
            smaller = [r for r in targets if r["stored_bits"] <= u["stored_bits"]]
            if not targets:
                lines.append(f"{head} (no target row)")
            elif not smaller:
                lines.append(f"{head} ({min(c[0] for c in curve):.2f} bits and up): no target row is as small")
            else:
                # past the largest target row: that smaller row alone may already dominate this one
                best = max(smaller, key=lambda r: r["stored_bits"])
                verdict = "is smaller and no worse (dominates)" if best[TASK] <= u[TASK] else "is smaller but worse (no verdict)"
                lines.append(f"{head}; {best['row']} ({best['stored_bits']:.3f} bits, ppl {best[TASK]:.3f}) {verdict}")
        else:
            verdict = "target below or equal (holds)" if at <= u[TASK] else "target ABOVE uniform (Pareto violated)"
            lines.append(f"    {u['row']} ({u['stored_bits']:.3f} bits): uniform {u[TASK]:.3f}, target curve {at:.3f}: {verdict}")
    # A target row against what a user could have picked instead: the best uniform row that fits
    # its budget (at most its stored bits). Dominated: that uniform row is as small and better.
    lines.append("(a2) each target row against the best uniform row that fits its budget")
    for t in targets:
        fit = [u for u in uniform if u["stored_bits"] <= t["stored_bits"]]
        if not fit:
            lines.append(f"    {t['row']} ({t['stored_bits']:.3f} bits, ppl {t[TASK]:.3f}): no uniform row fits")
            continue
        best = min(fit, key=lambda u: u[TASK])
        verdict = "target better or equal (holds)" if t[TASK] <= best[TASK] else "uniform BETTER (target dominated)"
        lines.append(f"    {t['row']} ({t['stored_bits']:.3f} bits, ppl {t[TASK]:.3f}) vs {best['row']} ({best['stored_bits']:.3f} bits, "
                     f"ppl {best[TASK]:.3f}): {verdict}")
    label = f"target-{MOONSHOT_BITS:.1f}"
    if dense is not None and "gptq3" in rows and TASK in rows["gptq3"] and label in rows and TASK in rows[label]:
        u3, t3 = rows["gptq3"], rows[label]
        gap = u3[TASK] - dense
        share = (u3[TASK] - t3[TASK]) / gap if gap else None
        verdict = (f"{share:.3f} (goal: at least 0.333: {'met' if share >= 1 / 3 else 'not met'})" if share is not None
                   else "undefined (gptq3 equals dense)")
        lines.append(f"(b) moonshot at {MOONSHOT_BITS} bits: (gptq3 {u3[TASK]:.3f} at {u3['stored_bits']:.3f} bits - {label} {t3[TASK]:.3f} "
                     f"at {t3['stored_bits']:.3f} bits) / (gptq3 - dense {dense:.3f}) = {verdict}")
    else:
        lines.append(f"(b) moonshot at {MOONSHOT_BITS} bits: needs the dense, gptq3 and {label} rows")

    def rho_line(title, pts):
        rho = spearman([p[0] for p in pts], [p[1] for p in pts])
        found = f"rho {rho:+.3f} over {len(pts)} points" if rho is not None else f"undefined ({len(pts)} points; needs 3 with distinct values)"
        return f"    {title}: {found}"

    lines.append("(c) Spearman rank correlation, estimated error (allocation report) against measured log(ppl / dense)")
    if dense is None:
        lines.append("    needs the dense row")
        return lines
    ours = [(r["estimated_error"], math.log(r[TASK] / dense)) for r in targets if r.get("estimated_error") is not None]
    lines.append(rho_line("target rows", ours))
    estimates = {u["option"]: u["estimated_error"] for u in results.get("uniform_estimates") or []}
    plain = [(estimates[f"{r['row'][len('gptq'):]}-bit"], math.log(r[TASK] / dense)) for r in uniform
             if "-eora" not in r["row"] and f"{r['row'][len('gptq'):]}-bit" in estimates]
    lines.append(rho_line("target rows + plain GPTQ rows (the report's uniform estimates)", ours + plain))
    return lines


def table(results: dict) -> list[str]:
    dense = next((r[TASK] for r in results["rows"] if r["row"] == "dense" and TASK in r), None)
    out = ["| row | stored bits / decoder-linear weight | size on disk (MB) | code ppl | vs dense | compress wall (s) | allocation "
           "| est. loss increase (nats) |",
           "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in sorted(results["rows"], key=lambda r: (r["row"] != "dense", r.get("stored_bits", math.inf))):
        if "error" in r:
            out.append(f"| {r['row']} | - | - | - | - | - | refused: {r['error']} | - |")
            continue
        change = f"{(r[TASK] / dense - 1) * 100:+.1f} %" if dense and TASK in r else "-"
        counts = ", ".join(f"{k} x{v}" for k, v in sorted(r["counts"].items(), key=lambda kv: -kv[1])) if r.get("counts") else "-"
        loss = r.get("estimated_loss_increase")
        wall = "-" if r["row"] == "dense" else r["compress_seconds"]
        out.append(f"| {r['row']} | {r['stored_bits']:.3f} | {r['size_bytes'] / 1e6:.1f} | {r.get(TASK, float('nan')):.3f} | {change} | "
                   f"{wall} | {counts} | {'-' if loss is None else f'{loss:.4g}'} |")
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if TASK in r]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    targets = sorted((r for r in rows if r["row"].startswith("target-")), key=lambda r: r["stored_bits"])
    if targets:
        ax.plot([r["stored_bits"] for r in targets], [r[TASK] for r in targets], "o-", color="C0", label="--target-bits (allocate)")
    for marker, color, label, keep in (("s", "C1", "uniform GPTQ", lambda n: "-eora" not in n),
                                       ("^", "C2", f"uniform GPTQ + EoRA r{ADAPTER_RANK}", lambda n: "-eora" in n)):
        pts = [r for r in rows if r["row"].startswith("gptq") and keep(r["row"])]
        if pts:
            ax.plot([r["stored_bits"] for r in pts], [r[TASK] for r in pts], marker, color=color, linestyle="none", markersize=8, label=label)
    for r in rows:
        if r["row"] != "dense":
            # uniform rows label below their point, target rows above, so neighbours do not overlap
            below = r["row"].startswith("gptq")
            ax.annotate(f"{r['row']}\n{r[TASK]:.4g} @ {r['stored_bits']:.2f}b", (r["stored_bits"], r[TASK]), textcoords="offset points",
                        xytext=(5, -18 if below else 5), fontsize=7)
    dense = next((r for r in rows if r["row"] == "dense"), None)
    if dense:
        ax.axhline(dense[TASK], color="grey", linestyle="--", label=f"dense {results['dtype']} ({dense[TASK]:.2f})")
    ev = results["eval"]
    cal = results["calibration"]
    # Collapsed rows (2-bit: ppl in the thousands) sit four decades above the rest: a log scale
    # keeps the rows near dense readable.
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per decoder-linear weight (scales, zeros, g_idx and adapters included)")
    ax.set_ylabel(f"code perplexity ({ev['limit_windows'] or 'all'} windows of {ev['seq_len']} tokens)")
    ax.set_title(f"{results['model']}: size against quality, {cal['samples']} x {cal['seq_len']} code calibration", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ----------------------------------------------------------------------------- the run


def settings(args) -> dict:
    return {"model": args.model, "dtype": args.dtype, "group_size": args.group_size, "device": args.device,
            "calibration": target_recipe(TARGET_BITS[0], args.group_size, args.samples, args.seq_len, seed=args.seed)["calibration"],
            "eval": {"task": TASK, "seq_len": args.eval_seq_len, "limit_windows": args.limit or None}}


def measure_row(name: str, dense, tok, linears: dict[str, int], args, device, work: Path) -> dict:
    from compressor import recipe
    from compressor.api import compress
    from compressor.eval.tasks import run_tasks
    from compressor.export.accounting import folder_linear_bits, weight_bytes

    folder = work / name
    data = recipe_of(name, args)
    start = time.time()
    if data is None:
        dense.save_pretrained(folder)
        model, report = dense, None
    else:
        res = compress(copy.deepcopy(dense), recipe.from_dict(data, source=name), folder, tokenizer=tok, device=str(device), dtype=args.dtype)
        model, report = res.model, res.report
    wall = round(time.time() - start, 1) if data is not None else 0.0
    bits, nbytes = folder_linear_bits(folder, linears)
    row = {"row": name, "stored_bits": round(bits, 4), "linear_bytes": nbytes, "size_bytes": weight_bytes(folder), "compress_seconds": wall}
    t = time.time()
    found = run_tasks(model.to(device), tok, [TASK], args.eval_seq_len, args.limit or None, device)
    model.to("cpu")
    row[TASK] = round(found[TASK]["ppl"], 4)
    row["eval_seconds"] = round(time.time() - t, 1)
    if data is not None:
        row["recipe"] = data
    if report and "allocation" in report:
        a = report["allocation"]
        row.update(target_bits=float(name[len("target-"):]), planned_linear_bits=a["linear_bits_per_weight"], budget_bytes=a["budget_bytes"],
                   planned_bytes=a["planned_bytes"], output_bytes=report.get("output_bytes"), counts=a["counts"], weighting=a["weighting"],
                   estimated_error=a["estimated_error"], estimated_loss_increase=a["estimated_loss_increase"],
                   sequential_loss_increase=a["sequential_loss_increase"], fell_back_to_uniform=a["fell_back_to_uniform"], uniform=a["uniform"],
                   per_linear=a["per_linear"])
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return row


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from compressor.environment import device_name, resolve_device
    from compressor.errors import CompressorError
    from compressor.export import accounting
    from compressor.loading import load_model

    device = resolve_device(args.device)
    torch.manual_seed(0)
    start = time.time()
    dense, tok = load_model(args.model, dtype=args.dtype)
    linears = accounting.dense_linear_weights(dense)
    results = {**settings(args), "host": {"cpu": device_name(torch.device("cpu")), "threads": torch.get_num_threads(), "torch": torch.__version__,
                                          **({} if device.type == "cpu" else {"device": device_name(device)})},
               "dense_linear_weights": sum(linears.values()), "load_seconds": round(time.time() - start, 1), "rows": [], "uniform_estimates": None}
    done = {}
    if args.resume and args.json.exists():
        old = json.loads(args.json.read_text())
        if all(old.get(k) == v for k, v in settings(args).items()):
            done = {r["row"]: r for r in old["rows"]}
        else:
            print(f"--resume: {args.json} was measured with other settings; measuring every row again", flush=True)
    work = args.out_dir or Path(tempfile.mkdtemp(prefix="target-size-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{args.model} ({args.dtype}): rows {', '.join(args.row_names)}; folders in {work}", flush=True)

    for name in args.row_names:
        if name in done and "error" not in done[name]:
            row = {**done[name], "resumed": True}
        else:
            try:
                row = measure_row(name, dense, tok, linears, args, device, work)
            except CompressorError as exc:
                # e.g. a budget below what these options can store on this model: the other rows still count
                row = {"row": name, "error": str(exc)}
                shutil.rmtree(work / name, ignore_errors=True)
        results["rows"].append(row)
        if row.get("uniform") is not None:
            # every target row prices the uniform allocations of the widths it mixes (mix: adjacent
            # keeps two), from the same Grams, so one option's estimate is the same in every row:
            # keep the union, for the rank correlation of uniform rows
            loss = row.get("weighting") == "loss"  # half a loss-weighted error estimates the loss increase (allocate's report)
            known = {u["option"]: u for u in results["uniform_estimates"] or []}
            for u in row["uniform"]:
                kept = {k: v for k, v in u.items() if k != "fits"}  # fits: this row's budget only
                known.setdefault(u["option"], {**kept, "estimated_loss_increase": 0.5 * u["estimated_error"] if loss else None})
            results["uniform_estimates"] = list(known.values())
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k not in ("recipe", "uniform", "per_linear")}), flush=True)
    if args.out_dir is None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    results["total_seconds"] = round(time.time() - start, 1)
    results["summary"] = summary(results)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.png)

    cal = results["calibration"]
    print(f"\n{args.model} ({args.dtype}), GPTQ group {args.group_size}; {cal['samples']} x {cal['seq_len']} `{cal['dataset']}` calibration; "
          f"code ppl on {'the first ' + str(args.limit) if args.limit else 'every'} window(s) of {args.eval_seq_len} tokens\n")
    print("\n".join(table(results)))
    print()
    print("\n".join(results["summary"]))
    print(f"\ntotal {results['total_seconds']} s; JSON: {args.json}; plot: {args.png}")


if __name__ == "__main__":
    main()
