"""Quantisation benchmark on a real pretrained model: dense, round-to-nearest, GPTQ, GPTQ + EoRA.

    nice python benchmarks/quant.py [--samples 64] [--limit 4] [--ranks 16 32 64 128]

Gemma 3 270M (the `demo` model), 4 bits, group size 128, calibration on the shipped `code` set.
Perplexity in the papers' protocol (non-overlapping 512-token windows) on code and WikiText-2,
capped at --limit windows per task so the run fits a CPU. Writes benchmarks/results/quant.json
(after every variant, so an interrupted run keeps what it measured) and prints a markdown table.

One calibration walk serves every GPTQ row: the eora stage runs with `sequential: false`, so the
quantised base is exactly what the gptq stage alone produces, and the rank-r adapters are the
top-r components of the rank-128 ones (the same truncated SVD of the same dW and H).
`--weighting loss` uses the eora stage's loss-weighted adapters; `--adapter-bits 4` replaces the
float-adapter walk by one walk per rank with 4-bit adapters stored in the checkpoint.
The demo model's weights were stored at 4-6 bits in its GGUF, so absolute 4-bit numbers are
somewhat confounded; compare rows with each other.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from compressor import recipe
from compressor.api import compress
from compressor.environment import device_name, resolve_device
from compressor.eval.tasks import run_tasks
from compressor.export import peft
from compressor.loading import load_model
from compressor.methods import eora as eora_stage
from compressor.modules import LoraAdapted

RESULTS = Path(__file__).resolve().parent / "results" / "quant.json"
TASKS = ["code_ppl", "wikitext2_ppl"]


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".json") and f.name != "compression_report.json")


def weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def truncate_adapters(model, full: dict, rank: int | dict | None) -> None:
    """Put the top `rank` components of each fitted adapter in place, or a rank per module (None or
    0: no adapter, i.e. the GPTQ base). full: module name -> its fitted LoraAdapted."""
    for name, module in full.items():
        r = rank.get(name, 0) if isinstance(rank, dict) else rank
        model.set_submodule(name, eora_stage.truncate(module, r or 0))


def allocate(full: dict, rank: int) -> dict[str, int]:
    """The eora stage's rank_allocation: per-type at `rank`, applied to the fitted adapters.
    Component j removes S_j^2 of the output error, and S_j = ||B[:, j]||^2 since B = U S^1/2."""
    stage = eora_stage.Eora(eora_stage.EoraConfig(rank=rank, sequential=False, rank_allocation="per-type"))
    fitted = {n: (m.lora_B.weight.detach().double().square().sum(0).square(), rank, (m.out_features, m.in_features)) for n, m in full.items()}
    return stage.allocate(fitted)


def host(device: torch.device) -> dict:
    """What ran this: GPTQ's rounding decisions differ with the device's float paths, and the
    perplexities with them."""
    found = {"cpu": device_name(torch.device("cpu")), "threads": torch.get_num_threads(), "torch": torch.__version__}
    return found if device.type == "cpu" else {**found, "device": device_name(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", help="model spec for compressor.loading.load_model")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--limit", type=int, default=4, help="evaluation windows per task (0: every window of the text)")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated perplexity tasks")
    ap.add_argument("--device", default="cpu", help="where calibration, GPTQ, EoRA and evaluation run: cpu, cuda[:N] or auto "
                    "(GPTQ's codes, and so the perplexities, differ between devices: compare rows from one device)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-reference", action="store_true", help="skip the dense and RTN rows (they do not depend on the seed; gap.py takes "
                    "dense from any walk with the same settings, and quant_seeds.py evaluates them in its first walk only)")
    ap.add_argument("--resume", action="store_true", help="keep the dense and RTN rows of --out when its evaluation settings match")
    ap.add_argument("--sequential", action="store_true", help="EoRA stage with sequential: true (later layers calibrated with the adapters); "
                    "the GPTQ row is then the base of that walk, not plain GPTQ, and lower ranks are still truncations")
    ap.add_argument("--allocate", action="store_true", help="also rows with the eora stage's rank_allocation: per-type (same adapter parameters "
                    "as each uniform rank below the largest, moved between layers by output error removed per parameter)")
    ap.add_argument("--act-order", action="store_true", help="GPTQ with activation order (desc_act)")
    ap.add_argument("--weighting", choices=["output", "loss", "loss-full"], default="output", help="the eora stage's weighting (loss: "
                    "output channels weighted by the calibration loss's squared gradient; adds one forward and backward pass per calibration window)")
    ap.add_argument("--propagation", type=float, default=0.0, help="the eora stage's propagation (share of the error inherited from earlier "
                    "compressed layers the adapters also correct; needs --sequential, and then use one rank per run: lower ranks are truncations)")
    ap.add_argument("--propagation-damp", type=float, default=0.0, help="the eora stage's propagation_damp (ridge on the propagation correction, "
                    "share of the mean eigenvalue of H)")
    ap.add_argument("--refine", type=int, default=0, help="the eora stage's refine (rounds of re-quantising W - B A and refitting B A; "
                    "the base row is then that walk's base, recorded without evaluation since it needs its adapters; use one rank per run)")
    ap.add_argument("--seed", type=int, default=0, help="calibration seed (which windows of the code text GPTQ and EoRA see)")
    ap.add_argument("--true-sequential", action="store_true", help="calibration.true_sequential: inside each layer, o_proj calibrated on the "
                    "compressed q/k/v's output and down_proj on the compressed gate/up's (applies to the GPTQ and EoRA walks)")
    ap.add_argument("--gram-dtype", default="float32", help="Gram accumulation dtype (float32 is GPTQ's usual; float64 is slower)")
    ap.add_argument("--adapter-bits", type=int, help="instead of the float-adapter walk, one walk per rank in --ranks with the eora stage's "
                    "bits (adapters quantised with GPTQ, group --group-size, stored in the checkpoint)")
    args = ap.parse_args()
    if args.allocate and args.weighting != "output":
        # the per-type rows re-derive each component's energy from B's column norms, which only
        # holds for unweighted adapters
        ap.error("--allocate works with --weighting output only")
    if args.propagation and not args.sequential:
        ap.error("--propagation needs --sequential (the eora stage refuses it otherwise)")
    if args.refine and len(args.ranks) > 1:
        ap.error("--refine fits the base to each rank's adapters, so lower ranks are no truncations: pass one --ranks value")
    tasks = [t for t in args.tasks.split(",") if t]
    limit = args.limit or None
    device = resolve_device(args.device)
    torch.manual_seed(0)
    print(f"evaluation: {tasks}, seq_len 512, " + (f"first {limit} windows per task" if limit else "every window"), flush=True)

    start = time.time()
    dense, tok = load_model(args.model)
    calibration = {"dataset": "code", "samples": args.samples, "seq_len": args.seq_len, "seed": args.seed, "gram_dtype": args.gram_dtype,
                   "true_sequential": args.true_sequential}
    results = {"model": args.model, "bits": 4, "group_size": args.group_size, "act_order": args.act_order, "eora_sequential": args.sequential,
               "eora_weighting": args.weighting, "eora_propagation": args.propagation, "eora_propagation_damp": args.propagation_damp,
               "eora_refine": args.refine, "calibration": calibration, "eval": {"tasks": tasks, "seq_len": 512, "limit_windows": limit}, "host": host(device),
               "load_seconds": round(time.time() - start, 1), "rows": []}

    previous = {}
    if args.resume and args.out.exists():
        old = json.loads(args.out.read_text())
        # RTN's codes, like GPTQ's, depend on the device's float paths: reuse rows from the same device only
        if old.get("eval") == results["eval"] and old.get("model") == args.model and old.get("host", {}).get("device") == results["host"].get("device"):
            previous = {row["variant"]: row for row in old["rows"] if not row["variant"].startswith("GPTQ")}

    def record(name, model, size, wall, evaluate=True, **extra):
        if name in previous:
            results["rows"].append({**previous[name], "resumed": True})
            print(json.dumps({k: v for k, v in results["rows"][-1].items() if k != "window_nll"}), flush=True)
            return
        t = time.time()
        ppl = run_tasks(model.to(device), tok, tasks, 512, limit, device, per_window=True) if evaluate else {}
        model.to("cpu")
        row = {"variant": name, **{k: round(v["ppl"], 3) for k, v in ppl.items()}, "size_bytes": size, "compress_seconds": wall,
               "eval_seconds": round(time.time() - t, 1), **extra,
               # each window's summed NLL: benchmarks/gap.py bootstraps the gap closed over them
               "window_nll": {k: [round(x, 4) for x in v["window_nll"]] for k, v in ppl.items()}}
        results["rows"].append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "window_nll"}), flush=True)

    work = Path(tempfile.mkdtemp(prefix="quant-bench-"))

    def recipe_for(stages):
        return recipe.from_dict({"name": "bench", "calibration": calibration, "stages": stages})

    if not args.no_reference:
        if "dense fp32" not in previous:
            dense.save_pretrained(work / "dense")
        record("dense fp32", dense, None if "dense fp32" in previous else weights_bytes(work / "dense"), 0.0)
        t = time.time()
        if "RTN w4 g128" in previous:
            record("RTN w4 g128", None, None, None)
        else:
            rtn = compress(copy.deepcopy(dense), recipe_for([{"method": "rtn", "bits": 4, "group_size": args.group_size}]), work / "rtn",
                           tokenizer=tok, device=str(device))
            record("RTN w4 g128", rtn.model, weights_bytes(work / "rtn"), round(time.time() - t, 1), bits_per_dense_weight=rtn.report["bits_per_dense_weight"])
            del rtn

    label = ("GPTQ w4 g128" + (" act-order" if args.act_order else "") + (" true-sequential" if args.true_sequential else "")
             + (" (EoRA-sequential walk)" if args.sequential else "") + (f" (base of the refine {args.refine} walk)" if args.refine else ""))
    eora_label = ("EoRA" + {"output": "", "loss": ", loss-weighted", "loss-full": ", full loss-weighted"}[args.weighting]
                  + (f", propagation {args.propagation:g}" if args.propagation else "") + (f" damp {args.propagation_damp:g}" if args.propagation_damp else "")
                  + (f", refine {args.refine}" if args.refine else ""))
    gptq_stage = {"method": "gptq", "bits": 4, "group_size": args.group_size, "act_order": args.act_order}

    def eora_stage_at(rank, **extra):
        # one description for both walks below, so no option reaches one walk and not the other
        return {"method": "eora", "rank": rank, "sequential": args.sequential, "weighting": args.weighting,
                "propagation": args.propagation, "propagation_damp": args.propagation_damp, "refine": args.refine, **extra}

    if args.adapter_bits:
        for r in sorted(args.ranks):
            model = dense if r == max(args.ranks) else copy.deepcopy(dense)
            t = time.time()
            eora = eora_stage_at(r, bits=args.adapter_bits, group_size=args.group_size)
            res = compress(model, recipe_for([gptq_stage, eora]), work / f"q{r}", tokenizer=tok, device=str(device))
            record(f"{label} + {eora_label} r{r}, {args.adapter_bits}-bit adapters", res.model, weights_bytes(work / f"q{r}"), round(time.time() - t, 1),
                   bits_per_dense_weight=res.report["bits_per_dense_weight"])
    else:
        top = max(args.ranks)
        t = time.time()
        res = compress(dense, recipe_for([gptq_stage, eora_stage_at(top)]), work / "gptq-eora", tokenizer=tok, device=str(device))
        wall = round(time.time() - t, 1)
        model, base_bytes = res.model, weights_bytes(work / "gptq-eora") - weights_bytes(work / "gptq-eora" / "adapter")
        full = {n: m for n, m in model.named_modules() if isinstance(m, LoraAdapted)}
        note = f"one walk computes GPTQ and rank-{top} EoRA ({wall} s); lower ranks are truncations"
        truncate_adapters(model, full, None)
        # a refined base is W minus its top components, rounded: no model without its adapters, so
        # its perplexity (in the billions) is not worth an evaluation pass
        record(f"{label} (ours)", model, base_bytes, wall, evaluate=not args.refine, bits_per_dense_weight=res.report["bits_per_dense_weight"], note=note)
        for r in sorted(args.ranks):
            truncate_adapters(model, full, r)
            adapter_dir = work / f"adapter-{r}"
            peft.save_adapter(peft.adapted(model), adapter_dir)
            record(f"{label} + {eora_label} r{r}", model, base_bytes + weights_bytes(adapter_dir), wall, adapter_bytes=weights_bytes(adapter_dir), note=note)
            if args.allocate and r < top:
                pattern = allocate(full, r)
                truncate_adapters(model, full, pattern)
                adapter_dir = work / f"adapter-{r}-per-type"
                peft.save_adapter(peft.adapted(model), adapter_dir)
                spread = sorted(pattern.values())
                record(f"{label} + EoRA r{r} per-type", model, base_bytes + weights_bytes(adapter_dir), wall,
                       adapter_bytes=weights_bytes(adapter_dir), rank_min_median_max=[spread[0], spread[len(spread) // 2], spread[-1]], note=note)
    shutil.rmtree(work)
    results["total_seconds"] = round(time.time() - start, 1)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    windows = f"the first {limit} windows" if limit else "every window"
    print(f"\n{args.model}, 4-bit g{args.group_size}, {args.samples}x{args.seq_len} code calibration; perplexity on {windows} of 512 tokens per task\n")
    print("| variant | " + " | ".join(tasks) + " | size on disk (MB) | compress wall (s) |")
    print("| --- |" + " ---: |" * (len(tasks) + 2))
    for row in results["rows"]:
        cells = " | ".join(f"{row[t]:.3f}" if t in row else "not evaluated" for t in tasks)
        print(f"| {row['variant']} | {cells} | {row['size_bytes'] / 1e6:.1f} | {row['compress_seconds']} |")
    print(f"\ntotal {results['total_seconds']} s; JSON: {args.out}")


if __name__ == "__main__":
    main()
