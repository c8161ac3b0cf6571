"""Keeps benchmarks/bench_decompose.py from rotting: its quick mode on a tiny shape."""

import json

from conftest import load_benchmark


def test_quick_mode_on_tiny_shape(tmp_path, capsys):
    bench = load_benchmark("bench_decompose")
    args = ["--device", "cpu", "--quick", "--hidden", "64", "--intermediate", "160", "--layers", "2", "--naive-layers", "1",
            "--algorithms", "auto,gram", "--rank-fraction", "0.25", "--out", str(tmp_path)]
    bench.main(args)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("SUMMARY bench_decompose") and "x (excess" in lines[-1]
    result = json.loads((tmp_path / "bench_decompose_cpu_quick.json").read_text())
    assert result["matrices"] == 14 and result["naive_extrapolated"]
    for scenario in result["scenarios"].values():
        for algo in scenario["algorithms"].values():
            # Against the closed-form exact error of the generated spectra.
            assert algo["max_excess"] < 1e-3
