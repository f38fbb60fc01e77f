"""Build of the `dms._C` extension: C11 sources from csrc/, plus CUDA C from
csrc/cuda/ when nvcc is available.

Environment switches (all optional):
  DMS_CUDA=0        build the CPU kernels only, even if nvcc is found
  DMS_CUDA=1        require the CUDA kernels: a missing nvcc is an error
  DMS_CUDA_ARCHS    semicolon list of SM versions (default "80;90"); PTX of
                    the highest one is embedded too, for newer GPUs
  DMS_CUBLAS=0|1    skip / require linking cuBLAS (default: link when found)
  DMS_DEBUG=1       -O0 -g, for gdb
  DMS_SANITIZE=1    build the C code with AddressSanitizer + UBSan (tests
                    only: load with LD_PRELOAD=libasan.so; no SIMD clones)
  CUDA_HOME         where the CUDA toolkit lives (else nvcc on PATH, else
                    /usr/local/cuda)

The extension never links libtorch: tensors arrive through DLPack.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
VERSION = "0.1.0"


def _env_flag(name):
    """None when unset, else the boolean the variable spells."""
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"{name} must be 0 or 1, got {value!r}")


def _is_cuda_home(path):
    return (path / "bin" / "nvcc").exists() and (path / "include" / "cuda_runtime.h").exists()


def _find_cuda_home():
    """CUDA_HOME/CUDA_PATH, else the toolkit around the nvcc on PATH (which may
    be a wrapper script elsewhere), else /usr/local/cuda; None if none."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and _is_cuda_home(Path(home)):
        return Path(home)
    nvcc = shutil.which("nvcc")
    if nvcc:
        guess = Path(os.path.realpath(nvcc)).parent.parent
        if _is_cuda_home(guess):
            return guess
        try:  # ask the compiler itself where it lives
            out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-E", os.devnull], capture_output=True, text=True, timeout=60)
            for line in out.stdout.splitlines() + out.stderr.splitlines():
                if "TOP=" in line:
                    top = Path(line.split("TOP=", 1)[1].strip()).resolve()
                    if _is_cuda_home(top):
                        return top
        except (OSError, subprocess.SubprocessError):
            pass
    if _is_cuda_home(Path("/usr/local/cuda")):
        return Path("/usr/local/cuda")
    return None


def _find_cublas(cuda_home):
    """(include_dir, lib_dir) of cuBLAS: the toolkit's, or the nvidia-cublas
    wheel's (what a pip-installed CUDA PyTorch brings), or None."""
    candidates = [(cuda_home / "include", cuda_home / "lib64"),
                  (cuda_home / "include", cuda_home / "lib")]
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for sub in ("cu13", "cu12", "cublas"):
            base = Path(site) / "nvidia" / sub
            candidates.append((base / "include", base / "lib"))
    for inc, lib in candidates:
        if (inc / "cublas_v2.h").exists() and any(lib.glob("libcublas.so*")):
            return inc, lib
    return None


def _cublas_link_name(lib_dir):
    if (lib_dir / "libcublas.so").exists():
        return "cublas"
    # Wheels ship only the versioned soname; link it by file name.
    return ":" + sorted(p.name for p in lib_dir.glob("libcublas.so.*"))[0]


def _cuda_archs():
    archs = os.environ.get("DMS_CUDA_ARCHS", "80;90")
    archs = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise SystemExit(f"DMS_CUDA_ARCHS must list SM numbers like '80;90', got {archs!r}")
    return archs


