"""Build the CPU emulator of the CUDA kernels (tests/cuda_emu).

The kernels of csrc/cuda/ are compiled as they are in the checkout, as C++20
host code against include/ (the emulated CUDA runtime and mma.cuh), after
two mechanical rewrites that plain C++ cannot express:
  extern __shared__ T name[];   ->  T *name = (T *)emu_smem;
  k<<<grid, block, smem, s>>>(a) ->  EMU_LAUNCH(k, grid, block, smem, s, a);
and linked with core/common.c and emu.cpp into one shared library. Nothing
of the kernel logic is copied: change a kernel, and the next build checks it.

    from tests.cuda_emu.build import build
    lib_path = build(out_dir)            # or build(out_dir, csrc=<tree>/csrc)
"""
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
KERNELS = ["attn_train.cu", "cache.cu"]                  # the translation units
HEADERS = ["attn_train.cuh", "attn_train_mma.cuh", "common.cuh", "tiles.cuh"]
# not copied: csrc/cuda/mma.cuh (inline PTX) is replaced by include/mma.cuh

_SMEM = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?([\w ]+?) (\w+)\[\];")


def _split_top(text, sep=","):
    """Split at the separators outside parentheses."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "([" and 1 or ch in ")]" and -1 or 0
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _rewrite_launches(text):
    """kernel<<<a, b, c, d>>>(args); -> EMU_LAUNCH(kernel, a, b, c, d, args);
    (configurations and arguments may span lines and hold calls)."""
    out, n = "", 0
    while (i := text.find("<<<")) >= 0:
        name = re.search(r"[\w:]+(?:<[^<>;]*>)?\s*$", text[:i])
        j = text.index(">>>", i)
        config = [c.strip() for c in _split_top(text[i + 3:j])]
        k = text.index("(", j)
        depth, e = 0, k
        while True:
            depth += {"(": 1, ")": -1}.get(text[e], 0)
            if depth == 0:
                break
            e += 1
        if not name or len(config) != 4 or text[j + 3:k].strip() or not text[e + 1:].lstrip().startswith(";"):
            raise RuntimeError(f"a kernel launch the rewrite does not know: {text[i - 40:j + 3]!r}")
        out += text[:name.start()] + f"EMU_LAUNCH({name.group(0).strip()}, {', '.join(config)}, {text[k + 1:e]})"
        text = text[e + 1:]
        n += 1
    return out + text, n


class Unavailable(RuntimeError):
    """No C++20 compiler with <barrier> here: the emulator cannot be built."""


def rewrite(text, name):
    """The host-C++ form of one kernel source (see the module docstring) and
    the number of launches rewritten."""
    text = _SMEM.sub(r"\1 *\2 = (\1 *)emu_smem;", text)
    text, n_launch = _rewrite_launches(text)
    text = text.replace('#include "../core/', '#include "core/')
    if "extern __shared__" in text or "<<<" in text:
        raise RuntimeError(f"{name}: a shared-memory declaration or launch the rewrite does not know")
    if re.search(r"\basm\b", text):
        raise RuntimeError(f"{name}: inline PTX outside mma.cuh cannot be emulated")
    return text, n_launch


def check_compiler(cxx="g++"):
    """Raise Unavailable unless `cxx` compiles C++20 with <barrier>."""
    if shutil.which(cxx) is None or shutil.which("gcc") is None:
        raise Unavailable(f"{cxx} or gcc not found")
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "t.cpp"
        src.write_text("#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n")
        r = subprocess.run([cxx, "-std=c++20", "-pthread", str(src), "-o", str(Path(d) / "t")],
                           capture_output=True, text=True)
        if r.returncode:
            raise Unavailable(f"{cxx} -std=c++20 has no usable <barrier>: {r.stderr.strip()[-300:]}")


def _inputs(csrc):
    files = [csrc / "cuda" / n for n in KERNELS + HEADERS] + sorted((csrc / "core").glob("*.[ch]"))
    files += [csrc / "dms.h", HERE / "emu.cpp", HERE / "build.py"] + sorted((HERE / "include").glob("*"))
    return files


def build(out_dir, csrc=REPO / "csrc", extra_flags=(), cxx="g++", name="libemu.so"):
    """Build into `out_dir`/<hash of the inputs>/`name` (reused when it
    exists) and return its path. extra_flags go to every compile and the
    link (e.g. -fsanitize=thread)."""
    check_compiler(cxx)
    csrc = Path(csrc).resolve()
    h = hashlib.sha256(" ".join(extra_flags).encode())
    for f in _inputs(csrc):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    out = Path(out_dir) / h.hexdigest()[:16]
    lib = out / name
    if lib.exists():
        return lib
    src = out / "src"
    (src / "cuda").mkdir(parents=True, exist_ok=True)
    n_launch = 0
    for n in KERNELS + HEADERS:
        text, k = rewrite((csrc / "cuda" / n).read_text(), n)
        (src / "cuda" / n).write_text(text)
        n_launch += k
    if n_launch < len(KERNELS):
        raise RuntimeError(f"only {n_launch} kernel launches found to rewrite")
    inc = ["-I", str(HERE / "include"), "-I", str(csrc)]
    cxxflags = ["-std=c++20", "-O2", "-g0", "-fPIC", "-pthread", "-DDMS_WITH_CUDA=1",
                "-Wno-unknown-pragmas", "-Wno-unused-parameter", *extra_flags]
    jobs = [(["gcc", "-std=c11", "-O1", "-fPIC", *extra_flags, "-c", str(csrc / "core" / "common.c")],
             out / "common.o")]
    jobs.append(([cxx, *cxxflags, *inc, "-c", str(HERE / "emu.cpp")], out / "emu.o"))
    for n in KERNELS:
        jobs.append(([cxx, *cxxflags, *inc, "-x", "c++", "-c", str(src / "cuda" / n)], out / (n + ".o")))
    procs = [(subprocess.Popen(cmd + ["-o", str(o)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True), cmd) for cmd, o in jobs]
    for p, cmd in procs:
        log = p.communicate()[0]
        if p.returncode:
            raise RuntimeError(f"emulator build failed: {' '.join(cmd)}\n{log[-4000:]}")
    tmp = out / (name + ".tmp")
    r = subprocess.run([cxx, "-shared", "-pthread", "-Wl,--no-undefined", *extra_flags, "-o", str(tmp), *(str(o) for _, o in jobs)],
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"emulator link failed:\n{r.stderr[-4000:]}")
    os.replace(tmp, lib)  # atomic: a concurrent build or an interrupted one never leaves half a library
    return lib
