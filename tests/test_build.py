"""The package and its build: what build_info reports, CUDA compiled in
whenever nvcc is available, no libtorch linked, the C core usable from NumPy
alone, and a helpful ImportError when the extension is missing."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import dms

ROOT = Path(__file__).resolve().parents[1]


def test_build_info_fields():
    info = dms.build_info()
    assert info["version"] == dms.__version__ == "0.1.0"
    assert isinstance(info["cuda"], bool)
    assert info["default_num_threads"] >= 1
    assert info["openmp"] is True
    assert info["compiler"].startswith(("gcc", "clang"))
    assert info["dlpack_version"] == (1, 0)
    assert set(info["cpu_features"]) <= {"avx2", "fma", "f16c", "avx512f", "avx512bf16", "amx_bf16"}
    feats = info["cpu_features"]
    best = "avx512" if "avx512f" in feats else "avx2" if "avx2" in feats else "baseline"
    if info["sanitized"]:  # SIMD clones are compiled out under the sanitizers
        best = "baseline"
    # Decode picks its variant by cpuid itself (also under the sanitizers);
    # DMS_DECODE_KERNEL can override it (tests/test_attn_decode.py).
    # Its avx512bf16 variant also needs AVX512-VBMI (FP8 pages), which dms does not report: /proc/cpuinfo.
    with open("/proc/cpuinfo") as f:
        vbmi = " avx512vbmi " in f.read().replace("\n", " ")
    decode = ("avx512bf16" if "avx512bf16" in feats and vbmi else "avx512" if "avx512f" in feats
              else "avx2" if {"avx2", "fma", "f16c"} <= set(feats) else "baseline")
    if os.environ.get("DMS_DECODE_KERNEL", "auto") not in ("", "auto"):
        decode = os.environ["DMS_DECODE_KERNEL"]
    # bfloat16 training attention scores on vdpbf16ps where the CPU has it,
    # and prefill, unless DMS_BF16DOT=off (tests/test_attn_train.py).
    # AMX tiles instead where the CPU has them and Linux grants them, unless
    # DMS_AMX=off (or DMS_BF16DOT=off, which turns both off).
    train = best
    if "avx512bf16" in feats and os.environ.get("DMS_BF16DOT") not in ("off", "0"):
        train = "avx512bf16"
        if "amx_bf16" in feats and os.environ.get("DMS_AMX") not in ("off", "0"):
            train = "amx"
    assert info["cpu_kernels"] == {"gate": best, "logistic_noise": "baseline", "attn_train": train,
                                   "attn_prefill": train,
                                   "attn_decode": decode}
    if info["cuda"]:
        assert info["cuda_archs"] == os.environ.get("DMS_CUDA_ARCHS", "80;90")
        assert info["cuda_runtime_version"] >= 12000
        assert info["cuda_device_count"] >= 0


@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="no nvcc on this machine")
def test_cuda_kernels_are_built_when_nvcc_exists():
    """Where nvcc exists (this machine, CI) the CUDA kernels must compile and
    link into the extension, unless the build was told DMS_CUDA=0."""
    if os.environ.get("DMS_CUDA") == "0":
        pytest.skip("DMS_CUDA=0 asked for a CPU-only build")
    assert dms.build_info()["cuda"], "nvcc is available but dms._C was built without CUDA kernels"


def test_extension_does_not_link_libtorch():
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not available")
    out = subprocess.run([readelf, "-d", dms._C.__file__], capture_output=True, text=True, check=True).stdout
    needed = [line for line in out.splitlines() if "(NEEDED)" in line]
    assert needed, out
    assert not any(name in line for line in needed for name in ("libtorch", "libc10", "libcudart.so")), needed


def _run_python(code, *flags, **kwargs):
    return subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, **kwargs)


def test_c_core_works_with_numpy_alone():
    """torch made unimportable: dms, dms.ops and the gating kernels still
    work on NumPy arrays, and agree with a float64 NumPy formula."""
    run = _run_python("""
        import sys
        sys.modules["torch"] = None  # import torch now raises ImportError
        import numpy as np
        import dms
        from dms import ops
        assert ops.Gate is None
        z = np.random.default_rng(0).standard_normal((2, 3, 17)).astype(np.float32)
        n = ops.logistic_noise(np.empty_like(z), seed=3, accum_step=1)
        y, p, a = ops.gate(z, n, 0.1)
        y64 = (z.astype(np.float64) + n) / 0.1
        np.testing.assert_allclose(y, y64, rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(p, 1 / (1 + np.exp(-y64)), rtol=2e-6, atol=1e-7)
        assert ((a == 1) == (y64 > 0)).all()
        gz = ops.gate_backward(y, None, np.ones_like(y), None, 0.1)
        s = 1 / (1 + np.exp(-y64))
        np.testing.assert_allclose(gz, s * (1 - s) / 0.1, rtol=1e-5, atol=1e-6)
        assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
        print("numpy-only ok", dms.get_num_threads())
    """)
    assert run.returncode == 0, run.stderr
    assert "numpy-only ok" in run.stdout


def test_missing_extension_says_how_to_build(tmp_path):
    shutil.copytree(ROOT / "dms", tmp_path / "dms", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    # -S: without site-packages the editable install's finder cannot point
    # back at the built tree, so the copy without dms._C is what imports.
    run = _run_python("import dms", "-S", cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()
    assert any("ImportError: dms: the compiled extension dms._C is not built" in line for line in last), run.stderr
    assert "pip install -e ." in run.stderr
    assert "circular import" not in run.stderr


def test_benchmarks_name_the_machine(monkeypatch, capsys):
    """Every bench table carries one line with the CPU model and the ISA path
    each dms kernel takes, so a figure can be traced to the machine it came from."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import common

    name, flags = common.cpu_model()
    line = common.machine_description("cpu")
    assert name in line and all(flag in line for flag in flags)
    for op, path in dms.build_info()["cpu_kernels"].items():
        assert f"{op} {path}" in line
    common.print_table("title", ["a"], [[1]])
    out = capsys.readouterr().out.splitlines()
    assert out[1:3] == ["title", line]


def test_distribution_name_is_dms_kv_everywhere_it_is_named():
    """`dms` on PyPI is another project: the distribution is dms-kv (the
    import name stays dms), in pyproject.toml and in the code files written
    next to saved checkpoints."""
    import importlib.metadata

    from dms.models.modeling_dms import _remote_code
    from dms.tiny import tiny_model

    files, _ = _remote_code(tiny_model(seed=0))
    text = (ROOT / "pyproject.toml").read_text()
    assert 'name = "dms-kv"' in text and '"dms-kv[train,eval,notebook]"' in text
    assert importlib.metadata.version("dms-kv") == dms.__version__
    assert all("pip install dms-kv" in code and "pip install dms)" not in code for code in files.values())


def test_python_m_dms_checks_every_op_family_on_every_device(capsys):
    """The README's claim: gate, training attention (forward and gradients)
    and the paged cache, each on every device present, against float64."""
    from dms.__main__ import _devices, main

    assert main(["--size", "1", "2", "256"]) == 0
    out = capsys.readouterr().out
    for section in ("gating check", "training attention, forward + gradients", "paged cache: prefill + append"):
        assert section in out
    devices = _devices()
    assert out.count("  cpu     ok") == 3 and out.count("  numpy   ok") == 2
    if "cuda" in devices:
        assert out.count("  cuda    ok") == 3
    assert out.rstrip().endswith("all checks passed")


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_dry_run(tmp_path):
    """scripts/gpu_check.sh with GPU_CHECK_DRY=1: every step in order, the
    pytest selections collected (a selection that matches nothing fails),
    the benchmarks' options parsed, a summary table last and one tarball of
    logs; so the script the first GPU session runs cannot rot."""
    out = tmp_path / "out"
    run = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "GPU_CHECK_DRY": "1", "OUT": str(out), "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    table = run.stdout[run.stdout.index("=== summary"):].splitlines()[2:]
    steps = [line.split("|")[1].strip() for line in table]
    assert steps == ["build", "cuda_present", "selfcheck", "cuda_tests", "memcheck", "racecheck", "synccheck",
                     "bench_decode", "bench_attn_train", "bench_prefill", "bench_gate"]
    assert all(line.split("|")[2].strip() in ("dry", "skipped") for line in table)
    assert (out / "gpu_check_logs.tar.gz").stat().st_size > 0
    for name in ("cuda_tests", "memcheck", "racecheck"):
        log = (out / "logs" / f"{name}.log").read_text()
        assert "error" not in log.lower() and " 0 tests" not in log
