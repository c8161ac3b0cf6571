"""End-to-end compression at LLaMA-2-7B shape, and the compressed model's own speed.

A LlamaConfig model with random weights (no download) is compressed through compressor.api.compress
with whitened SVD on random calibration token ids (128 x 2048 by default): wall time and peak GPU
memory. The model lives on the host; the pipeline moves one decoder layer at a time to the GPU,
which is what the peak-memory figure measures. Then prefill and decode tokens/s of dense and
compressed models on the same device.

The 40% point is timed on a model factorised with plain SVD at the same uniform allocation: its
module shapes and ranks are identical to whitened SVD at 40% (uniform ranks depend on shapes only),
and speed depends only on those, so a second calibrated compression would cost minutes for nothing.

    python benchmarks/bench_compress.py --device cuda           # 7B shape, one GPU
    python benchmarks/bench_compress.py --device cpu --quick    # tiny shape on a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from compressor import api, models
from compressor import recipe as recipes
from compressor.environment import device_name


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="tiny shape, few tokens: a CPU smoke run")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--samples", type=int, default=None, help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=int, default=None, help="calibration window length (default 2048)")
    p.add_argument("--ratio", type=float, default=0.2, help="reduction of the calibrated (timed) compression")
    p.add_argument("--speed-ratios", default="0.2,0.4", help="reductions whose inference speed is measured")
    p.add_argument("--dtype", default=None, help="model dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--prefill-len", type=int, default=None)
    p.add_argument("--prefill-batch", type=int, default=1)
    p.add_argument("--decode-tokens", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results")
    return p.parse_args(argv)


class RandomIds:
    """Stands in for a tokenizer: every text becomes `per_text` seeded random token ids, so the
    calibration windows are random ids of the real vocabulary, as the benchmark asks."""

    def __init__(self, vocab: int, per_text: int = 65536, seed: int = 0):
        self.vocab, self.per_text = vocab, per_text
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = torch.randint(0, self.vocab, (1, self.per_text), generator=self.gen)
        return type("Encoding", (), {"input_ids": ids})()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(cfg, dtype, device) -> torch.nn.Module:
    """Random-weight model on the host. Initialised on the GPU when there is one (seconds instead
    of minutes for 7B parameters), then moved to the host like a checkpoint loaded for compression."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.to("cpu").eval()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model


@torch.no_grad()
def speed(model, cfg, device, prefill_len, prefill_batch, decode_tokens, repeats=3) -> dict:
    model.to(device)
    try:
        gen = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, cfg.vocab_size, (prefill_batch, prefill_len), generator=gen).to(device)
        model(input_ids=prompt[:, :16], use_cache=False)  # warm-up: kernels, allocator
        times = []
        for _ in range(repeats):
            sync(device)
            t = time.perf_counter()
            model(input_ids=prompt, use_cache=False, logits_to_keep=1)
            sync(device)
            times.append(time.perf_counter() - t)
        prefill = prefill_batch * prefill_len / statistics.median(times)
        # Greedy decode of `decode_tokens` after a short prompt, batch 1, with the KV cache.
        start = prompt[:1, :128]
        out = model(input_ids=start, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(device)
        t = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(device)
        decode = decode_tokens / (time.perf_counter() - t)
        return {"prefill_tok_s": prefill, "decode_tok_s": decode}
    finally:
        model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run(args) -> dict:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    quick = args.quick
    hidden = args.hidden or (256 if quick else 4096)
    inter = args.intermediate or (688 if quick else 11008)
    n_layers = args.layers or (2 if quick else 32)
    samples = args.samples or (8 if quick else 128)
    seq_len = args.seq_len or (128 if quick else 2048)
    prefill_len = args.prefill_len or (128 if quick else 2048)
    decode_tokens = args.decode_tokens or (16 if quick else 128)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    heads = max(1, hidden // 128)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=n_layers, num_attention_heads=heads,
                      num_key_value_heads=heads, vocab_size=32000, max_position_embeddings=max(4096, prefill_len + 256))
    name = device_name(device)
    print(f"device {device} ({name}), {n_layers} layers, hidden {hidden}, intermediate {inter}, {dtype}, "
          f"calibration {samples} x {seq_len} random token ids", flush=True)
    result = {"device": str(device), "device_name": name, "torch": torch.__version__, "hidden": hidden, "intermediate": inter,
              "layers": n_layers, "dtype": str(dtype), "samples": samples, "seq_len": seq_len, "prefill_len": prefill_len,
              "prefill_batch": args.prefill_batch, "decode_tokens": decode_tokens, "speed": {}}

    t = time.perf_counter()
    model = build(cfg, dtype, device)
    result["build_s"] = time.perf_counter() - t
    result["params"] = models.count_params(model)
    result["speed"]["dense"] = speed(model, cfg, device, prefill_len, args.prefill_batch, decode_tokens)
    print(f"  dense: {result['speed']['dense']}", flush=True)

    recipe = recipes.load("whiten", args.ratio)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    res = api.compress(model, recipe, tokenizer=RandomIds(cfg.vocab_size), calib="code", samples=samples, seq_len=seq_len, device=str(device))
    sync(device)
    result["compress"] = {"method": "whiten", "ratio": args.ratio, "wall_s": time.perf_counter() - t,
                          "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                          # What the caching allocator held at most: the figure nvidia-smi and an OOM see.
                          "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None,
                          "achieved_linear_ratio": res.report["achieved_linear_ratio"], "params_after": res.report["params_after"]}
    print(f"  compress: {result['compress']}", flush=True)

    for r in [float(x) for x in args.speed_ratios.split(",") if x]:
        if abs(r - args.ratio) < 1e-9:
            compressed, how = model, "whiten (the timed compression)"
        else:
            del model
            compressed = build(cfg, dtype, device)
            api.compress(compressed, recipes.load("svd", r), device=str(device))
            how = "svd, same uniform ranks as whiten"
            model = compressed
        result["speed"][f"{r:g}"] = {**speed(compressed, cfg, device, prefill_len, args.prefill_batch, decode_tokens), "structure": how}
        print(f"  {r:g}: {result['speed'][f'{r:g}']}", flush=True)

    dense = result["speed"]["dense"]
    print()
    print(f"{'model':>8s} {'prefill tok/s':>14s} {'x dense':>8s} {'decode tok/s':>13s} {'x dense':>8s}  structure")
    for key, row in result["speed"].items():
        print(f"{key:>8s} {row['prefill_tok_s']:14.1f} {row['prefill_tok_s'] / dense['prefill_tok_s']:8.2f} "
              f"{row['decode_tok_s']:13.1f} {row['decode_tok_s'] / dense['decode_tok_s']:8.2f}  {row.get('structure', '')}")
    c = result["compress"]
    peak = f"{c['peak_gpu_gib']:.1f} GiB peak GPU" if c["peak_gpu_gib"] is not None else "CPU"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_compress_{device.type}_{'quick' if quick else f'h{hidden}'}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    last = max((k for k in result["speed"] if k != "dense"), key=float)
    print(f"SUMMARY bench_compress {name}: whiten {args.ratio:g} of {n_layers}x{hidden}/{inter} with {samples}x{seq_len} tokens in "
          f"{c['wall_s']:.1f} s, {peak}; prefill x{result['speed'][last]['prefill_tok_s'] / dense['prefill_tok_s']:.2f}, "
          f"decode x{result['speed'][last]['decode_tok_s'] / dense['decode_tok_s']:.2f} dense at {last}")
    return result


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
