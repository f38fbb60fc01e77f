"""Benchmark of the DMS training attention (SPEC §3 soft form) against, in the
same run and on the same inputs:
  (a) torch.nn.attention.flex_attention, compiled, with the same score
      modifier (the reference implementation's approach);
  (b) scaled_dot_product_attention with a plain causal mask (no DMS term: the
      speed to aim at).
Forward and forward+backward (gradients to q, k, v and, for dms and flex, the
gate logits y), with achieved GFLOP/s against the machine's measured matmul
rate. Qwen3-like heads: G = 4, D = 128, w = 512.

    python bench/attention_train.py [--device cpu|cuda] [--seq 1024,4096,16384]
                                    [--dtype float32,bfloat16] [--kv-heads N]
"""

import argparse
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import command_line, print_table, sync, time_fn  # noqa: E402

import dms  # noqa: E402
from dms import ops  # noqa: E402


def matmul_rate(device, dtype, n=4096):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_fn(lambda: a @ b, device, repeats=5)
    return 2 * n**3 / seconds


def make_flex(B, H, G, T, window, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    block_mask = create_block_mask(causal, B, None, T, T, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, y):
        # Key i is penalised by logsigmoid(-y[i + 1]) beyond the window.
        penalty = F.pad(F.logsigmoid(-y[..., 1:]), (0, 1))

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(q_idx - kv_idx > window, score + penalty[b, h // G, kv_idx], score)

        return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)

    return run


def flex_times(B, H, G, T, w, device, q, k, v, y, grad_o, leaf, repeats):
    """(forward, forward+backward) seconds of compiled FlexAttention, or the
    reason a direction could not run (e.g. no backward on CPU)."""
    out = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flex = make_flex(B, H, G, T, w, device)

            def flex_fwd():
                with torch.no_grad():
                    flex(q, k, v, y)

            out.append(time_fn(flex_fwd, device, warmup=1, repeats=repeats, min_time=0))
    except Exception as exc:  # the table says why instead of hiding the row
        return (f"failed: {type(exc).__name__}", "")

    def flex_both():
        qq, kk, vv, yy = leaf(q, k, v, y)
        flex(qq, kk, vv, yy).backward(grad_o)

    try:
        out.append(time_fn(flex_both, device, warmup=1, repeats=repeats, min_time=0))
    except NotImplementedError as exc:
        out.append("not supported" + (" on CPU" if "CPU" in str(exc) else ""))
    return tuple(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq", default="1024,4096,16384", help="sequence lengths (default 1024,4096,16384)")
    parser.add_argument("--dtype", default="float32,bfloat16")
    parser.add_argument("--kv-heads", type=int, default=None,
                        help="KV heads H (default: 8, Qwen3-8B's, on CUDA; 2 on CPU to keep the run short)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile is slow on CPU)")
    args = parser.parse_args()
    device = args.device
    G, D, B, w = 4, 128, args.batch, args.window
    H = args.kv_heads or (8 if device.startswith("cuda") else 2)
    rows = []
    rates = {}
    for dtype_name in args.dtype.split(","):
        dtype = getattr(torch, dtype_name)
        rates[dtype_name] = matmul_rate(device, dtype)
        for T in (int(t) for t in args.seq.split(",")):
            g = torch.Generator(device="cpu").manual_seed(0)
            q = torch.randn(B, H * G, T, D, generator=g).to(device, dtype)
            k = torch.randn(B, H, T, D, generator=g).to(device, dtype)
            v = torch.randn(B, H, T, D, generator=g).to(device, dtype)
            y = (torch.randn(B, H, T, generator=g) * 3).to(device)
            grad_o = torch.randn_like(q)
            fwd_flops = 4 * B * H * G * D * T * (T + 1) / 2  # causal: half the pairs
            both_flops = 3.5 * fwd_flops  # backward = 2.5 x forward, FlashAttention's count
            repeats = 3 if T <= 4096 else 1

            def leaf(*ts):
                return [t.detach().clone().requires_grad_(True) for t in ts]

            def dms_fwd():
                ops.attn_train_forward(q, k, v, y, window=w)

            def dms_both():
                qq, kk, vv, yy = leaf(q, k, v, y)
                ops.attn_train(qq, kk, vv, yy, window=w).backward(grad_o)

            def sdpa_fwd():
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

            def sdpa_both():
                qq, kk, vv = leaf(q, k, v)
                F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True).backward(grad_o)

            times = {
                "dms": (time_fn(dms_fwd, device, warmup=1, repeats=repeats, min_time=0),
                        time_fn(dms_both, device, warmup=1, repeats=repeats, min_time=0)),
                "sdpa causal": (time_fn(sdpa_fwd, device, warmup=1, repeats=repeats, min_time=0),
                                time_fn(sdpa_both, device, warmup=1, repeats=repeats, min_time=0)),
            }
            if not args.no_flex:
                times["flex compiled"] = flex_times(B, H, G, T, w, device, q, k, v, y, grad_o, leaf, repeats)
            sync(device)
            t_dms = times["dms"]
            for name, (tf, tb) in times.items():
                row = [dtype_name, T, name]
                for t, flops, ref in ((tf, fwd_flops, t_dms[0]), (tb, both_flops, t_dms[1])):
                    if isinstance(t, str):
                        row += [t, "", ""]
                    else:
                        row += [f"{t * 1e3:.1f}", f"{flops / t / 1e9:.0f} ({flops / t / rates[dtype_name]:.0%})",
                                f"{t / ref:.2f}x"]
                rows.append(row)
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU, {dms.get_num_threads()} threads, dms kernel {dms.build_info()['cpu_kernels']['attn_train']}"
    rate_text = ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in rates.items())
    print_table(
        f"attn_train, B={B} H={H} G={G} D={D} w={w}, {name}; matmul {rate_text}; `{command_line()}`",
        ["dtype", "T", "method", "fwd ms", "fwd GFLOP/s (of matmul)", "fwd time / dms",
         "fwd+bwd ms", "fwd+bwd GFLOP/s (of matmul)", "fwd+bwd time / dms"],
        rows, args.device,
    )


if __name__ == "__main__":
    main()
