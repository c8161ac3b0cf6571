"""Prefill and decode tokens/s of structured (narrower MLPs) against factorised (whitened-SVD shaped)
models at the same parameter counts, and against dense.

Speed depends on shapes, not on values, so the models here are built quickly: the structured one
is the source with every MLP cut to the width `structured` (uniform) gives at that ratio, keeping
its first channels; the factorised one is what the data-free `svd` recipe gives, whose uniform
ranks are the ones `whiten` gives at the same ratio. Run alone on a quiet machine (timings).

    python benchmarks/structured_speed.py --ratios 0.1,0.2,0.3,0.4 --out benchmarks/results/structured_speed.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from compressor import models
from compressor import recipe as recipes
from compressor.api import compress
from compressor.loading import load_model
from compressor.methods.structured import mlp_layout, select_rows, uniform_width


def narrowed(model, ratio: float, multiple_of: int = 32):
    """The model with every MLP at structured's uniform width for `ratio` (the first channels kept)."""
    model = copy.deepcopy(model)
    mlp = mlp_layout(model)
    _, k = uniform_width(model, ratio, multiple_of)
    kept = torch.arange(k)
    for layer in models.decoder_layers(model):
        for name in mlp.inputs:
            models.replace_linear(layer, name, select_rows(layer.get_submodule(name), kept))
        down = layer.get_submodule(mlp.output)
        models.replace_linear(layer, mlp.output, models.new_linear_like(down, models.weight_of(down).detach()[:, :k], down.bias))
    setattr(model.config, mlp.config_key, k)
    return model, k


def speed(model, prefill_len: int, decode_tokens: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (1, prefill_len), generator=gen)
    with torch.no_grad():
        model(input_ids=prompt[:, :16], use_cache=False)  # warm-up
        prefill, decode = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            model(input_ids=prompt, use_cache=False, logits_to_keep=1)
            prefill.append(prefill_len / (time.perf_counter() - t))
            out = model(input_ids=prompt[:, :128], use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(decode_tokens):
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            decode.append(decode_tokens / (time.perf_counter() - t))
    return {"prefill_tok_s": round(statistics.median(prefill), 1), "decode_tok_s": round(statistics.median(decode), 2),
            "prefill_runs": [round(x, 1) for x in prefill], "decode_runs": [round(x, 2) for x in decode]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--ratios", default="0.1,0.2,0.3,0.4")
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/structured_speed.json")
    args = p.parse_args(argv)
    base, _ = load_model(args.model)
    base.eval()
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    rows = [{"model": "dense", "ratio": 0.0, "params": params(base), **speed(base, args.prefill_len, args.decode_tokens, args.repeats)}]
    print(rows[-1], flush=True)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        small, k = narrowed(base, ratio)
        rows.append({"model": "structured", "ratio": ratio, "width": k, "params": params(small),
                     **speed(small, args.prefill_len, args.decode_tokens, args.repeats)})
        print(rows[-1], flush=True)
        del small
        factored = compress(copy.deepcopy(base), recipes.load("svd", ratio), None, device="cpu").model
        rows.append({"model": "factorised (whiten's shapes)", "ratio": ratio, "params": params(factored),
                     **speed(factored, args.prefill_len, args.decode_tokens, args.repeats)})
        print(rows[-1], flush=True)
        del factored
    result = {"model": args.model, "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
              "dtype": str(next(base.parameters()).dtype), "prefill_len": args.prefill_len, "decode_tokens": args.decode_tokens,
              "repeats": args.repeats, "rows": rows, "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("\n| model | ratio | params | prefill tok/s | decode tok/s |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['ratio']:.0%} | {r['params'] / 1e6:.1f}M | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
