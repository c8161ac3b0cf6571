"""Loader half of gptqmodel_check.py, run by the Python of a separate environment that has
gptqmodel, optimum and transformers (and peft for the adapter row), but not compressor.

    python gptqmodel_load.py EXPORT_DIR REFERENCE.safetensors [--gptqmodel]

Loads EXPORT_DIR the way a user of the GPTQ ecosystem would, AutoModelForCausalLM.from_pretrained
without trust_remote_code, so transformers hands the checkpoint's quantization_config to gptqmodel;
then, when EXPORT_DIR/adapter exists, puts the PEFT adapter on top. Prints one JSON line per
forward: logits' largest absolute difference from the reference that compressor computed.

--gptqmodel loads with GPTQModel.load instead, the loader that reads the config's per-module
`dynamic` rules (transformers' route, through optimum, builds every layer at the base width; see
docs/guides/mixed-bits.md), in float16 with the torch kernel, the CPU kernel that takes 2, 3, 4 and
8 bits; its row also gives each quantised layer's bits.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main() -> None:
    folder, reference = Path(sys.argv[1]), load_file(sys.argv[2])
    ids = reference["ids"]
    if sys.argv[3:] == ["--gptqmodel"]:
        from gptqmodel import GPTQModel

        model = GPTQModel.load(str(folder), device="cpu", dtype=torch.float16, backend="torch")
        # GPTQModel wraps the causal-LM model as `.model`: names as in the checkpoint.
        bits = {n.removeprefix("model."): m.bits for n, m in model.named_modules() if type(m).__module__.startswith("gptqmodel") and hasattr(m, "qweight")}
        with torch.no_grad():
            got = model(ids).logits.float()
        ref = reference["logits"]
        print(json.dumps({"row": "GPTQModel.load", "bits": bits, "max_abs_diff": (got - ref).abs().max().item(), "logit_scale": ref.abs().max().item(),
                          "argmax_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item()}), flush=True)
        return
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32).eval()
    kernels = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("gptqmodel")})
    if not kernels:
        raise SystemExit(f"{folder}: no gptqmodel layer was built; is quantization_config in config.json?")

    def report(row, ref_key, m):
        with torch.no_grad():
            got = m(ids).logits.float()
        ref = reference[ref_key]
        print(json.dumps({"row": row, "kernels": kernels, "max_abs_diff": (got - ref).abs().max().item(),
                          "logit_scale": ref.abs().max().item(), "argmax_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item()}), flush=True)

    report("base", "logits", model)
    if (folder / "adapter").is_dir() and "adapted" in reference:
        from peft import PeftModel

        report("base + PEFT adapter", "adapted", PeftModel.from_pretrained(model, folder / "adapter").eval())


if __name__ == "__main__":
    main()
