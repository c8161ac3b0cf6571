"""Loader half of gptqmodel_check.py, run by the Python of a separate environment that has
gptqmodel, optimum and transformers (and peft for the adapter row), but not compressor.

    python gptqmodel_load.py EXPORT_DIR REFERENCE.safetensors

Loads EXPORT_DIR the way a user of the GPTQ ecosystem would, AutoModelForCausalLM.from_pretrained
without trust_remote_code, so transformers hands the checkpoint's quantization_config to gptqmodel;
then, when EXPORT_DIR/adapter exists, puts the PEFT adapter on top. Prints one JSON line per
forward: logits' largest absolute difference from the reference that compressor computed.
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
