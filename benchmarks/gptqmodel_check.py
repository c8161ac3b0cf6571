"""Cross-check: does gptqmodel, through transformers, load our GPTQ exports and compute our logits?

gptqmodel needs torch >= 2.14.1 and a stack of its own, so it lives in a separate environment, e.g.

    python -m venv ~/gq && ~/gq/bin/pip install torch==2.14.1 gptqmodel optimum peft
    python benchmarks/gptqmodel_check.py --python ~/gq/bin/python [--model demo] [--samples 16]

This script (in the compressor environment) compresses the model twice, GPTQ 4-bit g128 without
and with activation order (the second with rank-32 EoRA adapters, sequential: false, so its base is
plain act-order GPTQ), writes each export, and records compressor's own logits on fixed token ids.
benchmarks/gptqmodel_load.py then runs under --python: plain AutoModelForCausalLM.from_pretrained
(gptqmodel picks its kernel), PEFT's adapter on top, and the same ids. Prints a table, writes
benchmarks/results/gptqmodel_check.json; exits non-zero when a row's logits differ by more than
--tolerance. gptqmodel dequantises in float16, so equality holds to float16 rounding, not bits.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import compressor
from compressor import recipe
from compressor.api import compress
from compressor.loading import load_model

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "GPTQ w4 g128": [{"method": "gptq", "bits": 4, "group_size": 128}],
    "GPTQ w4 g128 act-order + EoRA r32": [{"method": "gptq", "bits": 4, "group_size": 128, "act_order": True},
                                          {"method": "eora", "rank": 32, "sequential": False}],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", required=True, help="Python of an environment with gptqmodel, optimum (and peft)")
    ap.add_argument("--model", default="demo", help="model spec for compressor.loading.load_model")
    ap.add_argument("--samples", type=int, default=16, help="calibration windows of 512 tokens (quality is not what is checked)")
    ap.add_argument("--tolerance", type=float, default=1e-2, help="largest allowed |logit difference| relative to the largest |logit|")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gptqmodel_check.json")
    args = ap.parse_args()

    versions = subprocess.run([args.python, "-c", "import gptqmodel, optimum, torch, transformers; "
                               "print('versions', gptqmodel.__version__, torch.__version__, transformers.__version__)"],
                              capture_output=True, text=True)
    if versions.returncode != 0:
        sys.exit(f"--python {args.python} cannot import gptqmodel, optimum, torch and transformers; install them there "
                 f"(see this script's docstring): {versions.stderr.strip().splitlines()[-1] if versions.stderr.strip() else ''}")
    # gptqmodel prints a banner on import; the versions are on the marked line.
    gq, gq_torch, gq_tf = next(line.split()[1:] for line in versions.stdout.splitlines() if line.startswith("versions "))
    results = {"model": args.model, "gptqmodel": gq, "their_torch": gq_torch, "their_transformers": gq_tf,
               "our_torch": torch.__version__, "tolerance": args.tolerance, "rows": []}
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    failed = False
    with tempfile.TemporaryDirectory(prefix="gptqmodel-check-") as tmp:
        for name, stages in VARIANTS.items():
            model, tok = load_model(args.model)
            rec = recipe.from_dict({"name": "check", "calibration": {"dataset": "code", "samples": args.samples, "seq_len": 512}, "stages": stages})
            out = Path(tmp) / name.replace(" ", "_")
            t = time.time()
            result = compress(model, rec, out, tokenizer=tok, device="cpu")
            wall = round(time.time() - t, 1)
            with torch.no_grad():
                reference = {"ids": ids, "logits": compressor.load(out, adapter=False)(ids).logits.float()}
                if (out / "adapter").is_dir():
                    reference["adapted"] = result.model(ids).logits.float()
            save_file(reference, str(out / "reference.safetensors"))
            run = subprocess.run([args.python, str(HERE / "gptqmodel_load.py"), str(out), str(out / "reference.safetensors")],
                                 capture_output=True, text=True)
            rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
            if run.returncode != 0 or not rows:
                sys.exit(f"{name}: the gptqmodel side failed:\n{run.stderr[-3000:]}")
            for row in rows:
                row = {"variant": f"{name} ({row.pop('row')})", "compress_seconds": wall, **row}
                row["ok"] = row["max_abs_diff"] <= args.tolerance * row["logit_scale"]
                failed |= not row["ok"]
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    print(f"\n{args.model}: compressor (torch {torch.__version__}) exports, loaded by gptqmodel {gq} "
          f"(torch {gq_torch}, transformers {gq_tf}) through AutoModelForCausalLM.from_pretrained\n")
    print("| export | gptqmodel kernel | max abs logit diff | largest logit | argmax agreement | within tolerance |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for row in results["rows"]:
        print(f"| {row['variant']} | {', '.join(row['kernels'])} | {row['max_abs_diff']:.2e} | {row['logit_scale']:.1f} | "
              f"{row['argmax_agreement']:.3f} | {'yes' if row['ok'] else 'NO'} |")
    print(f"\nJSON: {args.out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
