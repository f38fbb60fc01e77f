"""Shared timing helpers for the benchmarks in bench/: a robust timer (median
of repeats, CUDA-synchronised), the machine's measured memory bandwidth, and
table printing with the command that produced it."""

import shlex
import statistics
import sys
import time

import torch


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn, device, *, warmup=3, repeats=20, min_time=0.2):
    """Median seconds of one call of `fn` (after warm-up); repeats until at
    least `min_time` seconds were measured."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    total = 0.0
    while len(samples) < repeats or total < min_time:
        start = time.perf_counter()
        fn()
        sync(device)
        elapsed = time.perf_counter() - start
        samples.append(elapsed)
        total += elapsed
        if len(samples) >= 10 * repeats:
            break
    return statistics.median(samples)


def memory_bandwidth(device, nbytes=1 << 28):
    """Bytes per second of a large tensor copy (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), device, repeats=10)
    return 2 * nbytes / seconds


_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_model():
    """(model name, ISA flags of interest) from /proc/cpuinfo ("unknown", ()
    where it cannot be read)."""
    fields, flags = {}, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    name = fields.get("model name", "unknown")
    if "cpu family" in fields and "model" in fields:  # virtual machines often hide the marketing name
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name, tuple(flag for flag in _ISA_FLAGS if flag in flags)


def machine_description(device="cpu"):
    """One line naming the machine a table was measured on: the CPU model, its
    cores and ISA extensions, the ISA path each dms CPU kernel takes, the
    threads used and torch's own CPU path; the GPU on CUDA."""
    import os

    import dms

    name, flags = cpu_model()
    info = dms.build_info()
    kernels = ", ".join(f"{op} {path}" for op, path in info["cpu_kernels"].items())
    line = (f"machine: {name}, {os.cpu_count()} cores ({' '.join(flags) or 'no AVX2'}); dms {dms.get_num_threads()} "
            f"threads, kernels: {kernels}; torch {torch.__version__} CPU path "
            f"{torch.backends.cpu.get_cpu_capability()}")
    if str(device).startswith("cuda") and torch.cuda.is_available():
        line += f"; GPU {torch.cuda.get_device_name(torch.device(device))}"
    return line


def print_table(title, header, rows, device="cpu"):
    """Prints a Markdown table under `title` and the machine's description."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    print(machine_description(device))
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |")


def command_line():
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)
