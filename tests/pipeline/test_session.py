"""One run from source to sink: fresh stages per run, and the report assembled from the stages."""

from __future__ import annotations

import json

import torch
from conftest import byte_tokenizer, tiny_model

from compressor import recipe as recipes
from compressor.api import compress

CALIB = dict(samples=4, seq_len=32, device="cpu")
RECIPE = {"stages": [{"method": "structured", "ratio": 0.2}, {"method": "gptq", "bits": 4, "group_size": 32},
                     {"method": "eora", "rank": 4, "sequential": False}]}


def test_a_recipe_used_twice_gives_the_same_result_and_keeps_no_run_state(tmp_path):
    rec = recipes.from_dict(RECIPE)
    torch.set_num_threads(1)
    first = compress(tiny_model("llama"), rec, tmp_path / "a", tokenizer=byte_tokenizer(), **CALIB)
    second = compress(tiny_model("llama"), rec, tmp_path / "b", tokenizer=byte_tokenizer(), **CALIB)
    a, b = first.model.state_dict(), second.model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("per_module", "structured", "adapters", "quantization", "actions"):
        assert first.report[key] == second.report[key], key
    # The recipe's own stages only describe it: every run got fresh ones.
    structured, gptq, eora = rec.stages
    assert structured.done == {} and eora.ranks == {} and eora.deferred == [] and eora.fitted == {}
    assert json.loads((tmp_path / "a" / "config.json").read_text())["compression"] == json.loads((tmp_path / "b" / "config.json").read_text())["compression"]


def test_the_report_is_the_stages_entries_around_common_facts():
    rec = recipes.from_dict(RECIPE)
    report = compress(tiny_model("llama"), rec, tokenizer=byte_tokenizer(), **CALIB).report
    assert report["method"] == "structured+gptq+eora"
    assert {"structured", "quantization", "adapters"} <= set(report)
    assert len(report["actions"]) == 3 and report["actions"][0].startswith("MLP width 96 -> ")
    assert 0 < report["achieved_linear_ratio"] < 1 and report["linear_params_after"] < report["linear_params_before"]
