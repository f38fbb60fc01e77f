"""`python -m dms`: report what this build of dms contains and check each
compiled kernel on every device present against a float64 formula.

    python -m dms [--size B H T] [--seed N]

Exits non-zero if any check fails.
"""

import argparse
import sys
import time

import numpy as np

import dms
from dms import ops


def _devices():
    try:
        import torch
    except ImportError:
        return ["numpy"]
    devices = ["numpy", "cpu"]
    if torch.cuda.is_available() and dms.build_info()["cuda"]:
        devices.append("cuda")
    return devices


def _check_gate(device, shape, seed):
    """Max abs error of y, p against float64, decision mismatches, and time."""
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal(shape) * 3).astype(np.float32)
    noise = ops.logistic_noise(np.empty(shape, np.float32), seed=seed)
    tau = 0.1
    y64 = (z.astype(np.float64) + noise) / tau
    if device == "numpy":
        zz, nn = z, noise
    else:
        import torch

        zz, nn = torch.from_numpy(z).to(device), torch.from_numpy(noise).to(device)
    start = time.perf_counter()
    y, p, a = ops.gate_forward(zz, nn, tau)
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    y, p, a = (np.asarray(x.cpu()) if device != "numpy" else x for x in (y, p, a))
    err_y = float(np.max(np.abs(y - y64) / (1 + np.abs(y64))))
    err_p = float(np.max(np.abs(p - 1 / (1 + np.exp(-y64)))))
    settled = np.abs(y64) > 1e-4
    mismatches = int(np.sum((a[settled] > 0) != (y64[settled] > 0)))
    ok = err_y < 1e-5 and err_p < 1e-5 and mismatches == 0
    return ok, err_y, err_p, mismatches, elapsed, float(np.mean(a))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dms", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", nargs=3, type=int, default=[2, 8, 4096], metavar=("B", "H", "T"),
                        help="shape of the gating check (default: 2 8 4096)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)

    info = dms.build_info()
    print(f"dms {info['version']}")
    cuda = (f"yes (sm {info['cuda_archs']}, runtime {info['cuda_runtime_version']}, "
            f"{info['cuda_device_count']} device(s) visible, cuBLAS {info['cublas_version'] or 'not linked'})"
            if info["cuda"] else "no (CPU-only build)")
    print(f"  CUDA kernels : {cuda}")
    print(f"  CPU features : {', '.join(info['cpu_features']) or 'none detected'}")
    print(f"  CPU kernels  : {', '.join(f'{op} {path}' for op, path in info['cpu_kernels'].items())}")
    print(f"  OpenMP       : {info['openmp']} (default threads {info['default_num_threads']}, "
          f"using {dms.get_num_threads()})")
    print(f"  compiler     : {info['compiler']}")
    print()
    shape = tuple(args.size)
    print(f"gating check on {shape} (SPEC §2, tau 0.1, against float64):")
    print(f"  {'device':<7} {'result':<6} {'max rel err y':>14} {'max err p':>10} {'flips':>6} "
          f"{'evicted':>8} {'time':>9}")
    all_ok = True
    for device in _devices():
        ok, err_y, err_p, flips, elapsed, evicted = _check_gate(device, shape, args.seed)
        all_ok &= ok
        print(f"  {device:<7} {'ok' if ok else 'FAIL':<6} {err_y:>14.2e} {err_p:>10.2e} {flips:>6} "
              f"{evicted:>8.1%} {elapsed * 1e3:>7.2f}ms")
    print()
    print("all checks passed" if all_ok else "SOME CHECKS FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
