"""Benchmark of DMS prefill attention (the new tokens against the cache and
each other, hard eviction masks) against scaled_dot_product_attention with a
plain causal mask, in one run: a prompt prefilled at once into an empty cache,
and the same prompt in chunks (each chunk against the cache the earlier
chunks left). Qwen3-8B heads: H = 8, G = 4, D = 128, w = 512, half the
decisions evict.

    python bench/prefill.py [--device cpu|cuda] [--seq 1024,4096] [--chunk 1024]
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import command_line, print_table, time_fn  # noqa: E402

import dms  # noqa: E402
from dms.cache import PagedLayerCache  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq", default="1024,4096")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-heads", type=int, default=None, help="default 8 on CUDA, 2 on CPU")
    args = parser.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    B, G, D, w = 1, 4, 128, 512
    H = args.kv_heads or (8 if device.startswith("cuda") else 2)
    rows = []
    for T in (int(t) for t in args.seq.split(",")):
        q = torch.randn(B, H * G, T, D, device=device, dtype=dtype)
        k = torch.randn(B, H, T, D, device=device, dtype=dtype)
        v = torch.randn_like(k)
        decisions = torch.rand(B, H, T, device=device) < 0.5
        flops = 4 * B * H * G * D * T * (T + 1) / 2

        def whole():
            cache = PagedLayerCache(B, H, D, w, dtype=dtype, device=device, preallocate_for_tokens=T)
            cache.prefill_attention(q, k, v, decisions)

        def chunked():
            cache = PagedLayerCache(B, H, D, w, dtype=dtype, device=device, preallocate_for_tokens=T)
            for t0 in range(0, T, args.chunk):
                sl = slice(t0, t0 + args.chunk)
                qs, ks, vs, ds = q[:, :, sl], k[:, :, sl], v[:, :, sl], decisions[:, :, sl]
                cache.prefill_attention(qs, ks, vs, ds)
                cache.append(ks, vs, ds)

        t_sdpa = time_fn(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), device,
                         warmup=1, repeats=3, min_time=0)
        t_whole = time_fn(whole, device, warmup=1, repeats=3, min_time=0)
        t_chunked = time_fn(chunked, device, warmup=1, repeats=3, min_time=0)
        for name, t in (("sdpa causal", t_sdpa), ("dms prefill, whole", t_whole),
                        (f"dms prefill, chunks of {args.chunk} + append", t_chunked)):
            rows.append([T, name, f"{t * 1e3:.1f}", f"{flops / t / 1e9:.0f}", f"{t / t_sdpa:.2f}x"])
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {dms.get_num_threads()} threads"
    print_table(f"prefill attention, B={B} H={H} G={G} D={D} w={w} {args.dtype}, {name}; `{command_line()}`",
                ["T", "method", "ms", "GFLOP/s (causal count)", "time / sdpa"], rows, device)


if __name__ == "__main__":
    main()
