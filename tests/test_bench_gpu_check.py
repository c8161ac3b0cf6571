"""Keeps the prepared GPU check (benchmarks/gpu_check.sh, docs/guides/gpu.md) from rotting: its CPU-sized
variant runs every step on tiny shapes, and the report has every step with sane figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def strict(text: str) -> dict:
    def refuse(name):
        raise ValueError(f"{name} in gpu_check.json")

    return json.loads(text, parse_constant=refuse)


def run(args, out: Path, timeout: float):
    env = {**os.environ, "OUT": str(out)}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_variant_reports_every_step(tmp_path):
    out = tmp_path / "out"
    proc = run(["bash", "benchmarks/gpu_check.sh", "--cpu-quick"], out, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "wrote" in proc.stdout and "target" in proc.stdout  # the printed table
    report = strict((out / "gpu_check.json").read_text())
    assert report["mode"] == "quick" and report["device"] == "cpu" and report["torch"]
    assert set(report["steps"]) == {"pytest", "decompose", "compress", "structured"}
    for name, step in report["steps"].items():
        assert step["status"] == "ok", (name, step.get("reason"), step.get("log_tail"))
        assert positive(step["duration_s"]) and (out / step["log"]).is_file()
    assert report["skipped"] == []

    p = report["steps"]["pytest"]["figures"]
    assert p["tests"] >= 1 and p["failed"] == 0 and p["errors"] == 0 and p["passed"] + p["skipped"] == p["tests"]
    assert p["summary"]

    d = report["steps"]["decompose"]["figures"]
    assert d["shape"]["matrices"] == 14 and d["naive_extrapolated"]
    assert positive(d["toolkit_s"]) and positive(d["naive_s"]) and positive(d["speedup"])
    # Accuracy against the exact truncation error of the generated spectra, both paths.
    assert 0 <= d["toolkit_max_excess"] < 1e-3 and 0 <= d["naive_max_excess"] < 1e-3

    c = report["steps"]["compress"]["figures"]
    assert not c["partial"] and positive(c["compress_wall_s"]) and positive(c["build_s"])
    assert 0.1 < c["achieved_linear_ratio"] < 0.35 and c["params_after"] < c["params"]
    assert set(c["speed"]) == {"dense", "0.2", "0.4"}
    # the new paths run here too: aligned ranks (128-wide matrices: step 8) and chunked Grams
    assert c["rank_alignment"]["aligned"] == 14 and c["rank_alignment"]["unaligned"] == [] and c["chunked_grams"]
    # where the time went, method-agnostic phases plus the stage's own, and the export
    split = c["time_split_s"]
    assert {"capture", "grams", "forward", "stage:whiten", "export"} <= set(split) and all(v >= 0 for v in split.values())
    assert positive(c["export_s"]) and c["compress_wall_s"] >= split["stage:whiten"]
    log = (out / report["steps"]["compress"]["log"]).read_text()
    assert "layer 0: whiten" in log and "layer 1: whiten" in log and "compressing (whiten): 2/2 layers" in log  # per-layer progress
    assert "  times: {" in log  # the running time split, there even when a step is killed
    for row in c["speed"].values():
        assert positive(row["prefill_tok_s"]) and positive(row["decode_tok_s"]) and positive(row["prefill_x_dense"])

    s = report["steps"]["structured"]["figures"]
    assert not s["partial"] and positive(s["compress_wall_s"])
    assert 0.1 < s["achieved_linear_ratio"] < 0.35 and s["intermediate_size_after"] < 352 and s["intermediate_size_after"] % 8 == 0
    assert s["mean_relative_output_error"] is not None and s["mean_relative_output_error"] >= 0
    assert set(s["speed"]) == {"dense", "structured"}  # whitened SVD's speed comes from the compress step
    assert {"grams", "stage:structured", "export"} <= set(s["time_split_s"]) and positive(s["export_s"])
    assert positive(s["vs_whitened_svd"]["prefill_x"]) and positive(s["vs_whitened_svd"]["decode_x"])

    names = {(t["step"], t["name"]) for t in report["targets"]}
    assert len(names) == 9
    # Tiny shapes say nothing about the targets: recorded, never judged.
    assert all(t["met"] is None for t in report["targets"]) and report["all_targets_met"] is None


def test_deadline_skips_steps_with_a_reason(tmp_path):
    out = tmp_path / "out"
    proc = run([sys.executable, "benchmarks/gpu_check.py", "--quick", "--device", "cpu", "--runner", "subprocess", "--deadline", "0"], out, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = strict((out / "gpu_check.json").read_text())
    assert [s["step"] for s in report["skipped"]] == ["pytest", "decompose", "compress", "structured"]
    assert all("deadline" in s["reason"] for s in report["skipped"])
