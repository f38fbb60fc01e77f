"""Builds csrc/tests/test_core.c against the C core (no Python, no CUDA) with
AddressSanitizer + UndefinedBehaviorSanitizer and runs it: out-of-bounds
writes, leaks, undefined behaviour and failed checks all fail this test."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def _compiler():
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


@pytest.mark.skipif(_compiler() is None, reason="no C compiler on PATH")
def test_c_core_under_sanitizers(tmp_path):
    sources = [*sorted((CSRC / "core").glob("*.c")), *sorted((CSRC / "cpu").glob("*.c")), CSRC / "tests" / "test_core.c"]
    exe = tmp_path / "test_core"
    cmd = [_compiler(), "-std=c11", "-g", "-O1", "-fopenmp", "-fsanitize=address,undefined",
           "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-Wall", "-Wextra", "-Werror",
           f"-I{CSRC}", *map(str, sources), "-lm", "-o", str(exe)]
    print(" ".join(cmd))
    subprocess.run(cmd, check=True)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1",
               OMP_NUM_THREADS="2")
    run = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=300)
    print(run.stdout, run.stderr)
    assert run.returncode == 0, run.stdout + run.stderr
    last = run.stdout.strip().splitlines()[-1]
    assert last.endswith("0 failed") and int(last.split()[0]) > 50, last
