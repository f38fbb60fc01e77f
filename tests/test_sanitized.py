"""The whole extension - binding (DLPack import, argument parsing) and CPU
kernels - built with AddressSanitizer + UndefinedBehaviorSanitizer, running
the Python tests of every op in a subprocess: an out-of-bounds access, a
use-after-free or undefined behaviour anywhere in dms._C fails this test.
(csrc/tests/test_core.c covers the C core alone, see test_c_core.py.)"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gcc_lib(name):
    cc = shutil.which("gcc")
    if cc is None:
        return None
    path = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def _libasan():
    return _gcc_lib("libasan.so")


def _preload():
    """libasan, then libstdc++: Python itself does not link the C++ runtime,
    so without it ASan cannot find the real __cxa_throw when torch's
    dispatcher turns an error raised in a custom op (dms.ops) into a C++
    exception, and aborts."""
    return " ".join(p for p in (_libasan(), _gcc_lib("libstdc++.so")) if p)


@pytest.mark.slow
@pytest.mark.skipif(_libasan() is None, reason="gcc with libasan is needed")
def test_extension_under_sanitizers(tmp_path):
    env = {**os.environ, "DMS_CUDA": "0", "DMS_SANITIZE": "1"}
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                            "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    pkg = tmp_path / "pkg"
    shutil.copytree(ROOT / "dms", pkg / "dms", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for so in (tmp_path / "lib" / "dms").glob("_C*.so"):
        shutil.copy(so, pkg / "dms")

    # -S keeps site.py from installing the editable finder (which would load
    # the unsanitized build); site-packages come back through PYTHONPATH.
    paths = [str(pkg), *{sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}, str(ROOT)]
    run_env = {**env, "PYTHONPATH": os.pathsep.join(paths), "LD_PRELOAD": _preload(),
               "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=99",
               "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1", "OMP_NUM_THREADS": "2"}
    # cwd away from the checkout: sys.path[0] is the working directory.
    where = subprocess.run([sys.executable, "-S", "-c", "import dms; print(dms._C.__file__)"], env=run_env,
                           cwd=tmp_path, capture_output=True, text=True)
    assert where.returncode == 0 and where.stdout.strip().startswith(str(pkg)), where.stdout + where.stderr
    tests = [str(ROOT / "tests" / name) for name in ("test_gate.py", "test_attn_train.py", "test_cache.py",
                                                       "test_dlpack.py", "test_build.py")]
    run = subprocess.run([sys.executable, "-S", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "--import-mode=append", "-k", "not leak and not numpy_alone and not missing_extension",
                          *tests], cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=1200)
    tail = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, tail
    assert " passed" in run.stdout and str(pkg) in run.stdout + where.stdout, tail
    assert "ERROR: AddressSanitizer" not in run.stderr and "runtime error" not in run.stderr, tail
