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
import logging
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from compressor import api, models, progress
from compressor import recipe as recipes
from compressor.calibration import collect
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
    p.add_argument("--speed-layers", type=int, default=None,
                   help="decoder layers of the models whose speed is timed (default 4 on a GPU as in issue 28, all on CPU); "
                        "tokens/s ratios to dense do not depend on the layer count, and a 4-layer model costs seconds, not minutes")
    p.add_argument("--chunked-grams", action="store_true",
                   help="form Grams from chunked float32 products on any device (the CUDA default), to run that path on a CPU")
    p.add_argument("--no-export", action="store_true", help="do not time writing the compressed checkpoint (to a temporary folder)")
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

    def save_pretrained(self, path, **kwargs):
        """Nothing to write: the export being timed is the model's."""
        return ()


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


DECODE_WARMUP = 8  # untimed decode steps before the timed ones, for every model alike


def _decode(model, prompt, steps: int):
    """Greedy decode of `steps` tokens after `prompt` (batch 1, KV cache); returns nothing."""
    out = model(input_ids=prompt, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def speed(model, cfg, device, prefill_len, prefill_batch, decode_tokens, repeats=3) -> dict:
    """Prefill and decode tokens/s, every model timed the same way: one untimed full-size prefill
    and one untimed decode of DECODE_WARMUP tokens first (kernel selection, allocator, cache
    set-up), so no model pays the cold start (issue 28: the first model timed was 7-17x slower)."""
    model.to(device)
    try:
        gen = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, cfg.vocab_size, (prefill_batch, prefill_len), generator=gen).to(device)
        start = prompt[:1, :128]
        model(input_ids=prompt, use_cache=False, logits_to_keep=1)  # warm-up: the timed shape itself
        _decode(model, start, DECODE_WARMUP)  # warm-up: the decode path
        sync(device)
        times = []
        for _ in range(repeats):
            sync(device)
            t = time.perf_counter()
            model(input_ids=prompt, use_cache=False, logits_to_keep=1)
            sync(device)
            times.append(time.perf_counter() - t)
        prefill = prefill_batch * prefill_len / statistics.median(times)
        # the timed decode includes its 128-token prompt's prefill only outside the clock
        out = model(input_ids=start, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(device)
        t = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(device)
        decode = decode_tokens / (time.perf_counter() - t)
        return {"prefill_tok_s": prefill, "decode_tok_s": decode, "decode_warmup_tokens": DECODE_WARMUP}
    finally:
        model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


def log_to_stdout() -> None:
    """The toolkit's INFO lines (per-layer progress and stage seconds) on stdout, one flush per
    line, so a step killed at its budget leaves them in its log."""
    root = logging.getLogger("compressor")
    if any(getattr(h, "bench_stdout", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.bench_stdout = True
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


class Heartbeat:
    """Prints the phase seconds so far (compressor.progress.TIMES) every `every` s and at exit, so
    even a killed run's log says where its time went."""

    def __init__(self, every: float = 15.0):
        self.every, self.stop = every, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.wait(self.every):
            self.print()

    @staticmethod
    def print():
        print(f"  times: { {k: round(v, 2) for k, v in progress.times().items()} }", flush=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.print()
        return False


def on_sigterm(signum, frame):
    # the check's runner sends SIGTERM at the budget, SIGKILL 10 s later: leave through `finally`
    raise SystemExit(143)


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
    speed_layers = min(n_layers, args.speed_layers or (4 if device.type == "cuda" else n_layers))
    heads = max(1, hidden // 128)

    def config(layers):
        return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=heads, vocab_size=32000, max_position_embeddings=max(4096, prefill_len + 256))

    cfg, speed_cfg = config(n_layers), config(speed_layers)
    name = device_name(device)
    print(f"device {device} ({name}), {n_layers} layers, hidden {hidden}, intermediate {inter}, {dtype}, "
          f"calibration {samples} x {seq_len} random token ids", flush=True)
    log_to_stdout()
    if args.chunked_grams:
        collect.CHUNKED = True
    signal.signal(signal.SIGTERM, on_sigterm)
    result = {"device": str(device), "device_name": name, "torch": torch.__version__, "hidden": hidden, "intermediate": inter,
              "layers": n_layers, "dtype": str(dtype), "samples": samples, "seq_len": seq_len, "prefill_len": prefill_len,
              "prefill_batch": args.prefill_batch, "decode_tokens": decode_tokens, "speed_layers": speed_layers, "speed": {}, "partial": True}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_compress_{device.type}_{'quick' if quick else f'h{hidden}'}.json"

    def save():  # after every phase: a run killed at its budget keeps what it measured
        path.write_text(json.dumps(result, indent=2) + "\n")

    # Speed first, on `speed_layers`-layer models (seconds), so a compression cut off by the budget
    # cannot take these figures with it. Every model is timed by the same `speed` (warm-ups
    # included). Compressed rows use plain SVD at the same uniform, aligned ranks as whiten: the
    # shapes, and so the speed, are those of whitened SVD at that ratio, without calibration.
    model = build(speed_cfg, dtype, device)
    result["speed"]["dense"] = speed(model, speed_cfg, device, prefill_len, args.prefill_batch, decode_tokens)
    print(f"  dense: {result['speed']['dense']}", flush=True)
    save()
    for r in [float(x) for x in args.speed_ratios.split(",") if x]:
        del model
        model = build(speed_cfg, dtype, device)
        api.compress(model, recipes.load("svd", r), device=str(device))
        result["speed"][f"{r:g}"] = {**speed(model, speed_cfg, device, prefill_len, args.prefill_batch, decode_tokens),
                                     "structure": "svd, same uniform ranks as whiten"}
        print(f"  {r:g}: {result['speed'][f'{r:g}']}", flush=True)
        save()
    del model

    t = time.perf_counter()
    model = build(cfg, dtype, device)
    result["build_s"] = time.perf_counter() - t
    result["params"] = models.count_params(model)
    save()
    recipe = recipes.load("whiten", args.ratio)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    progress.reset_times()
    export_dir = None if args.no_export else Path(tempfile.mkdtemp(prefix="bench_compress_"))  # never under $OUT: 13 GB
    t = time.perf_counter()
    try:
        with Heartbeat():
            res = api.compress(model, recipe, None if export_dir is None else export_dir / "model", tokenizer=RandomIds(cfg.vocab_size),
                               calib="code", samples=samples, seq_len=seq_len, device=str(device))
            sync(device)
    finally:
        total = time.perf_counter() - t
        split = progress.times()
        result["time_split_s"] = {k: round(v, 3) for k, v in split.items()}
        save()
        if export_dir is not None:
            shutil.rmtree(export_dir, ignore_errors=True)
    export_s = split.get("export", 0.0)
    result["compress"] = {"method": "whiten", "ratio": args.ratio, "wall_s": total - export_s, "export_s": export_s if export_dir else None,
                          "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                          # What the caching allocator held at most: the figure nvidia-smi and an OOM see.
                          "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None,
                          "achieved_linear_ratio": res.report["achieved_linear_ratio"], "params_after": res.report["params_after"],
                          "rank_alignment": res.report.get("rank_alignment"), "chunked_grams": bool(args.chunked_grams or device.type == "cuda")}
    print(f"  compress: {result['compress']}", flush=True)
    result["partial"] = False
    save()

    dense = result["speed"]["dense"]
    print()
    print(f"{'model':>8s} {'prefill tok/s':>14s} {'x dense':>8s} {'decode tok/s':>13s} {'x dense':>8s}  structure ({speed_layers} layers)")
    for key, row in result["speed"].items():
        print(f"{key:>8s} {row['prefill_tok_s']:14.1f} {row['prefill_tok_s'] / dense['prefill_tok_s']:8.2f} "
              f"{row['decode_tok_s']:13.1f} {row['decode_tok_s'] / dense['decode_tok_s']:8.2f}  {row.get('structure', '')}")
    c = result["compress"]
    peak = f"{c['peak_gpu_gib']:.1f} GiB peak GPU" if c["peak_gpu_gib"] is not None else "CPU"
    print(f"time split (s): {result['time_split_s']}")
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
