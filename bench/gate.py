"""Benchmark of the gating op (SPEC §2): dms's fused forward/backward against
the same math as eager PyTorch ops, in one run, with the achieved bandwidth
next to the machine's measured copy bandwidth (gating is memory-bound).
"kernel" times write into preallocated outputs; "op" times allocate them, as
the PyTorch baseline does (on CPU, fresh multi-MB buffers cost page faults
that can exceed the kernel itself).

    python bench/gate.py [--device cpu|cuda] [--dtype float32|bfloat16]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import command_line, memory_bandwidth, print_table, time_fn  # noqa: E402

import dms  # noqa: E402
from dms.runtime import exec_kwargs  # noqa: E402
from dms import ops  # noqa: E402


def torch_gate(z, noise, tau):
    y = (z.float() + noise) / tau
    p = torch.sigmoid(y)
    a = (y > 0).to(z.dtype)
    return y, p, a


def torch_gate_backward(y, grad_a, tau, dtype):
    s = torch.sigmoid(y)
    return (grad_a.float() * s * (1 - s) / tau).to(dtype)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    device = args.device
    timings = []
    # (B, H, T): Qwen3-8B has 8 KV heads; a training micro-batch and a long prompt.
    for shape in [(1, 8, 4096), (8, 8, 4096), (4, 8, 32768)]:
        z = torch.randn(shape, device=device).to(dtype)
        noise = ops.logistic_noise_like(z, seed=0)
        n = z.numel()
        zsize = z.element_size()
        fwd_bytes = n * (zsize + 4 + 4 + 4 + zsize)  # z, noise in; y, p, a out
        bwd_bytes = n * (4 + zsize + zsize)  # y, grad_a in; grad_z out
        y, p, a = ops.gate_forward(z, noise, 0.1)
        gz = torch.empty_like(z)
        ex = exec_kwargs(z)
        t_kernel = time_fn(lambda: dms._C.gate_forward(z, noise, 0.1, y, p, a, **ex), device)
        t_dms = time_fn(lambda: ops.gate_forward(z, noise, 0.1), device)
        t_torch = time_fn(lambda: torch_gate(z, noise, 0.1), device)
        t_kernel_b = time_fn(lambda: dms._C.gate_backward(y, a, None, None, 0.1, gz, **ex), device)
        t_dms_b = time_fn(lambda: ops.gate_backward(y, a, None, None, 0.1, dtype=dtype), device)
        t_torch_b = time_fn(lambda: torch_gate_backward(y, a, 0.1, dtype), device)
        timings.append((shape, fwd_bytes, bwd_bytes, t_kernel, t_dms, t_torch, t_kernel_b, t_dms_b, t_torch_b))
    # Measured last: two big buffers first would change how malloc serves the
    # small ones above (page faults on every call), for both sides alike.
    bandwidth = memory_bandwidth(device)
    rows = []
    for shape, fwd_bytes, bwd_bytes, t_kernel, t_dms, t_torch, t_kernel_b, t_dms_b, t_torch_b in timings:
        rows.append([
            "x".join(map(str, shape)),
            f"{t_kernel * 1e6:.0f}", f"{fwd_bytes / t_kernel / 1e9:.1f} ({fwd_bytes / t_kernel / bandwidth:.0%})",
            f"{t_dms * 1e6:.0f}", f"{t_torch * 1e6:.0f}", f"{t_torch / t_dms:.2f}x",
            f"{t_kernel_b * 1e6:.0f}", f"{bwd_bytes / t_kernel_b / 1e9:.1f} ({bwd_bytes / t_kernel_b / bandwidth:.0%})",
            f"{t_dms_b * 1e6:.0f}", f"{t_torch_b * 1e6:.0f}", f"{t_torch_b / t_dms_b:.2f}x",
        ])
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {dms.get_num_threads()} threads"
    print_table(
        f"gate, {args.dtype}, {name}; copy bandwidth {bandwidth / 1e9:.1f} GB/s; `{command_line()}`",
        ["B x H x T", "fwd kernel us", "kernel GB/s (of copy)", "fwd op us", "torch us", "op speed-up",
         "bwd kernel us", "kernel GB/s (of copy)", "bwd op us", "torch us", "op speed-up"],
        rows, args.device,
    )


if __name__ == "__main__":
    main()
