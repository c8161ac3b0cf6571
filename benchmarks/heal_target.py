"""Healing's target, measured: structured 20 % on the demo model alone, healed against the dense
model's next hidden states (target: dense), and against the layer's own dense outputs (target: own).
Code and WikiText-2 perplexity on 8 windows of 1024 tokens; 32 x 256 code calibration tokens,
60 steps at lr 1e-4. One process, one thread:

    python benchmarks/heal_target.py      # writes benchmarks/results/heal_target.json (about 25 min on 2 cores)
"""
import copy
import json
import time

import torch

from compressor import recipe
from compressor.api import compress
from compressor.eval import tasks as eval_tasks
from compressor.loading import load_model

torch.set_num_threads(1)
base, tok = load_model("demo")
def ppl(m):
    r = eval_tasks.run_tasks(m, tok, ["code_ppl", "wikitext2_ppl"], 1024, 8, "cpu")
    return {k: round(r[k]["ppl"], 3) for k in ("code_ppl", "wikitext2_ppl")}
rows = {"dense": ppl(base)}
print(rows, flush=True)
for name, heal in [("structured20", None), ("heal-dense", {"target": "dense"}), ("heal-own", {"target": "own"})]:
    st = [{"method": "structured", "ratio": 0.2}] + ([{"method": "heal", "steps": 60, "lr": 1e-4, **heal}] if heal else [])
    rec = recipe.from_dict({"name": name, "stages": st, "calibration": {"dataset": "code", "samples": 32, "seq_len": 256, "batch_size": 4}})
    t = time.time()
    res = compress(copy.deepcopy(base), rec, None, tokenizer=tok, device="cpu")
    rows[name] = {**ppl(res.model), "seconds": round(time.time() - t, 1), "heal": res.report.get("heal", {}).get("layers")}
    print(name, json.dumps(rows[name]), flush=True)
json.dump(rows, open(__import__("pathlib").Path(__file__).resolve().parent / "results" / "heal_target.json", "w"), indent=1)
