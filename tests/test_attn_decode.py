"""Decode attention over the paged cache (SPEC §5; csrc/cpu/decode_kernel.h):
the output and log-sum-exp of one query per row against a float64 formula
over the keys SPEC §3 lets the last token see, for every page dtype, head
dims that are and are not multiples of the kernel's vector width, group
sizes around its 4-head tiles, rows of different lengths (empty ones
included) and page sizes that put page boundaries inside its 16-slot blocks.
Every CPU kernel variant this machine can run (DMS_DECODE_KERNEL) is checked
in a subprocess, so the AVX2 and baseline code is tested on AVX-512 hosts."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dms
from dms.cache import PagedLayerCache
from tests import oracle

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["baseline", "avx2", "avx512", "avx512bf16"]
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _reference(q, k, v, alpha, padding, window, scale):
    """float64 o [B, H*G, D] and lse [B, H*G] of each row's last token over
    the keys it sees (oracle.visibility_mask); rows with no token give 0 and
    -inf."""
    B, H, T, D = k.shape
    G = q.shape[1] // H
    visible = oracle.visibility_mask(oracle.eviction_flags(alpha), window, padding)  # [B, H, T, T]
    o = torch.zeros(B, H * G, D, dtype=torch.float64)
    lse = torch.full((B, H * G), -math.inf, dtype=torch.float64)
    for b in range(B):
        tokens = (~padding[b]).nonzero().flatten()
        if len(tokens) == 0:
            continue
        last = int(tokens[-1])
        for h in range(H):
            keys = visible[b, h, last].nonzero().flatten()
            kk, vv = k[b, h, keys].double(), v[b, h, keys].double()
            for g in range(G):
                s = scale * (kk @ q[b, h * G + g].double())
                lse[b, h * G + g] = torch.logsumexp(s, 0)
                o[b, h * G + g] = torch.softmax(s, 0) @ vv
    return o, lse


def _case(dtype, D, G, page_size, lengths, window=8, seed=0, device="cpu", kv_cache_dtype="auto"):
    """A cache fed with rows of the given lengths (left padding makes them
    differ), random decisions; returns (got o, got lse, want o, want lse).
    FP8 pages: the reference sees the keys and values as the oracle rounds
    them (oracle.fp8_round)."""
    gen = torch.Generator().manual_seed(seed)
    B, H, T = len(lengths), 2, max(lengths)
    q = torch.randn(B, H * G, D, generator=gen).to(dtype)
    k = torch.randn(B, H, T, D, generator=gen).to(dtype)
    v = torch.randn(B, H, T, D, generator=gen).to(dtype)
    alpha = torch.rand(B, H, T, generator=gen) < 0.5
    padding = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        padding[b, : T - n] = True
    cache = PagedLayerCache(B, H, D, window, page_size=page_size, dtype=dtype, device=device,
                            kv_cache_dtype=kv_cache_dtype)
    cache.append(*(t.to(device) for t in (k, v, alpha, padding)))
    scale = D**-0.5
    o, lse = cache.decode_attention(q[:, :, None].contiguous().to(device), scale=scale)
    if kv_cache_dtype != "auto":
        k, v = oracle.fp8_round(k, kv_cache_dtype), oracle.fp8_round(v, kv_cache_dtype)
    want_o, want_lse = _reference(q, k, v, alpha, padding, window, scale)
    return o[:, :, 0].double().cpu(), lse[:, :, 0].double().cpu(), want_o, want_lse


def _check(got_o, got_lse, want_o, want_lse, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got_o, want_o, rtol=tol, atol=tol)
    torch.testing.assert_close(got_lse, want_lse, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [8, 40, 64, 72, 128])
@pytest.mark.parametrize("G", [1, 3, 4, 5, 8])
def test_decode_matches_float64(dtype, D, G):
    """Rows of 0, 1, 17 and 300 tokens, pages of 7 slots: partial blocks,
    page boundaries inside blocks, an empty row."""
    _check(*_case(dtype, D, G, page_size=7, lengths=[300, 17, 1, 0], seed=D * 10 + G), dtype)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [8, 19, 64, 72, 128])
@pytest.mark.parametrize("G", [1, 4, 5, 8])
def test_fp8_decode_matches_float64(kv_cache_dtype, dtype, D, G):
    """FP8 pages, widened in registers and scaled per slot: the same rows,
    against the float64 formula on the oracle's rounding of K and V (that
    rounding moves o by ~0.1 here, far above the tolerance)."""
    got_o, got_lse, want_o, want_lse = _case(dtype, D, G, page_size=7, lengths=[300, 17, 1, 0],
                                             seed=D * 10 + G, kv_cache_dtype=kv_cache_dtype)
    _check(got_o, got_lse, want_o, want_lse, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D,G,page_size,lengths", [
    (128, 4, 7, [300, 17, 1, 0]),  # odd page alignment, an empty row, rows longer than a 64-key chunk
    (128, 8, 256, [2000, 65]),
    (64, 5, 16, [129, 64, 63]),  # a group size off the 4-head tiles, rows around one chunk
    (80, 4, 33, [1000]),
], ids=["D128-G4-P7", "D128-G8-P256", "D64-G5-P16", "D80-G4-P33"])
def test_cuda_decode_at_real_shapes(dtype, D, G, page_size, lengths):
    _check(*_case(dtype, D, G, page_size, lengths, seed=D + G, device="cuda"), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("kv_cache_dtype", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("D,G,page_size,lengths", [(128, 4, 7, [300, 17, 1, 0]), (128, 8, 256, [2000, 65]),
                                                   (72, 5, 16, [129, 64, 63])], ids=["D128-G4-P7", "D128-G8-P256",
                                                                                     "D72-G5-P16"])
def test_cuda_fp8_decode_at_real_shapes(kv_cache_dtype, D, G, page_size, lengths):
    _check(*_case(torch.bfloat16, D, G, page_size, lengths, seed=D + G, device="cuda",
                  kv_cache_dtype=kv_cache_dtype), torch.bfloat16)


@pytest.mark.cuda
def test_cuda_decode_split_over_32k():
    """A 32K-token row: the flash-decoding split over multiprocessors and
    its log-sum-exp merge (the workspace path)."""
    _check(*_case(torch.bfloat16, 128, 4, 256, [32768, 100], window=512, seed=3, device="cuda"), torch.bfloat16)


@pytest.mark.parametrize("page_size", [1, 16, 256])
def test_decode_page_sizes(page_size):
    _check(*_case(torch.bfloat16, 128, 4, page_size, lengths=[700, 33], seed=page_size), torch.bfloat16)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_e4m3"])
def test_decode_long_row_split_over_threads(kv_cache_dtype):
    """A row long enough to be split into key ranges merged by log-sum-exp."""
    try:
        dms.set_num_threads(2)
        _check(*_case(torch.float32, 64, 4, 64, lengths=[5000], window=16, seed=5, kv_cache_dtype=kv_cache_dtype),
               torch.float32)
    finally:
        dms.set_num_threads(0)


def test_build_info_names_the_decode_kernel():
    assert dms.build_info()["cpu_kernels"]["attn_decode"] in VARIANTS


def _run_with_kernel(kernel, *pytest_args):
    env = {**os.environ, "DMS_DECODE_KERNEL": kernel}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.skipif("DMS_DECODE_KERNEL" in os.environ, reason="already running one variant")
@pytest.mark.parametrize("kernel", VARIANTS)
def test_every_kernel_variant(kernel):
    """The tests above, with decode forced onto one variant."""
    probe = subprocess.run([sys.executable, "-c", "import dms; print(dms.build_info()['cpu_kernels']['attn_decode'])"],
                           cwd=ROOT, env={**os.environ, "DMS_DECODE_KERNEL": kernel}, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    if probe.stdout.strip() != kernel:
        assert probe.stdout.strip() == "invalid DMS_DECODE_KERNEL"
        pytest.skip(f"this CPU cannot run the {kernel} decode kernel")
    run = _run_with_kernel(kernel, str(Path(__file__).relative_to(ROOT)), "tests/test_nan.py", "-k",
                           "matches_float64 or page_sizes or split_over_threads or (nan_decode and cpu)")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout


@pytest.mark.skipif("DMS_DECODE_KERNEL" in os.environ, reason="already running one variant")
def test_unknown_kernel_name_is_an_error():
    code = ("import torch, dms\n"
            "from dms.cache import PagedLayerCache\n"
            "print(dms.build_info()['cpu_kernels']['attn_decode'])\n"
            "c = PagedLayerCache(1, 1, 4, 2, page_size=2, dtype=torch.float32)\n"
            "c.append(torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4), torch.zeros(1, 1, 1, dtype=torch.bool))\n"
            "try:\n"
            "    c.decode_attention(torch.ones(1, 1, 1, 4))\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "DMS_DECODE_KERNEL": "avx9000"},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "invalid DMS_DECODE_KERNEL"
    assert lines[1].startswith("DMS_DECODE_KERNEL: expected auto, baseline, avx2, avx512 or avx512bf16"), lines
    assert "'avx9000'" in lines[1]
