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


def print_table(title, header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |")


def command_line():
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)
