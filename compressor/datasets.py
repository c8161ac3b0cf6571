"""Calibration and evaluation texts: the shipped sets, or the user's own files."""

from __future__ import annotations

import codecs
import gzip
import json
from pathlib import Path

from compressor.errors import CompressorError
from compressor.files import input_file


def shipped_dir(name: str) -> Path:
    """compressor/<name> in an installed package (setup.cfg maps the top-level folder there), else
    the top-level <name>/ of a source checkout."""
    here = Path(__file__).resolve().parent
    installed = here / name
    return installed if installed.is_dir() else here.parent / name


DATA_DIR = Path(__file__).resolve().parent / "data"
CALIB_DIR = shipped_dir("calib_data")

SOURCE_SUFFIXES = {".py", ".c", ".h", ".js", ".ts", ".java", ".go", ".rs", ".cpp", ".sh", ".md", ".txt"}
TEXT_FIELDS = ("text", "content", "code")
EVAL_FILES = {"wikitext2": "wikitext2_test.txt", "code": "code_heldout.txt"}


def calib_dir() -> Path:
    if not CALIB_DIR.is_dir():
        raise CompressorError(
            f"shipped calibration data not found at {CALIB_DIR}; reinstall compressor or pass your own "
            "calibration path (a folder, .txt, .jsonl or .jsonl.gz)"
        )
    return CALIB_DIR


def shipped_calib_names() -> list[str]:
    """The name "code" (all languages mixed), then one name per calib_data/<name>.jsonl."""
    return ["code", *sorted(p.name[: -len(".jsonl")] for p in calib_dir().glob("*.jsonl"))]


def load_texts(spec: str, max_chars: int | None = None) -> list[str]:
    """Texts for calibration from a shipped name or a path (folder, .txt, .jsonl, .jsonl.gz).

    A shipped name wins over a same-named path in the working directory, so a recipe means the
    same data everywhere; write "./code" to use a local folder called code. max_chars: read at most
    about this many characters from each file (limits.text_budget), so a huge file costs what the
    windows use, not its size. Only regular files and folders are read (a FIFO would block).
    """
    if not spec.strip():
        raise CompressorError("empty calibration spec; give a shipped set name or a path")
    is_name = "/" not in spec and "\\" not in spec and not Path(spec).suffix
    if is_name and (spec == "code" and CALIB_DIR.is_dir() or (CALIB_DIR / f"{spec}.jsonl").is_file()):
        if spec == "code":
            return _interleave([_read_jsonl(CALIB_DIR / f"{n}.jsonl", max_chars) for n in shipped_calib_names()[1:]])
        return _read_jsonl(CALIB_DIR / f"{spec}.jsonl", max_chars)
    path = Path(spec).expanduser()
    if path.exists():
        return _load_path(input_file(path, "calibration path"), max_chars)
    if is_name:
        raise CompressorError(
            f"unknown calibration set {spec!r}; use one of {', '.join(shipped_calib_names())} "
            "or a path to your own data"
        )
    raise CompressorError(f"calibration path {spec} does not exist; check the path")


def eval_text(name: str) -> str:
    """Full text of a shipped evaluation file: "wikitext2" or "code" (held-out code)."""
    if name not in EVAL_FILES:
        raise CompressorError(f"unknown evaluation text {name!r}; use one of {', '.join(EVAL_FILES)}")
    path = DATA_DIR / EVAL_FILES[name]
    if not path.is_file():
        raise CompressorError(f"evaluation file {path} is missing; reinstall compressor")
    # Text mode turns the shipped WikiText copy's CRLF line ends into "\n", so callers that
    # split on "\n" get clean lines; nothing else is changed.
    return path.read_text(encoding="utf-8")


def humaneval_problems() -> list[dict]:
    """The 164 HumanEval problems (task_id, prompt, entry_point, canonical_solution, test)."""
    path = DATA_DIR / "humaneval.jsonl.gz"
    if not path.is_file():
        raise CompressorError(f"HumanEval file {path} is missing; reinstall compressor")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _load_path(path: Path, max_chars: int | None = None) -> list[str]:
    name = path.name.lower()
    if path.is_dir():
        texts = _read_folder(path, max_chars)
    elif name.endswith((".jsonl", ".jsonl.gz")):
        texts = _read_jsonl(path, max_chars)
    elif path.suffix.lower() in SOURCE_SUFFIXES:
        texts = [_read_text(path, max_chars)]
    else:
        raise CompressorError(
            f"cannot read calibration file {path}: use a folder, .txt, .jsonl or .jsonl.gz "
            f"(or a source file: {' '.join(sorted(SOURCE_SUFFIXES))})"
        )
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CompressorError(f"no text found in {path}; point to files with content")
    return texts


def _read_text(path: Path, max_chars: int | None = None) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(-1 if max_chars is None else max_chars)
    except UnicodeDecodeError:
        raise CompressorError(f"{path} is not UTF-8 text; convert it to UTF-8") from None


def _read_folder(root: Path, max_chars: int | None = None) -> list[str]:
    texts, have = [], 0
    # Sorted walk so the same folder always gives the same calibration order.
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).parts
        if any(part.startswith(".") or part in ("__pycache__", "node_modules") for part in rel):
            continue
        if not p.is_file() or p.suffix.lower() not in SOURCE_SUFFIXES:  # is_file(): FIFOs and devices are skipped
            continue
        with open(p, "rb") as f:
            # UTF-8 spends at most 4 bytes per character; the decoder below drops a character cut in two.
            data = f.read(-1 if max_chars is None else 4 * (max_chars - have))
        if b"\0" in data[:8192]:
            continue
        try:
            text = codecs.getincrementaldecoder("utf-8")().decode(data, final=max_chars is None)
        except UnicodeDecodeError:
            continue
        texts.append(text if max_chars is None else text[: max_chars - have])
        have += len(texts[-1])
        if max_chars is not None and have >= max_chars:
            break
    return texts


def _read_jsonl(path: Path, max_chars: int | None = None) -> list[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    texts, have = [], 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise CompressorError(f"{path} line {n} is not valid JSON; write one JSON object per line") from None
                field = next((k for k in TEXT_FIELDS if isinstance(rec, dict) and isinstance(rec.get(k), str)), None)
                if field is None:
                    raise CompressorError(
                        f"{path} line {n} has no string field {', '.join(TEXT_FIELDS)}; put each text under \"text\""
                    )
                texts.append(rec[field])
                have += len(rec[field])
                if max_chars is not None and have >= max_chars:
                    break
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise CompressorError(f"cannot read {path} ({e}); use UTF-8 JSONL, gzip-compressed only if named .gz") from None
    return texts


def _interleave(groups: list[list[str]]) -> list[str]:
    # Round-robin so any prefix of the list (a small calibration budget) covers every language.
    out = []
    for i in range(max(map(len, groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out
