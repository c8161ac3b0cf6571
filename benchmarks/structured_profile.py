"""Where `structured` spends its time on one MLP, by phase: the Gram of down_proj's input (what the
driver's hooks accumulate), the backward elimination that picks the channels, and the refit of
down_proj with its error. A synthetic layer (random SwiGLU activations with correlated channels)
of the shapes that matter: 4864 (Qwen2.5-0.5B) and 8960 (Qwen2.5-1.5B) intermediate channels.

    python benchmarks/structured_profile.py --widths 4864,8960 --hidden 896,1536 --tokens 4096 \
        --out benchmarks/results/structured_profile.json

The Gram's cost is linear in tokens: the line gives seconds per 4096 tokens and the projection to
the shipped recipe's 64 x 512 calibration tokens. `--compare` also times the previous elimination
(kept in tests/methods/test_structured.py as the reference) and checks the same channels come out.
Timings depend on the machine's load; run alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from compressor.methods.structured import elimination_order, keep_set, refit_with_error

ROOT = Path(__file__).resolve().parents[1]


def synthetic(width: int, hidden: int, tokens: int, seed: int = 0):
    """(Z: tokens x width activations of a SwiGLU MLP on correlated inputs, W_down: hidden x width)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g) * torch.logspace(0, -1.5, hidden)
    gate = torch.randn(width, hidden, generator=g) / hidden**0.5
    up = torch.randn(width, hidden, generator=g) / hidden**0.5
    z = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
    return z, torch.randn(hidden, width, generator=g) / width**0.5


def gram_seconds(z: torch.Tensor, batch: int = 4096) -> float:
    """The collector's work: each batch to float64, then C += x^T x."""
    start = time.perf_counter()
    total = None
    for x in z.split(batch):
        x = x.double()
        total = x.T @ x if total is None else total.addmm_(x.T, x)
    return time.perf_counter() - start


def profile(width: int, hidden: int, tokens: int, ratio: float, compare: bool) -> dict:
    z, W = synthetic(width, hidden, tokens)
    row = {"width": width, "hidden": hidden, "tokens": tokens, "threads": torch.get_num_threads()}
    row["gram_s"] = round(gram_seconds(z), 2)
    row["gram_s_per_32768_tokens"] = round(row["gram_s"] * 32768 / tokens, 1)
    C = (z.double().T @ z.double()) / tokens
    keep = int(width * (1 - ratio)) // 32 * 32
    start = time.perf_counter()
    order = elimination_order(C, W, keep)
    row["elimination_s"] = round(time.perf_counter() - start, 2)
    kept = keep_set(order, keep)
    start = time.perf_counter()
    refit_with_error(C, W, kept, 1e-6)
    row["refit_s"] = round(time.perf_counter() - start, 2)
    if compare:
        sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "methods")]  # the reference lives beside its test
        from test_structured import reference_elimination_order, reference_refit_error

        start = time.perf_counter()
        old = reference_elimination_order(C, W, keep)
        row["elimination_old_s"] = round(time.perf_counter() - start, 2)
        row["same_order"] = bool(torch.equal(old, order))
        row["same_kept"] = bool(torch.equal(keep_set(old, keep), kept))
        start = time.perf_counter()
        reference_refit_error(C, W, kept, 1e-6)
        row["refit_old_s"] = round(time.perf_counter() - start, 2)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="4864,8960")
    p.add_argument("--hidden", default="896,1536", help="one per width")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--ratio", type=float, default=0.27, help="share of the channels dropped (structured 20 %% takes about 27 %% of a Qwen MLP)")
    p.add_argument("--compare", action="store_true", help="also time the previous implementation and check it picks the same channels")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    for width, hidden in zip(map(int, args.widths.split(",")), map(int, args.hidden.split(","))):
        rows.append(profile(width, hidden, args.tokens, args.ratio, args.compare))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": platform.processor() or platform.machine(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
