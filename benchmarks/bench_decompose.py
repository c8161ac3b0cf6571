"""Decomposition speed and accuracy at LLaMA-2-7B shape: naive per-matrix SVD loop vs compressor.linalg.

The model skeleton comes from a LlamaConfig on the meta device (no download, no memory); only the
224 decoder weight matrices are materialised, one layer at a time, on the benchmark device. Each is
W = Q_a diag(s) Q_b^T with random orthonormal Q and a power-law spectrum s_i = (1+i)^-alpha (flat,
like pretrained LLM weights), so the exact truncation error at rank k is known in closed form:
sqrt(sum_{i>=k} s_i^2) / ||s||. Both paths are judged against that, not against each other.

Ranks come from the toolkit's own uniform allocation at a parameter reduction (--ratio, the
whitened-SVD setting: ranks 40-58% of the smaller dimension, where the Gram path is used) and,
optionally, at a fixed fraction of the smaller dimension (--rank-fraction, the randomized regime).

    python benchmarks/bench_decompose.py --device cuda               # 7B shape, full run
    python benchmarks/bench_decompose.py --device cuda --probe --naive-layers 4 \
        --algorithms auto,gram,randomized,gesvda --rank-fraction 0.125   # what the GPU run used
    python benchmarks/bench_decompose.py --device cpu --quick        # small shape, a minute or two

The naive loop costs ~4 minutes on an H100 (1.12 s per 4096x4096 SVD, more for 4096x11008);
--naive-layers N times it on N layers and extrapolates, and says so in the table and the JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from compressor import linalg, models
from compressor import ranks as rank_policies
from compressor.environment import device_name

# Spectral decay per matrix role; attention projections decay faster than MLP ones in real models.
ALPHA = {"q_proj": 0.6, "k_proj": 0.6, "v_proj": 0.4, "o_proj": 0.4, "gate_proj": 0.3, "up_proj": 0.3, "down_proj": 0.3}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--quick", action="store_true", help="small shape (hidden 512, 2 layers) for CPUs and CI")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--ratio", type=float, default=0.2, help="parameter reduction for the uniform rank allocation")
    p.add_argument("--rank-fraction", type=float, default=None, help="also run ranks = this fraction of the smaller dimension")
    p.add_argument("--naive-layers", type=int, default=None, help="time the naive loop on the first N layers only and extrapolate (default: all)")
    p.add_argument("--algorithms", default="auto", help="comma-separated linalg algorithms to time (auto, gram, randomized, gesvda, full)")
    p.add_argument("--probe", action="store_true", help="also time single decompositions of one hidden x hidden matrix")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON result")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def layer_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear of one decoder layer, read from a meta-device model."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    layer = models.decoder_layers(model)[0]
    return {name: tuple(models.weight_of(m).shape) for name, m in models.layer_linears(model, layer).items()}


def orthonormal(rows: int, cols: int, gen, device) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, device=device))
    return q


def make_layer(shapes, gen, device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Weights with exactly known spectra. One orthonormal basis per distinct size per layer,
    reused under random column permutations: permuted orthonormal columns stay orthonormal, and
    the QRs, not the decompositions under test, would otherwise dominate the run."""
    bases: dict[tuple[int, int], torch.Tensor] = {}
    out = {}
    for name, (m, n) in shapes.items():
        k = min(m, n)
        for dim in (m, n):
            if (dim, k) not in bases:
                bases[(dim, k)] = orthonormal(dim, k, gen, device)
        qa = bases[(m, k)][:, torch.randperm(k, generator=gen, device=device)]
        qb = bases[(n, k)][:, torch.randperm(k, generator=gen, device=device)]
        s = (1 + torch.arange(k, dtype=torch.float64, device=device)) ** -ALPHA.get(name.rpartition(".")[2], 0.4)
        out[name] = ((qa * s.float()) @ qb.T, s)
    return out


def exact_error(s: torch.Tensor, rank: int) -> float:
    return float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())


def trunc_error(w: torch.Tensor, u, s, vh, rank: int) -> float:
    up, down = linalg.split_factors(u, s, vh, rank)
    return float((w - up.to(w.dtype) @ down.to(w.dtype)).norm() / w.norm())


def naive(w: torch.Tensor):
    return torch.linalg.svd(w, full_matrices=False)


