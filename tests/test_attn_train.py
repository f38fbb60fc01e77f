"""DMS training attention (SPEC §3, soft form): the C kernel (CPU) and the CUDA
kernel against the float64 oracle - output, log-sum-exp and all four
gradients - over awkward shapes, GQA factors, windows, padding and dtypes;
finite differences for grad_y; layouts; determinism; bad input."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dms
from dms import ops
from tests import oracle
from tests.conftest import DEVICES

ROOT = Path(__file__).resolve().parents[1]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative error bounds (max abs error / max abs reference) per input dtype.
RTOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}

CASES = [
    # B, H, G, T, D, window, padding
    (1, 1, 1, 1, 8, 0, False),
    (1, 1, 1, 1, 8, 0, True),
    (2, 1, 2, 5, 3, 1, True),
    (1, 2, 4, 65, 16, 0, False),
    (2, 2, 2, 113, 32, 7, True),
    (1, 1, 8, 130, 64, 1, True),
    (1, 2, 1, 200, 128, 64, False),
    (1, 1, 4, 97, 80, 500, True),  # window >= T: no penalty anywhere
    (1, 1, 2, 150, 256, 33, False),
]


def _case_id(case):
    B, H, G, T, D, w, pad = case
    return f"B{B}H{H}G{G}T{T}D{D}w{w}{'pad' if pad else ''}"


def _make(case, dtype, device, seed=0):
    B, H, G, T, D, w, pad = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H * G, T, D, generator=g).to(dtype)
    k = torch.randn(B, H, T, D, generator=g).to(dtype)
    v = torch.randn(B, H, T, D, generator=g).to(dtype)
    y = torch.randn(B, H, T, generator=g) * 4
    key_padding = None
    if pad:
        key_padding = torch.zeros(B, T, dtype=torch.bool)
        key_padding[0, : min(3, T)] = True  # left padding, as generate makes it
        if B > 1:
            key_padding[1, T // 2] = True  # and one hole in the middle
    grad_o = torch.randn(B, H * G, T, D, generator=g)
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    return [on(t) for t in (q, k, v, y, key_padding, grad_o)]


def _rel_err(got, want):
    got, want = got.double().cpu(), want.double().cpu()
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    if not finite.any():
        return 0.0
    # Normalised by the largest reference value, at least 1: gradients that are
    # exactly 0 in theory (T = 1) are held to an absolute bound instead.
    return ((got - want)[finite].abs().max() / want[finite].abs().max().clamp_min(1.0)).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_and_gradients_match_oracle(case, dtype, device):
    w = case[5]
    q, k, v, y, key_padding, grad_o = _make(case, dtype, device)
    ins = [t.clone().requires_grad_(True) for t in (q, k, v, y)]
    o, lse = ops.AttnTrain.apply(*ins, key_padding, w, None)
    (o.float() * grad_o).sum().backward()

    ref_ins = [t.detach().cpu().double().requires_grad_(True) for t in (q, k, v, y)]
    kp = None if key_padding is None else key_padding.cpu()
    ref_o, ref_lse = oracle.attention_train(*ref_ins, w, key_padding=kp)
    (ref_o * grad_o.cpu().double()).sum().backward()

    assert o.dtype == dtype and lse.dtype == torch.float32
    assert _rel_err(o, ref_o) < RTOL[dtype]
    assert _rel_err(lse, ref_lse) < RTOL[dtype]
    for name, got, ref in zip("qkvy", ins, ref_ins):
        assert got.grad.dtype == got.dtype
        assert _rel_err(got.grad, ref.grad) < RTOL[dtype], name
    if key_padding is not None:  # padding queries: o = 0, lse = -inf, no grad
        pad = key_padding.cpu()
        assert torch.all(o.detach().cpu().transpose(1, 2)[pad] == 0)
        assert torch.all(lse.cpu().transpose(1, 2)[pad] == -torch.inf)
        assert torch.all(ins[0].grad.cpu().transpose(1, 2)[pad] == 0)
        assert torch.all(ins[1].grad.cpu().transpose(1, 2)[pad] == 0)  # padding keys
        assert torch.all(ins[2].grad.cpu().transpose(1, 2)[pad] == 0)
    assert torch.all(ins[3].grad[..., 0] == 0)  # no key precedes token 0


@pytest.mark.skipif(os.environ.get("DMS_BF16DOT") in ("off", "0") or os.environ.get("DMS_AMX") in ("off", "0"),
                    reason="already running another tile-product path")
@pytest.mark.skipif(dms.build_info()["sanitized"], reason="its subprocess would load the unsanitized build")
def test_every_tile_product_path_matches_the_oracle():
    """bfloat16 tile products of the training attention and of prefill run
    on AMX where the CPU has it (and Linux grants it), else on vdpbf16ps
    where the CPU has AVX512-BF16, else in float32. The oracle tests of this
    process cover the fastest path; they run again in a subprocess for each
    slower path this CPU can take: DMS_AMX=off (vdpbf16ps) and
    DMS_BF16DOT=off (float32, what every other CPU takes)."""
    info = dms.build_info()
    features = info["cpu_features"]
    want = ("amx" if "amx_bf16" in features else "avx512bf16" if "avx512bf16" in features
            else info["cpu_kernels"]["gate"])
    assert info["cpu_kernels"]["attn_train"] == info["cpu_kernels"]["attn_prefill"] == want
    paths = [({"DMS_BF16DOT": "off"}, info["cpu_kernels"]["gate"])]
    if want == "amx":
        paths.append(({"DMS_AMX": "off"}, "avx512bf16"))
    for setting, kernel in paths:
        env = {**os.environ, **setting}
        probe = subprocess.run([sys.executable, "-c", "import dms; print(dms.build_info()['cpu_kernels']['attn_train'])"],
                               cwd=ROOT, env=env, capture_output=True, text=True)
        assert probe.returncode == 0, probe.stderr
        assert probe.stdout.strip() == kernel, setting
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              str(Path(__file__).relative_to(ROOT)), "tests/test_cache.py", "tests/test_nan.py", "-k",
                              "(match_oracle and bfloat16 and cpu) or (reduced_precision_cache and bfloat16) "
                              "or (nan and not decode and cpu)"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, (setting, run.stdout[-4000:] + run.stderr[-2000:])
        assert f"{len(CASES) + 2 + 4} passed" in run.stdout, setting


@pytest.mark.parametrize("device", DEVICES)
def test_no_gate_is_causal_attention(device):
    q, k, v, _, _, _ = _make((2, 2, 4, 77, 32, 3, False), torch.float32, device)
    o = ops.attn_train(q, k, v, None, window=3)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_any_gradient_layout_reaches_the_kernel(device):
    """Losses whose gradient w.r.t. o is not row-contiguous: o.sum() (an
    expanded, stride-0 gradient), a loss on o.transpose(2, 3), a float32 copy
    of a bfloat16 o. Each gives the gradients of the contiguous case."""
    q, k, v, y, kp, _ = _make((1, 2, 2, 33, 16, 4, True), torch.float32, device)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, y)]
    losses = {"sum": lambda o: o.sum(), "transposed": lambda o: (o.transpose(2, 3) * torch.linspace(
        0, 1, o.shape[2], device=o.device)).sum()}
    for name, loss in losses.items():
        grads = []
        for contiguous in (False, True):
            for t in leaves:
                t.grad = None
            o = ops.attn_train(*leaves[:3], leaves[3], kp, window=4)
            (loss(o.contiguous() * 1.0) if contiguous else loss(o)).backward()
            grads.append([t.grad.clone() for t in leaves])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    ops.attn_train(qb, kb, vb, None, window=4).float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad.float()).all() for t in (qb, kb, vb))


@pytest.mark.parametrize("device", DEVICES)
def test_projection_layout_is_read_in_place(device):
    """q, k, v as [B, T, heads, D] memory viewed as [B, heads, T, D]."""
    q, k, v, y, kp, grad_o = _make((2, 2, 2, 70, 16, 5, True), torch.float32, device)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous() and dms._C.tensor_info(qt)["strides"][3] == 1
    o1, lse1 = ops.attn_train_forward(q, k, v, y, kp, window=5)
    o2, lse2 = ops.attn_train_forward(qt, kt, vt, y, kp, window=5)
    assert torch.equal(o1, o2) and torch.equal(lse1, lse2)
    g1 = ops.attn_train_backward(q, k, v, y, kp, o1, lse1, grad_o, window=5)
    g2 = ops.attn_train_backward(qt, kt, vt, y, kp, o2, lse2, grad_o.transpose(1, 2).contiguous().transpose(1, 2),
                                 window=5)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_grad_y_finite_differences():
    """dL/dy from the kernel against central differences of the kernel's own
    forward, float32, on a tiny case with every y position exercised."""
    q, k, v, y, _, grad_o = _make((1, 1, 2, 9, 4, 1, False), torch.float32, "cpu", seed=3)
    y = y / 4  # keep sigmoid(y) away from saturation
    yy = y.clone().requires_grad_(True)
    o = ops.attn_train(q, k, v, yy, window=1)
    (o * grad_o).sum().backward()

    def loss(y_):
        return (ops.attn_train_forward(q, k, v, y_, window=1)[0].double() * grad_o.double()).sum().item()

    eps = 1e-2
    fd = torch.zeros_like(y)
    for m in range(y.shape[-1]):
        plus, minus = y.clone(), y.clone()
        plus[..., m] += eps
        minus[..., m] -= eps
        fd[..., m] = (loss(plus) - loss(minus)) / (2 * eps)
    assert fd[..., 2:].abs().max() > 1e-2  # the check has something to check
    torch.testing.assert_close(yy.grad, fd, rtol=2e-2, atol=2e-3)


def test_deterministic_and_thread_independent():
    q, k, v, y, kp, grad_o = _make((2, 2, 2, 150, 64, 20, True), torch.float32, "cpu")
    results = []
    try:
        for threads in (1, 2, 2):
            dms.set_num_threads(threads)
            o, lse = ops.attn_train_forward(q, k, v, y, kp, window=20)
            results.append((o, lse, *ops.attn_train_backward(q, k, v, y, kp, o, lse, grad_o, window=20)))
    finally:
        dms.set_num_threads(0)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_numpy_path():
    q, k, v, y, kp, _ = _make((1, 2, 2, 40, 16, 4, True), torch.float32, "cpu")
    o_np = ops.attn_train(q.numpy(), k.numpy(), v.numpy(), y.numpy(), kp.numpy(), window=4)
    assert isinstance(o_np, np.ndarray)
    np.testing.assert_array_equal(o_np, ops.attn_train(q, k, v, y, kp, window=4).numpy())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_cpu(dtype):
    case = (2, 2, 4, 300, 128, 64, True)
    cpu = _make(case, dtype, "cpu")
    gpu = [None if t is None else t.cuda() for t in cpu]
    outs = []
    for q, k, v, y, kp, grad_o in (cpu, gpu):
        o, lse = ops.attn_train_forward(q, k, v, y, kp, window=64)
        outs.append((o, lse, *ops.attn_train_backward(q, k, v, y, kp, o, lse, grad_o.to(q.dtype), window=64)))
    for name, c, g in zip(["o", "lse", "dq", "dk", "dv", "dy"], *outs):
        assert _rel_err(g, c) < RTOL[dtype], name


def _cuda_vs_cpu_and_oracle(case, dtype):
    """Forward and backward on the GPU against the CPU kernel and the float64
    oracle; padding semantics; a second GPU backward gives the same bits."""
    B, H, G, T, D, w, pad = case
    cpu = _make(case, dtype, "cpu", seed=T + D)
    gpu = [None if t is None else t.cuda() for t in cpu]
    outs = []
    for q, k, v, y, kp, grad_o in (cpu, gpu):
        o, lse = ops.attn_train_forward(q, k, v, y, kp, window=w)
        outs.append((o, lse, *ops.attn_train_backward(q, k, v, y, kp, o, lse, grad_o.to(dtype), window=w)))
    q, k, v, y, kp, grad_o = cpu
    ref_ins = [t.double().requires_grad_(True) for t in (q, k, v, y)]
    ref_o, ref_lse = oracle.attention_train(*ref_ins, w, key_padding=kp)
    (ref_o * grad_o.to(dtype).double()).sum().backward()
    refs = [ref_o, ref_lse] + [t.grad for t in ref_ins]
    names = ["o", "lse", "dq", "dk", "dv", "dy"]
    for name, c, g, r in zip(names, outs[0], outs[1], refs):
        assert g.dtype == c.dtype, name
        assert _rel_err(g, c) < RTOL[dtype], (name, "gpu vs cpu")
        assert _rel_err(g, r) < RTOL[dtype], (name, "gpu vs oracle")
    o, lse, dq, dk, dv, dy = (t.cpu() for t in outs[1])
    if kp is not None:  # padding queries: o = 0, lse = -inf, no gradient
        assert torch.all(o.transpose(1, 2)[kp] == 0) and torch.all(lse.transpose(1, 2)[kp] == -torch.inf)
        for grad in (dq, dk, dv):
            assert torch.all(grad.transpose(1, 2)[kp] == 0)
    assert torch.all(dy[..., 0] == 0)
    q, k, v, y, kp, grad_o = gpu
    again = ops.attn_train_backward(q, k, v, y, kp, outs[1][0], outs[1][1], grad_o.to(dtype), window=w)
    for a, b in zip(outs[1][2:], again):
        assert torch.equal(a, b), "GPU backward is not deterministic"


# The tensor-core kernels: bf16 / f16 with head dim 64 or 128; T not a
# multiple of the tiles (64 queries, 32 or 64 keys), GQA, windows, padding.
MMA_CASES = [
    (1, 1, 1, 1, 64, 0, False),
    (2, 1, 4, 17, 128, 3, True),
    (1, 2, 1, 64, 64, 0, True),
    (2, 1, 4, 130, 64, 40, True),
    (1, 1, 4, 130, 128, 0, False),
    (2, 2, 1, 300, 128, 40, True),
    (1, 1, 4, 300, 64, 3, False),
    (1, 1, 2, 300, 128, 400, True),  # window >= T: no penalty anywhere
    (1, 2, 2, 1000, 128, 64, True),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", MMA_CASES, ids=_case_id)
def test_cuda_tensor_core_kernels(case, dtype):
    _cuda_vs_cpu_and_oracle(case, dtype)


# The SIMT kernels: float32, and head dims the tensor-core kernels leave out.
SIMT_CASES = [
    ((2, 1, 4, 130, 64, 3, True), torch.float32),
    ((1, 2, 2, 200, 128, 40, True), torch.float32),
    ((2, 1, 2, 130, 80, 3, True), torch.bfloat16),
    ((1, 1, 4, 97, 32, 500, False), torch.float16),
    ((1, 1, 2, 150, 256, 33, True), torch.bfloat16),
]


@pytest.mark.cuda
@pytest.mark.parametrize("case,dtype", SIMT_CASES, ids=lambda x: _case_id(x) if isinstance(x, tuple) else str(x))
def test_cuda_simt_kernels(case, dtype):
    _cuda_vs_cpu_and_oracle(case, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_layouts_and_streams_give_the_same_bits(dtype):
    """The [B, T, heads, D] projection layout (read in place), rows that are
    not 16-byte aligned (the tensor-core kernels' plain-load path) and a
    non-default stream all give bit-identical results."""
    case = (2, 2, 2, 150, 64, 5, True)
    q, k, v, y, kp, grad_o = (None if t is None else t.cuda() for t in _make(case, dtype, "cpu"))
    grad_o = grad_o.to(dtype)

    def run(q, k, v, grad_o):
        o, lse = ops.attn_train_forward(q, k, v, y, kp, window=5)
        return (o, lse, *ops.attn_train_backward(q, k, v, y, kp, o, lse, grad_o, window=5))

    def projection(t):
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    def misaligned(t):  # same values, every row one element off a 16-byte boundary
        big = torch.zeros(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype, device=t.device)
        big[..., 1:] = t
        return big[..., 1:]

    want = run(q, k, v, grad_o)
    results = [run(*(projection(t) for t in (q, k, v, grad_o))), run(*(misaligned(t) for t in (q, k, v, grad_o)))]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        results.append(run(q, k, v, grad_o))
    stream.synchronize()
    for got in results:
        for a, b in zip(want, got):
            assert torch.equal(a, b)


def test_bad_input_names_the_argument():
    q = torch.randn(1, 4, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    y = torch.randn(1, 2, 8)
    o = torch.empty_like(q)
    lse = torch.empty(1, 4, 8)
    C = dms._C

    def fwd(**kw):
        args = dict(q=q, k=k, v=k, y=y, key_padding=None, window=2, scale=0.25, o=o, lse=lse)
        args.update(kw)
        C.attn_train_forward(**args)

    cases = [
        (TypeError, "k: expected dtype float32 (the dtype of q), got bfloat16", lambda: fwd(k=k.bfloat16())),
        (ValueError, "k: its 3 heads must divide the 4 query heads", lambda: fwd(k=torch.randn(1, 3, 8, 16),
                                                                               v=torch.randn(1, 3, 8, 16))),
        (ValueError, "v: expected shape (1, 2, 8, 16)", lambda: fwd(v=torch.randn(1, 2, 7, 16))),
        (ValueError, "q: the last (head) dim must be contiguous", lambda: fwd(q=torch.randn(1, 4, 16, 8).transpose(2, 3),
                                                                             o=torch.empty(1, 4, 16, 8).transpose(2, 3))),
        (ValueError, "q: head dim 300 is larger than the supported 256",
         lambda: fwd(q=torch.randn(1, 4, 8, 300), k=torch.randn(1, 2, 8, 300), v=torch.randn(1, 2, 8, 300),
                     o=torch.empty(1, 4, 8, 300))),
        (ValueError, "y: expected shape (1, 2, 8), got (1, 2, 7)", lambda: fwd(y=torch.randn(1, 2, 7))),
        (TypeError, "key_padding: expected dtype uint8 or bool, got float32",
         lambda: fwd(key_padding=torch.zeros(1, 8))),
        (ValueError, "key_padding: expected shape (1, 8), got (1, 9)",
         lambda: fwd(key_padding=torch.zeros(1, 9, dtype=torch.bool))),
        (ValueError, "window: expected a delay >= 0, got -1", lambda: fwd(window=-1)),
        (ValueError, "scale: expected a finite value > 0, got 0", lambda: fwd(scale=0.0)),
        (TypeError, "lse: expected dtype float32, got bfloat16", lambda: fwd(lse=lse.bfloat16())),
        (ValueError, "o: expected shape (1, 4, 8, 16)", lambda: fwd(o=torch.empty(1, 4, 8, 15))),
        (ValueError, "q: expected 4 dims", lambda: fwd(q=torch.randn(4, 8, 16))),
        (ValueError, "o: a tensor is required, got None", lambda: fwd(o=None)),
        (ValueError, "grad_y: given, but y is None",
         lambda: C.attn_train_backward(q, k, k, None, None, 2, 0.25, o, lse, o, torch.empty_like(q),
                                       torch.empty_like(k), torch.empty_like(k), torch.empty_like(y))),
        (ValueError, "grad_k: expected shape (1, 2, 8, 16)",
         lambda: C.attn_train_backward(q, k, k, y, None, 2, 0.25, o, lse, o, torch.empty_like(q),
                                       torch.empty_like(q), torch.empty_like(k), None)),
    ]
    for exc, message, call in cases:
        with pytest.raises(exc) as info:
            call()
        assert str(info.value).startswith(message), (message, str(info.value))
