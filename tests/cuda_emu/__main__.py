"""The emulator's long runs, for a developer (CI runs the short selection in
tests/test_cuda_emulated.py). From the repository root:

    python -m tests.cuda_emu attn [i/n]      # 320 tensor-core + 164 SIMT cases (every n-th from i)
    python -m tests.cuda_emu cache           # the cache sequences
    python -m tests.cuda_emu fuzz SEED COUNT # random cache sequences
    python -m tests.cuda_emu mutate [attn|cache] [index ...]  # each mutation must be caught
    python -m tests.cuda_emu check attn|cache LIB   # (used by mutate) the check cases on LIB

EMU_CPASYNC=early makes cp.async copies land at issue instead of at the
wait (see emu.cpp). The library is built under build/cuda_emu/ (reused
while the sources are unchanged); --csrc PATH builds from another tree.
scripts/cuda_emu.sh wraps this under nice.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tests.cuda_emu import attn_train, cache, mutations
from tests.cuda_emu.build import REPO, build
from tests.cuda_emu.harness import load

# A mutation must fail one of these (run under EMU_CPASYNC=late, then early).
CHECK = {
    "attn": [dict(B=2, H=1, G=2, T=70, D=64, window=5, pad=True),
             dict(B=2, H=1, G=2, T=70, D=64, window=5, pad=True, odtype=torch.float32, godtype=torch.float32),
             dict(B=1, H=1, G=2, T=100, D=128, window=20, dtype=torch.float16),
             dict(B=1, H=1, G=1, T=300, D=64, window=3),
             dict(B=2, H=1, G=2, T=300, D=128, window=40, pad=True)],
    "cache": list(range(len(cache.CASES))),
}


def run_attn(lib, cases):
    t0, worst = time.time(), {}
    for c in cases:
        t1 = time.time()
        errs = attn_train.run_case(lib, **c)
        for n, e in errs.items():
            key = f"{str(c.get('dtype', torch.bfloat16))[6:]}/{n}"
            worst[key] = max(worst.get(key, 0.0), e)
        print("ok", " ".join(f"{k}={v}" for k, v in c.items()),
              " ".join(f"{n}={e:.1e}" for n, e in errs.items()), f"[{time.time() - t1:.1f}s]", flush=True)
    print("worst:", {k: f"{v:.2e}" for k, v in sorted(worst.items())})
    print(f"ALL OK ({len(cases)} cases, {time.time() - t0:.0f}s)")


def run_cache(lib, indices):
    for i in indices:
        lib.emu_set_limit(232448)
        err, c = cache.run_sequence(lib, seed=i, **cache.CASES[i])
        print("ok", i, "seen", c.row_seen.tolist()[:4], "slots", c.row_slots.tolist()[:4], f"maxerr {err:.1e}",
              flush=True)
    print("ALL OK")


def mutate(family, only, csrc):
    lists = {"attn": mutations.ATTN, "cache": mutations.CACHE}
    missed = 0
    for fam in [family] if family else ["attn", "cache"]:
        for idx, (name, fname, old, new) in enumerate(lists[fam]):
            if only and idx not in only:
                continue
            with tempfile.TemporaryDirectory() as d:
                root = Path(d) / "csrc"
                shutil.copytree(csrc, root)
                path = root / "cuda" / fname
                text = path.read_text()
                if old not in text:
                    print(f"{fam} {idx} {name}: STALE (text not found in {fname})", flush=True)
                    missed += 1
                    continue
                path.write_text(text.replace(old, new, 1))
                lib = build(Path(d) / "out", csrc=root)
                verdict = "NOT CAUGHT"
                for mode in ("late", "early"):
                    r = subprocess.run(["timeout", "600", sys.executable, "-m", "tests.cuda_emu", "check", fam,
                                        str(lib)], env=dict(os.environ, EMU_CPASYNC=mode), cwd=REPO,
                                       capture_output=True, text=True)
                    if r.returncode:
                        tail = (r.stdout + r.stderr).strip().splitlines()
                        verdict = f"caught ({mode}): {tail[-1][:150] if tail else r.returncode}"
                        break
                missed += verdict == "NOT CAUGHT"
                print(f"{fam} {idx} {name}: {verdict}", flush=True)
    print("ALL CAUGHT" if not missed else f"{missed} NOT CAUGHT OR STALE")
    return 1 if missed else 0


def main():
    ap = argparse.ArgumentParser(prog="python -m tests.cuda_emu", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["attn", "cache", "fuzz", "mutate", "check"])
    ap.add_argument("args", nargs="*")
    ap.add_argument("--csrc", default=str(REPO / "csrc"))
    a = ap.parse_args()
    if a.what == "check":
        lib = load(a.args[1])
        if a.args[0] == "attn":
            run_attn(lib, CHECK["attn"])
        else:
            run_cache(lib, CHECK["cache"])
        return 0
    if a.what == "mutate":
        family = a.args[0] if a.args and a.args[0] in ("attn", "cache") else None
        only = {int(x) for x in a.args[1 if family else 0:]}
        return mutate(family, only, Path(a.csrc))
    lib = load(build(REPO / "build" / "cuda_emu", csrc=a.csrc))
    if a.what == "attn":
        cases = attn_train.matrix() + attn_train.simt_matrix()
        if a.args:
            i, n = map(int, a.args[0].split("/"))
            cases = cases[i::n]
        run_attn(lib, cases)
    elif a.what == "cache":
        run_cache(lib, range(len(cache.CASES)))
    else:
        seed0, count = int(a.args[0]), int(a.args[1])
        for s in range(seed0, seed0 + count):
            limit, case = cache.fuzz_case(s)
            lib.emu_set_limit(limit)
            t = time.time()
            err, _ = cache.run_sequence(lib, seed=s, **case)
            print("seed", s, f"ok {time.time() - t:.1f}s maxerr {err:.1e}", flush=True)
        print("FUZZ OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
