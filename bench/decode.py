"""Benchmark of DMS decode attention (one query per row over the paged cache)
against scaled_dot_product_attention over a dense contiguous cache of the
full context, at compression 1x, 4x and 8x, with pages in the model's dtype
and in FP8 (E4M3 codes and a float32 scale per row), in one run; bytes of
K/V read per step (scales included) against the machine's copy bandwidth
measured in the same run. Qwen3-8B heads: H = 8 KV heads, G = 4, D = 128.

    python bench/decode.py [--device cpu|cuda] [--contexts 4096,32768]
                           [--dtype bfloat16] [--batch 1] [--kv auto,fp8_e4m3]
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


def filled_cache(B, H, D, context, ratio, dtype, device, page_size=256, window=512, kv_cache_dtype="auto"):
    """A cache that saw `context` tokens per row through append and stores
    context / ratio of them: the first context / ratio - (w + 1) and the
    window's last w + 1 (the decisions flag every other token)."""
    stored = max(window + 1, context // ratio)
    kept = stored - (window + 1)
    cache = PagedLayerCache(B, H, D, window, page_size=page_size, dtype=dtype, device=device,
                            preallocate_for_tokens=stored, kv_cache_dtype=kv_cache_dtype)
    chunk = 4096
    for t0 in range(0, context, chunk):
        n = min(chunk, context - t0)
        k = torch.randn(B, H, n, D, device=device, dtype=dtype)
        flags = (torch.arange(t0, t0 + n, device=device) > kept).expand(B, H, n)  # decision t flags token t - 1
        cache.append(k, k, flags.contiguous() if ratio > 1 else torch.zeros_like(flags))
    return cache


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--contexts", default=None, help="default: 4096,32768,131072 on CUDA; 4096,32768 on CPU")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--kv", default="auto,fp8_e4m3", help="page formats, comma-separated (default auto,fp8_e4m3)")
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
            native = None
            for kv in args.kv.split(","):
                cache = filled_cache(B, H, D, context, ratio, dtype, device, kv_cache_dtype=kv)
                stored = int(cache.row_slots[0])
                t = time_fn(lambda: cache.decode_attention(q), device)
                native = t if kv == "auto" else native
                per_slot = 2 * (D * esize if kv == "auto" else D + 4)  # K and V (FP8: codes and a scale each)
                timings.append((context, ratio, kv, stored, t, t_sdpa, native, B * H * stored * per_slot))
                del cache
    bandwidth = memory_bandwidth(device)
    for context, ratio, kv, stored, t, t_sdpa, native, nbytes in timings:
        rows.append([context, f"{ratio}x", args.dtype if kv == "auto" else kv, stored, f"{t * 1e6:.0f}",
                     f"{t_sdpa * 1e6:.0f}", f"{t_sdpa / t:.2f}x", f"{native / t:.2f}x" if native else "",
                     f"{nbytes / t / 1e9:.1f} ({nbytes / t / bandwidth:.0%})"])
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {dms.get_num_threads()} threads"
    print_table(
        f"decode attention, B={B} H={H} G={G} D={D} {args.dtype}, {name}; copy bandwidth {bandwidth / 1e9:.1f} GB/s;"
        f" `{command_line()}`",
        ["context", "compression", "pages", "stored/row", "dms us", "dense sdpa us", "speed-up",
         f"vs {args.dtype} pages", "K/V GB/s (of copy)"],
        rows, args.device,
    )


if __name__ == "__main__":
    main()
