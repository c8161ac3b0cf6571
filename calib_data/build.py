"""Rebuild the shipped calibration set, the held-out code text and their provenance docs.

Everything is read from software already installed on the build machine; nothing is downloaded.
Run from the repository root:

    python calib_data/build.py

Writes:
    calib_data/{python,c,javascript,shell}.jsonl   one {"text", "source", "license"} object per line
    calib_data/LICENSE-PSF.txt, calib_data/licenses/*
    calib_data/PROVENANCE.md
    compressor/data/code_heldout.txt, compressor/data/code_heldout_sources.txt
    compressor/data/wikitext2_test.txt, LICENSE-wikitext.txt   (from --wikitext)
    compressor/data/humaneval.jsonl.gz, LICENSE-humaneval.txt  (from --humaneval)
    compressor/data/README.md

The inputs were: CPython 3.11.7 (pyenv build), npm 11.19.1 bundled with Node.js 20.20.2 (Debian
/usr/lib/node_modules/npm), pyenv 2.6.30, markupsafe 3.0.3, lazy-object-proxy 1.12.0. Other
versions still build, with a warning, but the output will differ; PROVENANCE.md records the
sha256 of every input file so a rebuild can be compared.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CALIB = ROOT / "calib_data"
DATA = ROOT / "compressor" / "data"

STDLIB = Path(sysconfig.get_paths()["stdlib"])
PY_INCLUDE = Path(sysconfig.get_paths()["include"])
PY_PREFIX = Path(sys.base_prefix)
SITE = Path(sysconfig.get_paths()["purelib"])
PY_VERSION = "%d.%d.%d" % sys.version_info[:3]
NPM = Path("/usr/lib/node_modules/npm")
PYENV = Path.home() / ".pyenv"

# Calibration Python: a spread of styles (algorithms, parsers, OO, async, tests, text munging).
PY_CALIB = """
bisect.py colorsys.py reprlib.py fnmatch.py sched.py abc.py getopt.py hmac.py copy.py glob.py
graphlib.py numbers.py queue.py string.py shlex.py timeit.py cmd.py csv.py posixpath.py
selectors.py base64.py weakref.py heapq.py pprint.py contextlib.py fractions.py tempfile.py
random.py functools.py json/decoder.py json/encoder.py asyncio/locks.py
concurrent/futures/_base.py urllib/parse.py http/cookies.py unittest/case.py email/utils.py
xml/etree/ElementPath.py html/__init__.py sqlite3/dump.py
""".split()

# Held-out Python for code perplexity; must share no file with PY_CALIB (checked below).
PY_HELDOUT = """
argparse.py difflib.py shutil.py pathlib.py statistics.py gzip.py textwrap.py calendar.py
json/__init__.py
""".split()

PY_C_HEADERS = """
object.h cpython/object.h cpython/unicodeobject.h cpython/abstract.h internal/pycore_code.h
internal/pycore_object.h internal/pycore_frame.h internal/pycore_bitutils.h
internal/pycore_blocks_output_buffer.h internal/pycore_pymath.h internal/pycore_pystate.h
internal/pycore_ceval.h internal/pycore_dict.h
""".split()

NPM_LIB = "lib/npm.js lib/utils/display.js lib/commands/ls.js".split()

# npm's bundled dependencies: hand-written (not transpiled) CommonJS under ISC or MIT only.
NPM_DEPS = {
    "semver": """classes/semver.js classes/range.js classes/comparator.js ranges/subset.js
                 internal/re.js ranges/outside.js ranges/min-version.js functions/coerce.js""",
    "ini": "lib/ini.js",
    "nopt": "lib/nopt-lib.js",
    "graceful-fs": "graceful-fs.js polyfills.js",
    "hosted-git-info": "lib/hosts.js lib/from-url.js lib/index.js",
    "npm-package-arg": "lib/npa.js",
    "jsonparse": "jsonparse.js",
    "debug": "src/common.js src/node.js",
    "ms": "index.js",
    "text-table": "index.js",
}

PYENV_SHELL = [f"libexec/{p.name}" for p in sorted((PYENV / "libexec").glob("pyenv*"))] + [
    "plugins/python-build/bin/pyenv-install",
    "plugins/python-build/bin/pyenv-uninstall",
    "pyenv.d/exec/pip-rehash.bash",
    "pyenv.d/rehash/conda.bash",
    "pyenv.d/rehash/source.bash",
    "pyenv.d/install/latest.bash",
    "completions/pyenv.bash",
    "completions/pyenv.zsh",
]


@dataclass
class Group:
    language: str
    package: str
    version: str
    root: Path
    spdx: str
    license_file: Path
    license_copy: str  # where the licence text is kept, relative to calib_data/
    files: list[str]
    prefix: str = ""  # start of each `source`; default <package>-<version>

    def source(self, rel: str) -> str:
        return f"{self.prefix or f'{self.package}-{self.version}'}/{rel}"


def _pkg_json_version(d: Path) -> str:
    return json.loads((d / "package.json").read_text())["version"]


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def _pyenv_version() -> str:
    for line in (PYENV / "libexec" / "pyenv---version").read_text().splitlines():
        if line.startswith("version="):
            return line.split("=", 1)[1].strip('"')
    raise SystemExit("cannot read the pyenv version")


def _first_license(d: Path) -> Path:
    for p in sorted(d.iterdir()):
        if p.name.lower().startswith("licen"):
            return p
    raise SystemExit(f"no licence file in {d}")


def groups() -> list[Group]:
    psf = STDLIB / "LICENSE.txt"
    stdlib_rel = STDLIB.relative_to(PY_PREFIX)
    include_rel = PY_INCLUDE.relative_to(PY_PREFIX)
    out = [
        Group("python", "cpython", PY_VERSION, PY_PREFIX, "PSF-2.0", psf, "LICENSE-PSF.txt",
              [f"{stdlib_rel}/{f}" for f in PY_CALIB]),
        Group("c", "cpython", PY_VERSION, PY_PREFIX, "PSF-2.0", psf, "LICENSE-PSF.txt",
              [f"{include_rel}/{f}" for f in PY_C_HEADERS]
              + [f"{stdlib_rel}/distutils/tests/xxmodule.c"]),
    ]
    for dist, mod, rel, spdx in [
        ("lazy-object-proxy", "lazy_object_proxy", "cext.c", "BSD-2-Clause"),
        ("markupsafe", "markupsafe", "_speedups.c", "BSD-3-Clause"),
    ]:
        ver = _dist_version(dist)
        info = SITE / f"{mod}-{ver}.dist-info" / "licenses"
        out.append(Group("c", dist, ver, SITE, spdx, _first_license(info),
                         f"licenses/{dist}-{ver}.txt", [f"{mod}/{rel}"]))
    npm_ver = _pkg_json_version(NPM)
    out.append(Group("javascript", "npm", npm_ver, NPM, "Artistic-2.0", NPM / "LICENSE",
                     f"licenses/npm-{npm_ver}.txt", NPM_LIB))
    for name, files in NPM_DEPS.items():
        d = NPM / "node_modules" / name
        ver = _pkg_json_version(d)
        spdx = json.loads((d / "package.json").read_text())["license"]
        assert spdx in ("ISC", "MIT"), (name, spdx)
        out.append(Group("javascript", name, ver, d, spdx, _first_license(d),
                         f"licenses/{name}-{ver}.txt", files.split(),
                         prefix=f"npm-{npm_ver}/node_modules/{name}"))
    ver = _pyenv_version()
    out.append(Group("shell", "pyenv", ver, PYENV, "MIT", PYENV / "LICENSE",
                     f"licenses/pyenv-{ver}.txt", PYENV_SHELL))
    return out


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_source(path: Path) -> str:
    if not path.is_file():
        raise SystemExit(f"missing input {path}: install the package it belongs to, or edit the lists in build.py")
    return path.read_bytes().decode("utf-8")


def build_calib() -> tuple[list[dict], set[str]]:
    if PY_VERSION != "3.11.7":
        print(f"warning: building from Python {PY_VERSION}, not 3.11.7; output will differ", file=sys.stderr)
    rows: list[dict] = []
    by_lang: dict[str, list[str]] = {}
    licences: dict[str, Path] = {}
    for g in groups():
        licences[g.license_copy] = g.license_file
        for rel in g.files:
            path = g.root / rel
            text = read_source(path)
            rec = {"text": text, "source": g.source(rel), "license": g.spdx}
            by_lang.setdefault(g.language, []).append(json.dumps(rec, ensure_ascii=False))
            rows.append({"language": g.language, "source": rec["source"], "package": g.package,
                         "version": g.version, "path": str(path), "license": g.spdx,
                         "license_copy": g.license_copy, "bytes": len(text.encode()),
                         "sha256": sha256(path.read_bytes())})
    for old in CALIB.glob("*.jsonl"):
        old.unlink()
    for lang, lines in by_lang.items():
        (CALIB / f"{lang}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    lic_dir = CALIB / "licenses"
    if lic_dir.exists():
        shutil.rmtree(lic_dir)
    lic_dir.mkdir()
    for dest, src in licences.items():
        shutil.copyfile(src, CALIB / dest)
    return rows, {r["source"] for r in rows}


def build_heldout(calib_sources: set[str]) -> list[dict]:
    stdlib_rel = STDLIB.relative_to(PY_PREFIX)
    overlap = set(PY_CALIB) & set(PY_HELDOUT)
    assert not overlap, f"held-out files also in calibration: {overlap}"
    rows, texts = [], []
    for f in PY_HELDOUT:
        path = STDLIB / f
        texts.append(read_source(path))
        source = f"cpython-{PY_VERSION}/{stdlib_rel}/{f}"
        assert source not in calib_sources
        rows.append({"source": source, "path": str(path), "license": "PSF-2.0",
                     "bytes": path.stat().st_size, "sha256": sha256(path.read_bytes())})
    (DATA / "code_heldout.txt").write_text("\n\n".join(texts), encoding="utf-8")
    (DATA / "code_heldout_sources.txt").write_text("".join(r["source"] + "\n" for r in rows))
    shutil.copyfile(STDLIB / "LICENSE.txt", DATA / "LICENSE-PSF.txt")
    return rows


WIKITEXT_NOTICE = """\
wikitext2_test.txt is wiki.test.raw from the WikiText-2 (raw) dataset, copied byte for byte.

