"""The package's shape: no import cycles, imports at the top of modules, a driver that knows no method."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

from compressor import methods

PACKAGE = Path(__file__).resolve().parents[1] / "compressor"
# Modules the CLI imports before it knows what work there is: they keep their compressor imports
# inside functions, so that `compressor recipes` or a bad argument answers without loading torch
# or transformers (tests/test_cli.py checks that).
# compressor.distributed.policy imports compressor.models (torch) only when a run gathers specs.
LAZY = {"compressor", "compressor.cli", "compressor.loading", "compressor.distributed.policy"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imported(node: ast.AST, module: str, is_package: bool, known: dict) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
    names = [f"{base}.{a.name}" for a in node.names]
    return [n if n in known else base for n in names if n in known or base in known]


def _graph():
    known = _modules()
    top, inner = {m: set() for m in known}, []
    for module, path in known.items():
        tree = ast.parse(path.read_text())
        at_top = {id(n) for n in tree.body}
        for block in tree.body:  # imports under a top-level if/try are still module-level
            if isinstance(block, (ast.If, ast.Try)):
                at_top |= {id(n) for n in ast.walk(block)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = {t for t in _imported(node, module, path.name == "__init__.py", known) if t != module}
                if id(node) in at_top:
                    top[module] |= targets
                elif targets:
                    inner.append((module, node.lineno, sorted(targets)))
    return top, inner


def test_no_import_cycles():
    top, _ = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, path):
        state[m] = 1
        for n in sorted(top[m]):
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(top):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"


def test_imports_are_at_module_top_outside_the_cli_path():
    _, inner = _graph()
    assert [(m, line, t) for m, line, t in inner if m not in LAZY] == []


# The core that moves layers, builds the report and the summary, and writes the export: everything
# method-specific reaches it from the stages (compressor/methods/base.py), so it names no method.
METHOD_FREE = ["calibration/driver.py", "api.py", "summary.py", "pipeline", "export"]


def _method_free_files() -> list[Path]:
    found = []
    for entry in METHOD_FREE:
        path = PACKAGE / entry
        found += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return found


def test_the_core_names_no_method():
    words = {w for name in methods.names() for w in {name, methods.get(name).__name__.lower()}}
    assert len(_method_free_files()) > 8
    for path in _method_free_files():
        text = path.read_text().lower()
        for word in words:
            assert not re.search(rf"\b{re.escape(word)}\b", text), f"{path.relative_to(PACKAGE)} names the method '{word}'"


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


def test_no_method_imports_the_distributed_package():
    """Methods map their work through the executor the driver hands them (Run.executor), so the
    same method code runs in one process and over ranks."""
    found = []
    for path in sorted((PACKAGE / "methods").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            if any(n == "compressor.distributed" or n.startswith("compressor.distributed.") for n in names):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert found == []


def test_the_distributed_package_loads_no_torch():
    """The CLI imports compressor.distributed for --nproc before it knows there is model work."""
    code = "import sys, compressor.distributed, compressor.distributed.launch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent,
                         env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert out.stdout.strip() == "False"
