import glob
import os
import tempfile
import time
import uuid

import pytest

from compressor import sandbox
from compressor.sandbox import Outcome, run_many, run_program


def _leftover_folders() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "compressor-sandbox-*")))


def test_passing_program():
    out = run_program("x = sum(range(10))\nassert x == 45\nprint('done')")
    assert out == Outcome(True, "passed", "done", out.seconds)


def test_failing_assert():
    out = run_program("def f(x):\n    return x + 1\n\nassert f(1) == 3, 'wrong answer'\n")
    assert not out.passed and out.status == "failed"
    assert "AssertionError: wrong answer" in out.detail


def test_syntax_error_fails():
    out = run_program("def f(:\n    pass\n")
    assert out.status == "failed" and "SyntaxError" in out.detail


def test_exit_before_the_end_fails():
    # A completion that calls exit() must not skip the tests and pass.
    out = run_program("import sys\nsys.exit(0)\nassert False\n")
    assert out.status == "failed" and "exit()" in out.detail


@pytest.mark.parametrize("source", ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"])
def test_timeout_within_the_limit(source):
    start = time.monotonic()
    out = run_program(source, timeout=1.0)
    elapsed = time.monotonic() - start
    assert out.status == "timeout" and not out.passed
    assert elapsed < 4.0


@pytest.mark.parametrize(
    "source",
    [
        "data = bytearray(2 * 1024 ** 3)\nprint(len(data))\n",
        # Grows step by step, as a runaway list in a model's loop would.
        "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 ** 2))\n",
    ],
)
def test_too_much_memory_is_not_passed(source):
    start = time.monotonic()
    out = run_program(source, memory_mb=256, timeout=20.0)
    assert not out.passed and out.status == "failed", out
    assert "MemoryError" in out.detail
    assert time.monotonic() - start < 10.0  # stopped by the memory limit, not the timeout


def test_memory_under_the_limit_is_fine():
    out = run_program("data = bytearray(64 * 1024 ** 2)\nassert len(data) == 64 * 1024 ** 2\n", memory_mb=256)
    assert out.passed, out.detail


@pytest.mark.parametrize(
    "write",
    [
        "open({path!r}, 'w').write('escaped')",
        "import pathlib\npathlib.Path({path!r}).write_text('escaped')",
        "import os\nfd = os.open({path!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'escaped')",
        "import shutil\nopen('inside.txt', 'w').write('x')\nshutil.copy('inside.txt', {path!r})",
        "import os\nopen('inside.txt', 'w').write('x')\nos.rename('inside.txt', {path!r})",
    ],
)
def test_writing_outside_the_folder_fails(write, tmp_path):
    targets = [tmp_path.parent / f"sandbox-escape-{uuid.uuid4().hex}", f"/tmp/xyz-{uuid.uuid4().hex}"]
    for target in targets:
        out = run_program(write.format(path=str(target)))
        assert not out.passed and out.status == "failed", out
        assert "not allowed" in out.detail
        assert not os.path.exists(target)


def test_deleting_outside_the_folder_fails(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    for source in (
        f"import os\nos.remove({str(keep)!r})",
        f"import os\nos.unlink({str(keep)!r})",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        f"import os\nos.chmod({str(keep)!r}, 0)",
        f"open({str(keep)!r}, 'a').write('more')",
    ):
        out = run_program(source)
        assert out.status == "failed" and "not allowed" in out.detail, (source, out)
    assert keep.read_text() == "precious"


def test_writing_inside_the_folder_works():
    source = (
        "import os, tempfile\n"
        "open('a.txt', 'w').write('x')\n"
        "os.mkdir('sub')\n"
        "os.rename('a.txt', 'sub/b.txt')\n"
        "os.remove('sub/b.txt')\n"
        "with tempfile.NamedTemporaryFile() as f:\n"
        "    f.write(b'y')\n"
        "assert os.environ['HOME'] == os.getcwd()\n"
    )
    out = run_program(source)
    assert out.passed, out.detail


@pytest.mark.parametrize(
    "source",
    [
        "import os\nos.fork()",
        "import os\nos.system('touch {marker}')",
        "import subprocess\nsubprocess.run(['touch', '{marker}'])",
        "import subprocess\nsubprocess.Popen(['touch', '{marker}'])",
        "import os\nos.execv('/usr/bin/touch', ['touch', '{marker}'])",
        "import os\nos.posix_spawn('/usr/bin/touch', ['touch', '{marker}'], {{}})",
        "import multiprocessing\nmultiprocessing.Process(target=print).start()",
        "import ctypes\nctypes.CDLL(None).fork()",
    ],
)
def test_new_processes_are_refused(source, tmp_path):
    marker = tmp_path / "spawned"
    out = run_program(source.format(marker=marker))
    assert out.status == "failed", out
    assert "not allowed" in out.detail or "halted" in out.detail
    assert not marker.exists()


def test_network_is_refused():
    out = run_program("import socket\ns = socket.socket()\ns.connect(('1.1.1.1', 80))\n")
    assert out.status == "failed" and "not allowed" in out.detail
    assert sandbox.network_isolation() in ("namespace", "guard")


def test_environment_is_minimal(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:1")
    monkeypatch.setenv("COMPRESSOR_SECRET", "s3cret")
    out = run_program(
        "import os, sys\n"
        "assert 'HTTPS_PROXY' not in os.environ and 'COMPRESSOR_SECRET' not in os.environ\n"
        "assert sys.stdin is None or sys.stdin.read() == ''\n"
    )
    assert out.passed, out.detail


def test_temp_folders_are_removed():
    before = _leftover_folders()
    out = run_program("import os\nopen('left.txt', 'w').write('x')\nprint(os.getcwd())\n")
    assert out.passed
    workdir = out.detail.strip()
    assert os.path.basename(workdir).startswith("compressor-sandbox-")
    assert not os.path.exists(workdir)
    run_program("open('f', 'w').write('x')\nwhile True:\n    pass\n", timeout=0.5)
    run_program("raise ValueError('boom')")
    assert _leftover_folders() <= before


def test_output_is_truncated():
    out = run_program("print('x' * 5_000_000)\nprint('end')\n")
    assert len(out.detail) <= sandbox.DETAIL_CHARS + 100
    assert "truncated" in out.detail


def test_run_many_keeps_order():
    programs = ["pass", "assert False", "while True: pass", "print('ok')"]
    start = time.monotonic()
    outs = run_many(programs, workers=2, timeout=1.0, progress=False)
    assert [o.status for o in outs] == ["passed", "failed", "timeout", "passed"]
    assert time.monotonic() - start < 6.0
