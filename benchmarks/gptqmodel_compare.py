"""Our GPTQ against gptqmodel's under one protocol: same model, calibration windows and evaluation.

Runs in an environment that has both compressor and gptqmodel (gptqmodel needs torch >= 2.14.1):

    python -m venv ~/gq && ~/gq/bin/pip install torch==2.14.1 && ~/gq/bin/pip install -e ".[demo,gptq-runtime]"
    GPTQMODEL_CPU_WORKERS=2 ~/gq/bin/python benchmarks/gptqmodel_compare.py [--ours DIR ...] [--desc-act]

gptqmodel quantises the demo model (4-bit, group 128, its defaults otherwise) on exactly the
calibration windows our `gptq4` recipe draws (64 x 512 tokens of the shipped code set, seed 0);
each checkpoint is then loaded with AutoModelForCausalLM.from_pretrained, so gptqmodel's own kernel
computes every row, and evaluated with compressor's perplexity tasks on the same windows as
benchmarks/quant.py. --ours adds GPTQ exports written by `compressor compress` (e.g. with the
gptq4 recipe) to the table. Writes benchmarks/results/gptqmodel_compare.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from compressor import recipe
from compressor.calibration.windows import calibration_windows
from compressor.eval.tasks import run_tasks
from compressor.loading import load_model

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--limit", type=int, default=16, help="evaluation windows of 512 tokens per task")
    ap.add_argument("--desc-act", action="store_true", help="gptqmodel with desc_act (activation order) instead of its default")
    ap.add_argument("--ours", type=Path, nargs="*", default=[], help="GPTQ exports of compressor to evaluate the same way")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gptqmodel_compare.json")
    args = ap.parse_args()
    from gptqmodel import GPTQModel, QuantizeConfig, __version__

    tasks = ["code_ppl", "wikitext2_ppl"]
    dense, tok = load_model(args.model)
    windows = calibration_windows(recipe.load("gptq4"), tok, None, samples=args.samples, seq_len=512)
    results = {"model": args.model, "gptqmodel": __version__, "torch": torch.__version__, "calibration": f"{args.samples} x 512 code (gptq4 recipe's windows)",
               "eval": {"tasks": tasks, "seq_len": 512, "limit_windows": args.limit}, "rows": []}

    def evaluate(label, folder, **extra):
        model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32).eval()
        kernels = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("gptqmodel")})
        ppl = run_tasks(model, tok, tasks, 512, args.limit, "cpu")
        row = {"variant": label, **{t: round(ppl[t]["ppl"], 3) for t in tasks}, "kernels": kernels, **extra}
        results["rows"].append(row)
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory(prefix="gptqmodel-compare-") as tmp:
        base = Path(tmp) / "dense"
        dense.save_pretrained(base)
        tok.save_pretrained(base)
        config = QuantizeConfig(bits=4, group_size=128, desc_act=args.desc_act)
        results["gptqmodel_config"] = {k: str(v) for k, v in config.to_dict().items()}
        t = time.time()
        model = GPTQModel.load(str(base), config, device="cpu")
        model.quantize([{"input_ids": w.tolist(), "attention_mask": [1] * w.numel()} for w in windows], batch_size=8)
        model.save(str(Path(tmp) / "gptqmodel"))
        wall = round(time.time() - t, 1)
        del model
        evaluate(f"gptqmodel {__version__} w4 g128" + (" desc_act" if args.desc_act else " (defaults)"), Path(tmp) / "gptqmodel", quantize_seconds=wall)
        for folder in args.ours:
            evaluate(f"compressor export {folder.name}", folder)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n| variant | " + " | ".join(tasks) + " | kernel |\n| --- |" + " ---: |" * len(tasks) + " --- |")
    for row in results["rows"]:
        print(f"| {row['variant']} | " + " | ".join(f"{row[t]:.3f}" for t in tasks) + f" | {', '.join(row['kernels'])} |")


if __name__ == "__main__":
    main()