def probe(hidden: int, device) -> dict:
    """Single-call timings on one hidden x hidden fp32 matrix: which primitive is fast here."""
    gen = torch.Generator(device=device).manual_seed(1)
    w = torch.randn(hidden, hidden, generator=gen, device=device)
    g64 = (w.double() @ w.double().T)
    rank = hidden // 4
    cases = {
        "svd fp32 (default driver)": lambda: torch.linalg.svd(w, full_matrices=False),
        "eigh fp32 of Gram": lambda: torch.linalg.eigh(g64.float()),
        "eigh fp64 of Gram": lambda: torch.linalg.eigh(g64),
        "Gram product fp64": lambda: w.double() @ w.double().T,
        "linalg gram path, rank 40%": lambda: linalg.svd([w], ranks=[int(0.4 * hidden)], algorithm="gram"),
        f"linalg randomized, rank {rank}": lambda: linalg.svd([w], ranks=[rank], algorithm="randomized"),
        f"torch.svd_lowrank q={rank} niter=4": lambda: torch.svd_lowrank(w, q=rank, niter=4),
    }
    if device.type == "cuda":
        cases["svd fp32 gesvda"] = lambda: torch.linalg.svd(w, full_matrices=False, driver="gesvda")
        cases["svd fp32 gesvdj"] = lambda: torch.linalg.svd(w, full_matrices=False, driver="gesvdj")
    res = {}
    for name, fn in cases.items():
        fn()  # warm-up: library handles, workspaces
        _, dt = timed(fn, device)
        res[name] = round(dt, 4)
        print(f"  probe {name:36s} {dt:8.4f} s", flush=True)
    if device.type == "cuda":
        try:
            torch.backends.cuda.preferred_linalg_library("magma")
            torch.linalg.eigh(g64)
            _, dt = timed(lambda: torch.linalg.eigh(g64), device)
            res["eigh fp64 of Gram (magma)"] = round(dt, 4)
            print(f"  probe {'eigh fp64 of Gram (magma)':36s} {dt:8.4f} s", flush=True)
        except RuntimeError as e:  # magma absent from this build
            res["eigh fp64 of Gram (magma)"] = f"unavailable: {e}"[:120]
        finally:
            torch.backends.cuda.preferred_linalg_library("default")
    return res


