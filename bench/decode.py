"""Benchmark of DMS decode attention (one query per row over the paged cache)
against scaled_dot_product_attention over a dense contiguous cache of the
full context, at compression 1x, 4x and 8x, in one run; bytes of K/V read per
step against the machine's copy bandwidth measured in the same run.
Qwen3-8B heads: H = 8 KV heads, G = 4, D = 128.

    python bench/decode.py [--device cpu|cuda] [--contexts 4096,32768]
                           [--dtype bfloat16] [--batch 1]
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import command_line, memory_bandwidth, print_table, time_fn  # noqa: E402

import dms  # noqa: E402
from dms.cache import PagedLayerCache  # noqa: E402


def filled_cache(B, H, D, context, ratio, dtype, device, page_size=256, window=512):
    """A cache that saw `context` tokens per row and stores context / ratio."""
    stored = max(1, context // ratio)
    cache = PagedLayerCache(B, H, D, window, page_size=page_size, dtype=dtype, device=device,
                            preallocate_for_tokens=stored)
    chunk = 4096
    for t0 in range(0, stored, chunk):
        n = min(chunk, stored - t0)
        k = torch.randn(B, H, n, D, device=device, dtype=dtype)
        cache.append(k, k, torch.zeros(B, H, n, dtype=torch.bool, device=device))
    cache.row_seen.fill_(context)  # the evicted tokens were seen, not stored
    return cache


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--contexts", default=None, help="default: 4096,32768,131072 on CUDA; 4096,32768 on CPU")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    contexts = args.contexts or ("4096,32768,131072" if device.startswith("cuda") else "4096,32768")
    B, H, G, D = args.batch, 8, 4, 128
    esize = torch.empty(0, dtype=dtype).element_size()
    rows, timings = [], []
    for context in (int(c) for c in contexts.split(",")):
        q = torch.randn(B, H * G, 1, D, device=device, dtype=dtype)
        k_dense = torch.randn(B, H, context, D, device=device, dtype=dtype)
        v_dense = torch.randn_like(k_dense)
        t_sdpa = time_fn(lambda: F.scaled_dot_product_attention(q, k_dense, v_dense, enable_gqa=True), device)
        del k_dense, v_dense
        for ratio in (1, 4, 8):
            cache = filled_cache(B, H, D, context, ratio, dtype, device)
            stored = int(cache.row_slots[0])
            t = time_fn(lambda: cache.decode_attention(q), device)
            timings.append((context, ratio, stored, t, t_sdpa))
            del cache
    bandwidth = memory_bandwidth(device)
    for context, ratio, stored, t, t_sdpa in timings:
        nbytes = 2 * B * H * stored * D * esize
        rows.append([context, f"{ratio}x", stored, f"{t * 1e6:.0f}", f"{t_sdpa * 1e6:.0f}", f"{t_sdpa / t:.2f}x",
                     f"{nbytes / t / 1e9:.1f} ({nbytes / t / bandwidth:.0%})"])
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {dms.get_num_threads()} threads"
    print_table(
        f"decode attention, B={B} H={H} G={G} D={D} {args.dtype}, {name}; copy bandwidth {bandwidth / 1e9:.1f} GB/s;"
        f" `{command_line()}`",
        ["context", "compression", "stored/row", "dms us", "dense sdpa us", "speed-up", "K/V GB/s (of copy)"],
        rows, args.device,
    )


if __name__ == "__main__":
    main()