class BuildExt(build_ext):
    """Compiles csrc/cuda/*.cu with nvcc into objects linked into dms._C."""

    def build_extensions(self):
        ext = self.extensions[0]
        want_cuda = _env_flag("DMS_CUDA")
        cuda_home = _find_cuda_home() if want_cuda is not False else None
        if want_cuda and cuda_home is None:
            raise SystemExit("DMS_CUDA=1 but nvcc was not found: set CUDA_HOME or put nvcc on PATH")
        if cuda_home is not None:
            self._add_cuda(ext, cuda_home)
        else:
            print("dms: building without CUDA kernels (nvcc not found or DMS_CUDA=0)")
        super().build_extensions()

    def _add_cuda(self, ext, cuda_home):
        archs = _cuda_archs()
        want_cublas = _env_flag("DMS_CUBLAS")
        cublas = _find_cublas(cuda_home) if want_cublas is not False else None
        if want_cublas and cublas is None:
            raise SystemExit("DMS_CUBLAS=1 but cuBLAS (cublas_v2.h + libcublas.so) was not found")
        nvcc = str(cuda_home / "bin" / "nvcc")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        debug = _env_flag("DMS_DEBUG")
        flags = ["-std=c++17", "-O0" if debug else "-O3", "-g" if debug else "-lineinfo",
                 "-Xcompiler", "-fPIC,-fvisibility=hidden,-Wall,-Wextra,-Werror",
                 "--Werror", "all-warnings", "-DDMS_WITH_CUDA=1"]
        includes = [f"-I{cuda_home / 'include'}"]
        if cublas:
            flags.append("-DDMS_WITH_CUBLAS=1")
            includes.append(f"-I{cublas[0]}")
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        stale = []
        for source in sorted((CSRC / "cuda").glob("*.cu")):
            obj = out_dir / (source.stem + ".o")
            deps = [source, *(CSRC / "cuda").glob("*.cuh"), *(CSRC / "core").glob("*.h"), CSRC / "dms.h"]
            if self.force or not obj.exists() or any(obj.stat().st_mtime < d.stat().st_mtime for d in deps):
                stale.append([nvcc, "-c", str(source), "-o", str(obj), *flags, *gencode, *includes])
            ext.extra_objects.append(str(obj))
        # nvcc runs one file on one core: compile the files side by side.
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            for cmd in stale:
                print(" ".join(cmd))
            runs = list(pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True), stale))
        for cmd, run in zip(stale, runs):
            sys.stdout.write(run.stdout)
            sys.stderr.write(run.stderr)
            if run.returncode != 0:
                raise SystemExit(f"nvcc failed ({run.returncode}) on {cmd[2]}")

        lib_dir = cuda_home / "lib64" if (cuda_home / "lib64").exists() else cuda_home / "lib"
        ext.define_macros += [("DMS_WITH_CUDA", "1"), ("DMS_CUDA_ARCHS", f'"{";".join(archs)}"')]
        ext.library_dirs.append(str(lib_dir))
        # Static cudart: the extension works beside any CUDA PyTorch and on
        # machines without the toolkit; device pointers and streams are
        # driver objects, shared across runtimes.
        ext.libraries += ["cudart_static", "stdc++", "dl", "rt", "pthread"]
        if cublas:
            ext.define_macros.append(("DMS_WITH_CUBLAS", "1"))
            ext.library_dirs.append(str(cublas[1]))
            ext.runtime_library_dirs.append(str(cublas[1]))
            ext.libraries.append(_cublas_link_name(cublas[1]))
        else:
            print("dms: cuBLAS not found; CUDA kernels are built without it (none needs it)")


def _extension():
    sources = sorted(str(p.relative_to(ROOT)) for d in ("core", "cpu", "python") for p in (CSRC / d).glob("*.c"))
    debug = _env_flag("DMS_DEBUG")
    # -std=c11 alone would turn off FMA contraction (-ffp-contract=off).
    compile_args = ["-std=c11", "-O0" if debug else "-O3", "-ffp-contract=fast", "-fopenmp", "-fvisibility=hidden",
                    "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter"]
    link_args = ["-fopenmp"]
    if debug:
        compile_args.append("-g")
    if _env_flag("DMS_SANITIZE"):
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
        compile_args += sanitize
        link_args += sanitize
    return Extension(
        "dms._C",
        sources=sources,
        include_dirs=[str(CSRC), numpy.get_include()],
        define_macros=[("DMS_VERSION", f'"{VERSION}"'), ("NPY_NO_DEPRECATED_API", "NPY_1_22_API_VERSION")],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        libraries=[],
        language="c",
    )


setup(version=VERSION, ext_modules=[_extension()], cmdclass={"build_ext": BuildExt})
