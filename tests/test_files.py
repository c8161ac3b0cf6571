"""compressor/files.py: atomic writes."""

import json

import pytest

from compressor import files


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "sub" / "r.json"
    files.write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        files.write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}  # the old file survives a failed write
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]