Dataset: WikiText-2, "Pointer Sentinel Mixture Models", Stephen Merity, Caiming Xiong,
James Bradbury, Richard Socher (2016), arXiv:1609.07843. Published by Salesforce Research
(formerly MetaMind).
Text: extracted from verified Good and Featured articles on English Wikipedia.

Licence: Creative Commons Attribution-ShareAlike 3.0 Unported (CC BY-SA 3.0)
https://creativecommons.org/licenses/by-sa/3.0/
Attribution: the Wikipedia contributors of the source articles; dataset by Merity et al. /
Salesforce. This file is unmodified; any adaptation must be shared under the same licence.
"""


def copy_eval_data(wikitext: Path, humaneval: Path) -> None:
    shutil.copyfile(wikitext, DATA / "wikitext2_test.txt")
    (DATA / "LICENSE-wikitext.txt").write_text(WIKITEXT_NOTICE)
    shutil.copyfile(humaneval, DATA / "humaneval.jsonl.gz")
    shutil.copyfile(humaneval.parent / "LICENSE", DATA / "LICENSE-humaneval.txt")


def _sha(path: Path) -> str:
    return sha256(path.read_bytes())


def write_data_readme(heldout_rows: list[dict]) -> None:
    files = [
        ("wikitext2_test.txt", "WikiText-2 raw, test split (`wiki.test.raw`), byte-for-byte copy; "
         "Merity et al. 2016, Salesforce Research. This copy has CRLF line ends and "
         "no blank lines (2891 lines); `eval_text` reads it in text mode, so callers see \\n.", "CC-BY-SA-3.0",
         "LICENSE-wikitext.txt"),
        ("humaneval.jsonl.gz", "OpenAI HumanEval (`HumanEval.jsonl.gz`, 164 problems), byte-for-byte "
         "copy; Chen et al. 2021, https://github.com/openai/human-eval", "MIT", "LICENSE-humaneval.txt"),
        ("code_heldout.txt", f"CPython {PY_VERSION} standard-library modules listed in "
         "`code_heldout_sources.txt`, joined with a blank line (\"\\n\\n\"); none of them is in "
         "the calibration set (`calib_data/`). Built by `calib_data/build.py`.", "PSF-2.0",
         "LICENSE-PSF.txt"),
        ("code_heldout_sources.txt", "the origin of each part of `code_heldout.txt`, in order",
         "PSF-2.0", "LICENSE-PSF.txt"),
    ]
    lines = [
        "# compressor/data",
        "",
        "Evaluation data shipped inside the package (loaded by `compressor/datasets.py`).",
        "",
        "| file | bytes | source | licence | licence text | sha256 |",
        "|---|---|---|---|---|---|",
    ]
    for name, src, spdx, lic in files:
        p = DATA / name
        lines.append(f"| `{name}` | {p.stat().st_size} | {src} | {spdx} | `{lic}` | `{_sha(p)}` |")
    lines += ["", "Licence texts:", ""]
    for name in ("LICENSE-wikitext.txt", "LICENSE-humaneval.txt", "LICENSE-PSF.txt"):
        lines.append(f"- `{name}` sha256 `{_sha(DATA / name)}`")
    lines += ["", "Parts of `code_heldout.txt`, in order:", "",
              "| source | bytes | sha256 of the original file |", "|---|---|---|"]
    lines += [f"| `{r['source']}` | {r['bytes']} | `{r['sha256']}` |" for r in heldout_rows]
    (DATA / "README.md").write_text("\n".join(lines) + "\n")


def write_provenance(rows: list[dict], heldout_rows: list[dict]) -> None:
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip() or "unknown"
    lines = [
        "# Calibration data provenance",
        "",
        "Generated by `calib_data/build.py` (run `python calib_data/build.py` from the repository "
        "root to rebuild; it reads only files installed on the machine and downloads nothing).",
        "",
        "Each `<language>.jsonl` holds one JSON object per line: `text` (the whole file, unmodified, "
        "UTF-8), `source` (`<package>-<version>/<path inside the package>`; npm's bundled dependencies "
        "as `npm-<version>/node_modules/<name>/<path>`) and `license` (SPDX id).",
        "",
        "Inputs on the build machine:",
        "",
        f"- CPython {PY_VERSION} (pyenv build at `{PY_PREFIX}`): standard library and C headers, "
        "PSF-2.0, licence text `LICENSE-PSF.txt` (the install's `lib/python3.11/LICENSE.txt`).",
        f"- npm (bundled with Node.js {node}, `{NPM}`): npm's own `lib/` is Artistic-2.0; the bundled "
        "dependencies used are ISC or MIT, each per its `package.json` and licence file.",
        f"- pyenv (`{PYENV}`), MIT: bash scripts.",
        "- PyPI packages installed in the same Python: markupsafe (BSD-3-Clause), lazy-object-proxy "
        "(BSD-2-Clause): one C extension source file each.",
        "",
        "Every licence text is copied next to the data (`LICENSE-PSF.txt`, `licenses/`).",
        "",
    ]
    for lang in sorted({r["language"] for r in rows}):
        sub = [r for r in rows if r["language"] == lang]
        size = (CALIB / f"{lang}.jsonl").stat().st_size
        lines += [f"## {lang}.jsonl ({len(sub)} files, {size} bytes, sha256 "
                  f"`{_sha(CALIB / f'{lang}.jsonl')}`)", "",
                  "| source | package | version | original path | licence | licence text | bytes | sha256 |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| `{r['source']}` | {r['package']} | {r['version']} | `{r['path']}` | {r['license']} "
                  f"| `{r['license_copy']}` | {r['bytes']} | `{r['sha256']}` |" for r in sub]
        lines.append("")
    lines += [
        "## Held-out code (`compressor/data/code_heldout.txt`)",
        "",
        "CPython standard-library modules disjoint from the calibration files above (the build asserts "
        "it), joined with `\"\\n\\n\"`, used for code perplexity. Licence PSF-2.0.",
        "",
        "| source | original path | bytes | sha256 |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{r['source']}` | `{r['path']}` | {r['bytes']} | `{r['sha256']}` |" for r in heldout_rows]
    lines += [
        "",
        "## Evaluation data copied into `compressor/data/`",
        "",
        "- `wikitext2_test.txt`: `/work/shared/data/wikitext-2-raw/wiki.test.raw`, CC-BY-SA-3.0 "
        "(Merity et al. 2016, Salesforce), notice in `LICENSE-wikitext.txt`.",
        "- `humaneval.jsonl.gz`: `/work/shared/data/humaneval/HumanEval.jsonl.gz`, MIT (OpenAI), "
        "licence in `LICENSE-humaneval.txt`.",
        "",
        "Checksums for these are in `compressor/data/README.md`.",
        "",
    ]
    (CALIB / "PROVENANCE.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wikitext", type=Path, default=Path("/work/shared/data/wikitext-2-raw/wiki.test.raw"))
    ap.add_argument("--humaneval", type=Path, default=Path("/work/shared/data/humaneval/HumanEval.jsonl.gz"))
    args = ap.parse_args()
    DATA.mkdir(parents=True, exist_ok=True)
    rows, sources = build_calib()
    heldout = build_heldout(sources)
    copy_eval_data(args.wikitext, args.humaneval)
    write_data_readme(heldout)
    write_provenance(rows, heldout)
    total = sum(p.stat().st_size for p in CALIB.rglob("*") if p.is_file())
    print(f"calib_data: {total} bytes; code_heldout.txt: {(DATA / 'code_heldout.txt').stat().st_size} bytes")


if __name__ == "__main__":
    main()
