"""benchmarks/gap.py: the gap shares it reports are (plain - adapted) / (plain - dense) against the
plain GPTQ row of the same seed, and results of different machines are never compared."""

import json
import math
import sys

import pytest
from conftest import load_benchmark


def _walk(path, seed, rows, sequential=False, machine="AMD EPYC", refine=0, windows=None, dense=10.0):
    """A quant.py result file; windows: variant -> per-window NLL (dense under "dense fp32")."""
    data = {"model": "demo", "bits": 4, "group_size": 128, "act_order": True, "eora_sequential": sequential, "eora_propagation": 0.25 if sequential else 0.0,
            "eora_refine": refine, "calibration": {"dataset": "code", "samples": 64, "seq_len": 512, "seed": seed, "true_sequential": False},
            "eval": {"tasks": ["code_ppl"], "seq_len": 512, "limit_windows": 16}, "host": {"cpu": machine},
            "rows": [{"variant": "dense fp32", "code_ppl": dense}] + [{"variant": v, "code_ppl": p} for v, p in rows]}
    for row in data["rows"]:
        if windows and row["variant"] in windows:
            row["window_nll"] = {"code_ppl": windows[row["variant"]]}
    path.write_text(json.dumps(data))
    return path


def test_gap_shares_mean_and_grouping(tmp_path, monkeypatch, capsys):
    gap = load_benchmark("gap")
    files = [
        _walk(tmp_path / "a.json", 0, [("GPTQ w4 (ours)", 14.0), ("GPTQ w4 + EoRA r32", 12.0)]),
        _walk(tmp_path / "b.json", 1, [("GPTQ w4 (ours)", 12.0), ("GPTQ w4 + EoRA r32", 11.5)]),
        # a sequential walk's base is no plain GPTQ: only its adapted row counts, against a.json's plain row
        _walk(tmp_path / "c.json", 0, [("GPTQ w4 (EoRA-sequential walk) (ours)", 99.0), ("GPTQ w4 (EoRA-sequential walk) + EoRA, refine 4 r32", 11.0)],
              sequential=True, refine=4),
        # another machine: its own table, never against the first machine's plain rows
        _walk(tmp_path / "d.json", 0, [("GPTQ w4 + EoRA r32", 10.5)], machine="other CPU"),
    ]
    groups = list(gap.collect(files, "code_ppl").values())
    assert len(groups) == 2
    rows = {r["variant"]: r for r in gap.summarise(groups[0])}
    assert rows["EoRA r32"]["seeds"][0]["gap_closed"] == pytest.approx(0.5)
    assert rows["EoRA r32"]["seeds"][1]["gap_closed"] == pytest.approx(0.25)
    assert rows["EoRA r32"]["mean_gap_closed"] == pytest.approx(0.375)
    assert rows["EoRA r32"]["standard_error"] == pytest.approx(0.125)
    assert rows["EoRA r32"]["at_least_half"] == 1
    assert rows["EoRA, refine 4 r32"]["seeds"] == {0: {"ppl": 11.0, "gap_closed": pytest.approx(0.75)}}
    assert gap.summarise(groups[1]) == []  # no plain GPTQ row on that machine

    out = tmp_path / "gap.json"
    monkeypatch.setattr(sys, "argv", ["gap.py", *map(str, files), "--json", str(out)])
    gap.main()
    assert "| EoRA r32 | 12.00 (50 %) | 11.50 (25 %) | 38 % ± 12 | 1 of 2 |" in capsys.readouterr().out
    assert len(json.loads(out.read_text())) == 1


def test_bootstrap_over_windows(tmp_path):
    """The interval is over resamples of the evaluation windows, scored per token: where every window
    moves alike it collapses onto the point estimate; where windows disagree it brackets it."""
    gap = load_benchmark("gap")
    alike = gap.bootstrap([511 * 2.0] * 8, [([511 * 2.2] * 8, [511 * 2.1] * 8)], tokens=511)
    expected = (math.exp(2.2) - math.exp(2.1)) / (math.exp(2.2) - math.exp(2.0))
    assert alike == pytest.approx((expected, expected))
    dense = [511 * (2.0 + 0.1 * (i % 3)) for i in range(12)]
    plain = [d + 511 * 0.2 for d in dense]
    adapted = [p - 511 * (0.05 + 0.1 * (i % 2)) for i, p in enumerate(plain)]
    low, high = gap.bootstrap(dense, [(plain, adapted)], tokens=511)
    ppl = lambda nll: math.exp(sum(nll) / (12 * 511))  # noqa: E731
    files = [_walk(tmp_path / "a.json", 0, [("GPTQ w4 (ours)", ppl(plain)), ("GPTQ w4 + EoRA r32", ppl(adapted))], dense=ppl(dense),
                   windows={"dense fp32": dense, "GPTQ w4 (ours)": plain, "GPTQ w4 + EoRA r32": adapted})]
    group = next(iter(gap.collect(files, "code_ppl").values()))
    found = gap.summarise(group)[0]["seeds"][0]
    assert found["interval_over_windows"] == (low, high)
    assert low < found["gap_closed"] < high and high - low > 0.05


def test_mean_interval_over_windows(tmp_path):
    """With several seeds evaluated on the same windows, the mean's interval resamples the windows
    once for all seeds: it brackets the mean, and where one seed's adapters help exactly where the
    other's hurt, the two move against each other and the mean's interval is narrower than either's."""
    gap = load_benchmark("gap")
    n, tok = 12, 511
    dense = [tok * (2.0 + 0.1 * (i % 3)) for i in range(n)]
    plain = [d + tok * 0.2 for d in dense]
    swing = [0.05 * (1 if i % 2 else -1) for i in range(n)]
    adapted = {s: [p - tok * (0.1 + sign * x) for p, x in zip(plain, swing)] for s, sign in ((0, 1), (1, -1))}
    ppl = lambda nll: math.exp(sum(nll) / (n * tok))  # noqa: E731
    files = [_walk(tmp_path / f"{s}.json", s, [("GPTQ w4 (ours)", ppl(plain)), ("GPTQ w4 + EoRA r32", ppl(adapted[s]))], dense=ppl(dense),
                   windows={"dense fp32": dense, "GPTQ w4 (ours)": plain, "GPTQ w4 + EoRA r32": adapted[s]}) for s in (0, 1)]
    row = gap.summarise(next(iter(gap.collect(files, "code_ppl").values())))[0]
    low, high = row["mean_interval_over_windows"]
    assert low <= row["mean_gap_closed"] <= high
    for cell in row["seeds"].values():
        seed_low, seed_high = cell["interval_over_windows"]
        assert high - low < 0.5 * (seed_high - seed_low)
    # a seed without per-window losses: no interval for the mean either
    data = json.loads(files[1].read_text())
    for r in data["rows"]:
        r.pop("window_nll", None)
    files[1].write_text(json.dumps(data))
    row = gap.summarise(next(iter(gap.collect(files, "code_ppl").values())))[0]
    assert "mean_interval_over_windows" not in row