def run(args) -> dict:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    hidden = args.hidden or (512 if args.quick else 4096)
    inter = args.intermediate or (1376 if args.quick else 11008)
    n_layers = args.layers or (2 if args.quick else 32)
    naive_layers = min(n_layers, args.naive_layers or n_layers)
    heads = max(1, hidden // 128)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=n_layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32000)
    shapes = layer_shapes(cfg)
    algorithms = [a for a in args.algorithms.split(",") if a]
    scenarios = {f"ratio {args.ratio:g}": rank_policies.uniform(shapes, args.ratio)}
    if args.rank_fraction:
        scenarios[f"rank {args.rank_fraction:g} of min dim"] = {n: max(1, int(args.rank_fraction * min(s))) for n, s in shapes.items()}
    print(f"device {device} ({device_name(device)}), "
          f"{n_layers} layers x {len(shapes)} matrices, hidden {hidden}, intermediate {inter}", flush=True)

    result = {"device": str(device), "device_name": device_name(device),
              "torch": torch.__version__, "hidden": hidden, "intermediate": inter, "layers": n_layers, "matrices": n_layers * len(shapes),
              "naive_layers": naive_layers, "shapes": {n: list(s) for n, s in shapes.items()}}
    if args.probe:
        result["probe"] = probe(hidden, device)

    # Warm-up on a small matrix of each kind so library initialisation is not billed to layer 0.
    warm = torch.randn(600, 700, device=device)
    naive(warm)
    for algo in algorithms:
        try:
            linalg.svd([warm], ranks=[150], algorithm=algo)
        except RuntimeError as e:
            print(f"  warm-up of {algo} failed: {e}", flush=True)

    gen = torch.Generator(device=device).manual_seed(args.seed)
    rows = {name: {"shape": list(shapes[name]), "naive_s": 0.0, "naive_excess": 0.0} for name in shapes}
    totals = {"naive_s": 0.0, "generate_s": 0.0}
    def matrix_rows(r, a):
        return {n: {"rank": r[n], "algo": linalg.choose(shapes[n], r[n], device, a), "time_s": 0.0, "max_excess": 0.0} for n in shapes}

    per_scenario = {sc: {a: {"time_s": 0.0, "max_excess": 0.0, "per_matrix": matrix_rows(r, a)} for a in algorithms} for sc, r in scenarios.items()}
    naive_excess = {sc: 0.0 for sc in scenarios}
    start = time.perf_counter()
    for layer in range(n_layers):
        weights, dt = timed(lambda: make_layer(shapes, gen, device), device)
        totals["generate_s"] += dt
        names = list(weights)
        mats = [weights[n][0] for n in names]
        if layer < naive_layers:
            for name, w in zip(names, mats):
                (u, s, vh), dt = timed(functools.partial(naive, w), device)
                rows[name]["naive_s"] += dt
                totals["naive_s"] += dt
                for sc, r in scenarios.items():
                    exc = trunc_error(w, u, s, vh, r[name]) / exact_error(weights[name][1], r[name]) - 1
                    naive_excess[sc] = max(naive_excess[sc], exc)
                    rows[name]["naive_excess"] = max(rows[name]["naive_excess"], exc)
                del u, s, vh
        for sc, r in scenarios.items():
            for algo in algorithms:
                rec = per_scenario[sc][algo]
                if "error" in rec:
                    continue
                # One batched call per layer, exactly as the pipeline makes it.
                try:
                    facts, dt = timed(functools.partial(linalg.svd, mats, ranks=[r[n] for n in names], algorithm=algo), device)
                except RuntimeError as e:  # a driver refusing a shape must not cost the whole run
                    rec["error"], rec["time_s"], rec["max_excess"] = str(e)[:200], float("nan"), float("nan")
                    print(f"  {algo} failed: {rec['error']}", flush=True)
                    continue
                rec["time_s"] += dt
                for name, w, (u, s, vh) in zip(names, mats, facts):
                    exc = trunc_error(w, u, s, vh, r[name]) / exact_error(weights[name][1], r[name]) - 1
                    rec["max_excess"] = max(rec["max_excess"], exc)
                    rec["per_matrix"][name]["max_excess"] = max(rec["per_matrix"][name]["max_excess"], exc)
                del facts
        del weights, mats
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"  layer {layer + 1}/{n_layers} done, {time.perf_counter() - start:.1f} s", flush=True)

    scale = n_layers / naive_layers
    naive_total = totals["naive_s"] * scale
    result.update(scenarios={sc: {"ranks": scenarios[sc], "naive_max_excess": naive_excess[sc], "algorithms": per_scenario[sc]} for sc in scenarios},
                  naive_per_matrix=rows, naive_total_s=naive_total, naive_measured_s=totals["naive_s"], naive_extrapolated=naive_layers < n_layers,
                  generate_s=totals["generate_s"], peak_gpu_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)

    # Table: per matrix role, per-matrix seconds and worst relative excess over the exact error.
    print()
    hdr = f"{'matrix':22s} {'shape':>12s} {'naive s':>8s} {'naive exc':>10s}"
    for sc in scenarios:
        for algo in algorithms:
            hdr += f" | {(sc + ' ' + algo)[:24]:>24s} {'rank':>5s} {'excess':>9s}"
    print(hdr)
    for name in shapes:
        line = f"{name:22s} {'x'.join(map(str, shapes[name])):>12s} {rows[name]['naive_s'] / naive_layers:8.3f} {rows[name]['naive_excess']:10.2e}"
        for sc in scenarios:
            for algo in algorithms:
                pm = per_scenario[sc][algo]["per_matrix"][name]
                line += f" | {pm['algo']:>24s} {pm['rank']:5d} {pm['max_excess']:9.2e}"
        print(line)
    print()
    summary = []
    for sc in scenarios:
        for algo in algorithms:
            rec = per_scenario[sc][algo]
            # A failed algorithm has no speed-up (NaN), not an infinite one.
            speedup = math.nan if "error" in rec else (naive_total / rec["time_s"] if rec["time_s"] else math.inf)
            rec["speedup"] = speedup
            ok = rec["max_excess"] < 1e-3
            extrapolated = f" (extrapolated from {naive_layers} layers)" if naive_layers < n_layers else ""
            print(f"{sc:22s} {algo:10s}: toolkit {rec['time_s']:8.2f} s vs naive {naive_total:8.2f} s{extrapolated}"
                  f" -> {speedup:6.2f}x; worst truncation error excess {rec['max_excess']:.2e} (naive {naive_excess[sc]:.2e}) {'OK' if ok else 'ABOVE 1e-3'}")
            summary.append(f"{sc}/{algo} {speedup:.1f}x (excess {rec['max_excess']:.1e})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "quick" if args.quick else f"h{hidden}"
    path = out / f"bench_decompose_{device.type}_{tag}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    print(f"SUMMARY bench_decompose {result['device_name']} {n_layers * len(shapes)} matrices: naive {naive_total:.1f} s; " + "; ".join(summary))
    return result


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
