"""Every shipped recipe gives the compressed tensors it gave before the code moved.

tests/recipe_fingerprints.json holds, per shipped recipe run on a tiny llama, a fingerprint of
every tensor of the compressed model (shape, dtype, sum, sum of squares and a projection on a
fixed random vector) and the module specs. It was written by the code *before* the move to one
driver with method plug-ins (issue 20), so a refactor that changes any result fails here. When a
change is meant to change results, rewrite it and say so in the commit:

    python tests/test_recipes_unchanged.py --write
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import byte_tokenizer, tiny_model  # noqa: E402

from compressor import recipe  # noqa: E402
from compressor.api import compress  # noqa: E402

FINGERPRINTS = Path(__file__).with_name("recipe_fingerprints.json")
CALIB = dict(samples=4, seq_len=32, device="cpu")


# Paths of the driver no shipped recipe takes: (shipped base, calibration changes, stage changes by method).
VARIANTS = {
    "variant:true-sequential": ("whiten30-gptq4-eora", {"true_sequential": True}, {}),
    "variant:eora-merge": ("whiten", {}, {"eora": {"method": "eora", "rank": 4, "merge": True}}),
    "variant:eora-per-type": ("gptq4-eora32", {}, {"eora": {"method": "eora", "rank": 8, "sequential": False, "rank_allocation": "per-type",
                                                             "weighting": "loss-full"}}),
    "variant:eora-bits": ("welore30-gptq4-eora", {}, {"eora": {"method": "eora", "rank": 8, "bits": 4, "group_size": 32}}),
    "variant:gptq-static-groups": ("gptq4", {}, {"gptq": {"method": "gptq", "bits": 3, "group_size": 32, "act_order": True, "static_groups": True}}),
    "variant:rtn-lowrank": ("svd", {}, {"rtn": {"method": "rtn", "bits": 8, "group_size": -1}}),
}
NAMES = recipe.shipped() + sorted(VARIANTS)


def _recipe(name: str) -> recipe.Recipe:
    """The shipped recipe (or variant) with a GPTQ group size the tiny model's 64/96-wide layers allow."""
    base, calibration, stages = VARIANTS.get(name, (name, {}, {}))
    stages = copy.deepcopy(stages)  # popped below: the table must stay as written for the next caller
    data = recipe.load(base).to_dict()
    data["calibration"].update(calibration)
    data["stages"] = [stages.pop(s["method"], s) for s in data["stages"]] + list(stages.values())
    for stage in data["stages"]:
        if "group_size" in stage and stage["group_size"] not in (-1, None):
            stage["group_size"] = 32
    return recipe.from_dict(data, source=name)


def _probe(n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)


def fingerprint(name: str) -> dict:
    # One thread: reductions split over threads round differently, and an eigenvector's sign
    # (so an adapter factor's) can follow that.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fingerprint(name)
    finally:
        torch.set_num_threads(threads)


def _fingerprint(name: str) -> dict:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        result = compress(tiny_model("llama"), _recipe(name), out, tokenizer=byte_tokenizer(), **CALIB)
        config = json.loads((out / "config.json").read_text())
        files = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    tensors = {}
    for key, t in result.model.state_dict().items():
        flat = t.detach().reshape(-1).to(torch.float64)
        tensors[key] = {
            "shape": list(t.shape),
            "dtype": str(t.dtype),
            "sum": float(flat.sum()),
            "sumsq": float(flat.square().sum()),
            "probe": float(flat @ _probe(flat.numel())),
        }
    modules = {n: s for n, s in sorted(result.report["per_module"].items())}
    report = {k: result.report.get(k) for k in ("adapters", "quantization", "structured", "bits_per_dense_weight", "params_after")}
    return {"tensors": tensors, "per_module": modules, "linear_params_after": result.report["linear_params_after"],
            "compression": config["compression"], "quantization_config": config.get("quantization_config"), "report": report, "files": files}


@pytest.mark.parametrize("name", NAMES)
def test_shipped_recipe_output_is_unchanged(name):
    stored = json.loads(FINGERPRINTS.read_text())
    assert name in stored, f"{name} has no stored fingerprint; run python tests/test_recipes_unchanged.py --write"
    want, got = stored[name], fingerprint(name)
    assert got["per_module"] == want["per_module"]
    assert got["linear_params_after"] == want["linear_params_after"]
    assert got["files"] == want["files"]
    assert got["compression"] == want["compression"]
    assert got["quantization_config"] == want["quantization_config"]
    assert json.dumps(got["report"], sort_keys=True) == json.dumps(want["report"], sort_keys=True)
    assert sorted(got["tensors"]) == sorted(want["tensors"])
    for key, w in want["tensors"].items():
        g = got["tensors"][key]
        assert (g["shape"], g["dtype"]) == (w["shape"], w["dtype"]), key
        for stat in ("sum", "sumsq", "probe"):
            if w["dtype"].startswith("torch.int"):
                assert g[stat] == w[stat], (key, stat)  # packed codes: one flipped code changes these
            else:
                assert g[stat] == pytest.approx(w[stat], rel=1e-5, abs=1e-6 * max(1.0, w["sumsq"]) ** 0.5), (key, stat)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_recipes_unchanged.py --write")
    FINGERPRINTS.write_text(json.dumps({n: fingerprint(n) for n in NAMES}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {FINGERPRINTS}")
