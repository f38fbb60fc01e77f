"""End-to-end decode speed of a Qwen3-0.6B-shaped model (random weights,
28 layers, 8 KV heads of 128, bfloat16) at a long context, in one run:
transformers' dense Qwen3 on a StaticCache (SDPA), the DMS model on bfloat16
pages, and the DMS model on FP8 pages, the DMS caches holding 1/ratio of the
context. The caches are filled with random keys and values (a 32K-token
prefill of a 0.6B model would take minutes on a CPU and is not what is
measured); then greedy decode steps are timed, whole model included.

    python bench/generate.py [--context 32768] [--ratio 8] [--steps 8]
                             [--device cpu|cuda]
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import command_line, print_table, sync  # noqa: E402

from dms.models.qwen3 import Qwen3ConfigDMS, Qwen3ForCausalLMDMS  # noqa: E402

SHAPE = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
             num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
             tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def random_kv(n, device, dtype, generator):
    shape = (1, SHAPE["num_key_value_heads"], n, SHAPE["head_dim"])
    return [torch.randn(shape, generator=generator).to(device, dtype) for _ in range(2)]


def dense_cache(model, context, steps, device, dtype):
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=context + steps)
    g = torch.Generator().manual_seed(0)
    for i in range(SHAPE["num_hidden_layers"]):
        for t0 in range(0, context, 8192):
            k, v = random_kv(min(8192, context - t0), device, dtype, g)
            cache.layers[i].update(k, v)
    return cache


def dms_cache(model, context, ratio, kv_cache_dtype, device, dtype):
    """A DMSCache whose rows saw `context` random tokens through the engine's
    append, with decisions that evict all but about context / ratio of them
    (the window's last w + 1 included)."""
    cache = model.get_cache(kv_cache_dtype=kv_cache_dtype)
    w = model.config.dms_window_size
    keep = max(0.0, (context / ratio - (w + 1)) / max(1, context - (w + 1)))
    g = torch.Generator().manual_seed(0)
    for layer in cache.layers:
        for t0 in range(0, context, 8192):
            k, v = random_kv(min(8192, context - t0), device, dtype, g)
            decisions = (torch.rand(k.shape[:3], generator=g) >= keep).to(device)
            if not layer.is_initialized:
                layer.lazy_initialization(k, v)
            layer.paged.append(k, v, decisions)
        layer.tokens_fed = context
    return cache


@torch.no_grad()
def decode_steps(model, cache, context, steps, device, dense):
    """Seconds per greedy decode step (median of `steps`, after one warm-up)."""
    token = torch.tensor([[11]], device=device)
    times = []
    for i in range(steps + 1):
        kwargs = {"cache_position": torch.tensor([context + i], device=device)} if dense else {}
        sync(device)
        start = time.perf_counter()
        logits = model(input_ids=token, past_key_values=cache, use_cache=True, **kwargs).logits
        token = logits[:, -1:].argmax(-1)
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=32768, help="tokens seen per row (default 32768)")
    parser.add_argument("--ratio", type=int, default=8, help="DMS compression: stored = context / ratio (default 8)")
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per method (default 8)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), torch.bfloat16
    torch.manual_seed(0)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    dense = Qwen3ForCausalLM(Qwen3Config(**SHAPE)).to(device, dtype).eval()
    dense.config._attn_implementation = "sdpa"
    model = Qwen3ForCausalLMDMS(Qwen3ConfigDMS(**SHAPE, dms_separate_alpha=True)).to(device, dtype).eval()
    model.load_state_dict(dense.state_dict(), strict=False)  # the same weights; fresh adapters keep everything
    rows, base = [], None
    runs = [("transformers Qwen3, dense StaticCache (SDPA), bf16", None),
            (f"DMS {args.ratio}x, bf16 pages", "auto"),
            (f"DMS {args.ratio}x, FP8 E4M3 pages", "fp8_e4m3")]
    for name, kv in runs:
        if kv is None:
            cache = dense_cache(dense, args.context, args.steps + 1, device, dtype)
            kv_bytes = 2 * SHAPE["num_hidden_layers"] * SHAPE["num_key_value_heads"] * args.context * \
                SHAPE["head_dim"] * 2
            t = decode_steps(dense, cache, args.context, args.steps, device, dense=True)
        else:
            cache = dms_cache(model, args.context, args.ratio, kv, device, dtype)
            kv_bytes = cache.bytes_in_use()
            t = decode_steps(model, cache, args.context, args.steps, device, dense=False)
        base = base or t
        rows.append([name, f"{kv_bytes / 2**20:,.0f}", f"{t * 1e3:.1f}", f"{1 / t:.2f}", f"{base / t:.2f}x"])
        print(rows[-1], flush=True)
        del cache
    print_table(f"decode, Qwen3-0.6B shape (random weights), context {args.context}, batch 1; "
                f"`{command_line()}`", ["model / cache", "KV MiB", "ms / token", "tokens/s", "vs dense"], rows,
                args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
