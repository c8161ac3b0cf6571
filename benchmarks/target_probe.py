"""Where does a --target-bits allocation's extra budget go to waste? The `target` recipe with its
option set narrowed, on the demo model, against uniform gptq4 (the target_size benchmark's rows).

    python benchmarks/target_probe.py                 # every probe row below
    python benchmarks/target_probe.py E2 E5           # some of them

Every row: the shipped `target` recipe built as benchmarks/target_size.py builds it (bfloat16,
32 x 512 windows of `code`, calibration seed 0, GPTQ group 128, act-order, sym), with the widths,
adapter ranks and weighting below; code perplexity on the first 8 windows of 512 tokens (the
target_size benchmark's default, so its gptq4 row, 16.906, compares). Writes
benchmarks/results/target_probe.json (rows added to what it holds).

    E1  widths {4}, ranks {0} at 4.25 bits: must be uniform 4-bit, so equal gptq4 exactly (the same pipeline)
    E2  widths {4, 8}, ranks {0} at 4.5 bits: the budget above gptq4 spent on 8-bit linears only
    E3  widths {4}, ranks {0..64} at 4.5 bits: spent on adapters only, where the estimate puts them
    E4  as the shipped recipe at 4.5 bits, but weighting: output (no loss-sensitivity weights)
    E5  widths {4}, ranks {8} at 4.5 bits: a rank-8 loss-weighted adapter on every linear (fits 4.5)
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = HERE / "results" / "target_probe.json"
ROWS = {
    "E1": dict(bits=[4], ranks=[0], bpw=4.25),
    "E2": dict(bits=[4, 8], ranks=[0], bpw=4.5),
    "E3": dict(bits=[4], ranks=[0, 8, 16, 32, 64], bpw=4.5),
    "E4": dict(bits=[4, 8], ranks=[0, 8, 16, 32, 64], bpw=4.5, weighting="output"),
    "E5": dict(bits=[4], ranks=[8], bpw=4.5),
}


def main(argv=None) -> None:
    want = (argv if argv is not None else sys.argv[1:]) or list(ROWS)
    unknown = [w for w in want if w not in ROWS]
    if unknown:
        sys.exit(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    import target_size as ts
    import torch

    from compressor import recipe
    from compressor.api import compress
    from compressor.eval.tasks import run_tasks
    from compressor.loading import load_model

    torch.manual_seed(0)
    dense, tok = load_model("demo", dtype="bfloat16")
    found = json.loads(OUT.read_text()) if OUT.exists() else {}
    for name in want:
        r = ROWS[name]
        data = ts.target_recipe(r["bpw"], 128, 32, 512, r["bits"])
        data["stages"][0]["ranks"] = r["ranks"]
        if "weighting" in r:
            data["stages"][0]["weighting"] = r["weighting"]
        work = tempfile.mkdtemp()
        t = time.time()
        res = compress(copy.deepcopy(dense), recipe.from_dict(data, source=name), work + "/o", tokenizer=tok, device="cpu", dtype="bfloat16")
        secs = time.time() - t
        ppl = run_tasks(res.model, tok, ["code_ppl"], 512, 8, torch.device("cpu"))["code_ppl"]["ppl"]
        a = res.report["allocation"]
        found[name] = {"options": r, "code_ppl": round(ppl, 4), "counts": a["counts"], "linear_bits": a["linear_bits_per_weight"],
                       "estimated_loss_increase": a["estimated_loss_increase"], "sequential_loss_increase": a["sequential_loss_increase"],
                       "compress_seconds": round(secs)}
        print(name, json.dumps(found[name]), flush=True)
        shutil.rmtree(work)
        OUT.write_text(json.dumps(found, indent=1) + "\n")


if __name__ == "__main__":
    main()
