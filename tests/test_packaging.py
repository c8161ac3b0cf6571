"""A wheel (what `pip install .` or an index installs) carries the shipped recipes and calibration
sets, and an installed copy finds them without a source checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy without build/: setuptools would otherwise pack whatever an earlier build
    # left there, and a module missing from setup.cfg would ship anyway from a stale copy.
    src = tmp_path_factory.mktemp("src") / "compressor"
    anywhere = shutil.ignore_patterns(".git", "*.egg-info", "__pycache__", ".pytest_cache")
    # Build outputs and local run folders only at the top: a module may well be named outcome.py.
    at_top = {"build", "dist", "results", ".whl", ".gl"}

    def ignore(folder, names):
        top = Path(folder) == ROOT
        return set(anywhere(folder, names)) | ({n for n in names if n in at_top or n.startswith("out")} if top else set())

    shutil.copytree(ROOT, src, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
                   check=True, capture_output=True, cwd=out)
    (found,) = out.glob("compressor-*.whl")
    return found


def test_wheel_ships_recipes_and_calibration_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        assert f"compressor/recipes/{path.name}" in names
    for path in sorted((ROOT / "calib_data").glob("*.jsonl")):
        assert f"compressor/calib_data/{path.name}" in names
    assert "compressor/data/code_heldout.txt" in names


def test_wheel_ships_every_module_of_the_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    source = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "compressor").rglob("*.py") if "__pycache__" not in p.parts)
    assert [p for p in source if p not in names] == []
    shipped_data = ("compressor/calib_data/", "compressor/recipes/")  # mapped from the top-level folders
    assert sorted(n for n in names if n.startswith("compressor/") and n.endswith(".py") and n not in source and not n.startswith(shipped_data)) == []


def test_installed_copy_finds_them_from_another_folder(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import compressor, compressor.recipe as r, compressor.datasets as d\n"
        "print(compressor.__file__)\n"
        "print(sorted(r.shipped()) == sorted(p.stem for p in r.RECIPES_DIR.glob('*.yaml')), len(r.shipped()))\n"
        "print(r.load('structured').stages[0].name, len(d.load_texts('code')) > 0, len(d.load_texts('python')) > 0)\n"
        "import compressor.api, compressor.cli, compressor.eval.tasks\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    where, listed, loaded = run.stdout.splitlines()
    assert where.startswith(str(target)), "the installed copy, not the source checkout, must be imported"
    assert listed == f"True {len(list((ROOT / 'recipes').glob('*.yaml')))}"
    assert loaded == "structured True True"
