"""The comparison figure: bars per metric, and each metric against size on disk."""

import pytest

from compressor.eval import plots

pytestmark = pytest.mark.skipif(not plots.available(), reason="matplotlib not installed")


def table(sizes):
    rows = [{"label": f"m{i}", "parameters": 1000 - i, "disk_bytes": size, "metrics": {"code_ppl/ppl": 10.0 + i}} for i, size in enumerate(sizes)]
    return {"metrics": [{"key": "code_ppl/ppl", "label": "code_ppl", "lower_is_better": True}], "rows": rows}


@pytest.mark.parametrize("sizes,scatter", [([5e8, 4e8, 3e8], True), ([5e8, None, None], False)])
def test_size_panel_only_when_sizes_are_known(tmp_path, monkeypatch, sizes, scatter):
    drawn = {}
    real = plots._save

    def keep(fig, path):
        drawn["titles"] = [ax.get_title() for ax in fig.axes if ax.get_visible()]
        drawn["notes"] = [t.get_text() for ax in fig.axes for t in ax.texts]
        return real(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    path = plots.comparison(table(sizes), tmp_path / "cmp.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ("code_ppl against size" in drawn["titles"]) is scatter
    if scatter:
        assert "m1\n11" in drawn["notes"] and "m2\n12" in drawn["notes"]  # each point says its value
