import gzip
import json
from pathlib import Path

import pytest

from compressor import datasets
from compressor.errors import CompressorError


def _write_jsonl(path: Path, records: list[dict], gz: bool = False) -> Path:
    body = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(body)
    else:
        path.write_text(body, encoding="utf-8")
    return path


def test_shipped_names_cover_each_language_file():
    names = datasets.shipped_calib_names()
    assert names[0] == "code"
    assert {"python", "c", "javascript", "shell"} <= set(names)
    for name in names[1:]:
        assert (datasets.calib_dir() / f"{name}.jsonl").is_file()


def test_shipped_records_have_text_source_license():
    for p in sorted(datasets.calib_dir().glob("*.jsonl")):
        for line in p.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            assert rec["text"].strip() and rec["source"] and rec["license"]


def test_code_interleaves_languages_deterministically():
    langs = datasets.shipped_calib_names()[1:]
    per_lang = {n: datasets.load_texts(n) for n in langs}
    mixed = datasets.load_texts("code")
    assert mixed == datasets.load_texts("code")
    assert len(mixed) == sum(map(len, per_lang.values()))
    # The first round takes the first file of every language, in name order.
    assert mixed[: len(langs)] == [per_lang[n][0] for n in langs]


def test_python_set_size():
    assert len(datasets.load_texts("python")) >= 35


def test_folder(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    return 1\n")
    (tmp_path / "b.c").write_text("int main(void) { return 0; }\n")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00junk")
    (tmp_path / "latin1.py").write_bytes("x = 'caf\xe9'\n".encode("latin-1"))
    (tmp_path / "empty.md").write_text("")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.py").write_text("hidden = 1\n")
    assert datasets.load_texts(str(tmp_path)) == ["int main(void) { return 0; }\n", "def f():\n    return 1\n"]


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x00")
    with pytest.raises(CompressorError, match="no text"):
        datasets.load_texts(str(tmp_path))


def test_txt_file(tmp_path):
    p = tmp_path / "one.txt"
    p.write_text("hello\nworld\n")
    assert datasets.load_texts(str(p)) == ["hello\nworld\n"]


def test_jsonl_fields_and_fallbacks(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"content": "b"}, {"code": "c", "x": 1}])
    assert datasets.load_texts(str(p)) == ["a", "b", "c"]


def test_jsonl_gz(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl.gz", [{"text": "x = 1"}, {"text": "y = 2"}], gz=True)
    assert datasets.load_texts(str(p)) == ["x = 1", "y = 2"]


def test_jsonl_without_text_field_is_an_error(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"body": "no"}])
    with pytest.raises(CompressorError, match="line 2 .*text"):
        datasets.load_texts(str(p))


def test_jsonl_invalid_json_is_an_error(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(CompressorError, match="line 2"):
        datasets.load_texts(str(p))


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(CompressorError, match="does not exist"):
        datasets.load_texts(str(tmp_path / "nope.jsonl"))


def test_unknown_name_is_an_error():
    with pytest.raises(CompressorError, match="unknown calibration set"):
        datasets.load_texts("klingon")


def test_unsupported_file_type_is_an_error(tmp_path):
    p = tmp_path / "data.parquet"
    p.write_bytes(b"PAR1")
    with pytest.raises(CompressorError, match="cannot read"):
        datasets.load_texts(str(p))


def test_messages_are_one_line(tmp_path):
    for spec in [str(tmp_path / "missing"), "klingon", ""]:
        with pytest.raises(CompressorError) as e:
            datasets.load_texts(spec)
        assert "\n" not in str(e.value)


def test_heldout_code_is_disjoint_from_calibration():
    calib_sources, calib_texts = set(), []
    for p in datasets.calib_dir().glob("*.jsonl"):
        for line in p.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            calib_sources.add(rec["source"])
            calib_texts.append(rec["text"])
    heldout_sources = (datasets.DATA_DIR / "code_heldout_sources.txt").read_text().split()
    assert heldout_sources and not set(heldout_sources) & calib_sources
    # Sources could be renamed; the contents must not overlap either.
    heldout = datasets.eval_text("code")
    assert 300_000 <= len(heldout.encode()) <= 500_000
    assert not any(t in heldout for t in calib_texts)


def test_wikitext_is_the_raw_file():
    text = datasets.eval_text("wikitext2")
    raw = (datasets.DATA_DIR / "wikitext2_test.txt").read_bytes()
    assert text == raw.decode("utf-8").replace("\r\n", "\n")
    assert "\r" not in text
    assert text.lstrip().startswith("= Robert Boulter =")


def test_unknown_eval_text_is_an_error():
    with pytest.raises(CompressorError, match="unknown evaluation text"):
        datasets.eval_text("c4")


def test_humaneval_has_164_problems():
    problems = datasets.humaneval_problems()
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0"
    assert {"prompt", "entry_point", "canonical_solution", "test"} <= set(problems[0])
