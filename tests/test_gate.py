"""Gating (SPEC §2): the C kernel (CPU) and the CUDA kernel against the float64
oracle, the straight-through backward against the oracle's autograd and finite
differences, the NumPy path, deterministic noise, and bad input."""

import math

import numpy as np
import pytest
import torch

import dms
from dms import ops
from tests import oracle
from tests.conftest import DEVICES

SHAPES = [(1, 1, 1), (2, 4, 113), (3, 2, 64), (1, 8, 1000)]
Z_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(shape, generator=g) * 3).to(dtype).to(device)
    noise = ops.logistic_noise_like(z, seed=seed, global_step=7)
    return z, noise


def _decisions_agree(a, want, y_ref):
    """Hard decisions equal the oracle's except where y is within float32
    rounding of the threshold."""
    settled = y_ref.abs() > 1e-4
    return torch.equal(a.double().cpu()[settled], want[settled])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", Z_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_forward_matches_oracle(device, dtype, shape, tau):
    z, noise = _inputs(shape, dtype, device)
    y, p, a = ops.gate(z, noise, tau)
    y_ref, p_ref, a_ref, _ = oracle.gate(z.cpu(), noise.cpu(), tau)
    assert y.dtype == torch.float32 and p.dtype == torch.float32 and a.dtype == dtype
    torch.testing.assert_close(y.cpu().double(), y_ref, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(p.cpu().double(), p_ref, rtol=2e-6, atol=1e-7)
    assert _decisions_agree(a, a_ref, y_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", Z_DTYPES, ids=str)
def test_inference_threshold(device, dtype):
    z, _ = _inputs((2, 3, 50), dtype, device)
    z[0, 0, :5] = 0.0  # exactly at the threshold: keep (z > 0 is false)
    for a_dtype in (torch.bool, torch.uint8, torch.float32, dtype):
        _, _, a = ops.gate(z, None, 123.0, a_dtype=a_dtype)
        assert a.dtype == a_dtype
        assert torch.equal(a.cpu().bool(), (z > 0).cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", ["float16", "bfloat16"])
def test_reduced_precision_outputs(device, out_dtype):
    z, noise = _inputs((2, 3, 77), torch.float32, device)
    y, p, _ = ops.gate_forward(z, noise, 0.5, y_dtype=out_dtype, p_dtype=out_dtype)
    y_ref, p_ref, _, _ = oracle.gate(z.cpu(), noise.cpu(), 0.5)
    # Correctly rounded: within half a unit in the last place of the format.
    rel = 2.0**-8 if out_dtype == "bfloat16" else 2.0**-11
    torch.testing.assert_close(y.cpu().double(), y_ref, rtol=rel, atol=1e-6)
    torch.testing.assert_close(p.cpu().double(), p_ref, rtol=rel, atol=1e-6)
    assert torch.equal(y.cpu(), y_ref.to(y.dtype))  # same rounding as torch's cast


@pytest.mark.parametrize("device", DEVICES)
def test_strided_views(device):
    """z taken as the last component of a [B, H, T, D] tensor (the borrowed
    neuron of SPEC §1), outputs written into slices of bigger buffers."""
    q = torch.randn(2, 4, 33, 16, device=device)
    z = q[..., -1] * 10
    z_view = (q * 10)[..., -1]
    assert not z_view.is_contiguous()
    noise = ops.logistic_noise_like(z, seed=3)
    big = torch.full((2, 4, 66), -7.0, device=device)
    y_out = big[:, :, ::2]
    dms._C.gate_forward(z_view, noise.transpose(0, 1).contiguous().transpose(0, 1), 0.1, y_out, None, None,
                        **dms.runtime.exec_kwargs(z))
    y_ref, _, _, _ = oracle.gate(z.cpu(), noise.cpu(), 0.1)
    torch.testing.assert_close(y_out.cpu().double(), y_ref, rtol=2e-6, atol=1e-6)
    assert torch.all(big[:, :, 1::2] == -7.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", Z_DTYPES, ids=str)
def test_backward_matches_oracle_autograd(device, dtype):
    z, noise = _inputs((2, 3, 41), dtype, device, seed=1)
    g = torch.Generator().manual_seed(5)
    gy, gp, ga = (torch.randn(z.shape, generator=g) for _ in range(3))

    zc = z.clone().requires_grad_(True)
    y, p, a = ops.gate(zc, noise, 0.1)
    (y * gy.to(device)).sum().add((p * gp.to(device)).sum()).add((a.float() * ga.to(device)).sum()).backward()

    z64 = z.cpu().double().requires_grad_(True)
    y_r, p_r, _, a_ste = oracle.gate(z64, noise.cpu(), 0.1)
    ((y_r * gy).sum() + (p_r * gp).sum() + (a_ste * ga).sum()).backward()

    assert zc.grad.dtype == dtype
    rtol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    # Gradients of a float16/bfloat16 z are rounded to its format.
    torch.testing.assert_close(zc.grad.cpu().double(), z64.grad.to(dtype).double(), rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_single_outputs(device):
    """Only one of y, p, a used: the others' gradients arrive as None."""
    z, noise = _inputs((1, 2, 9), torch.float32, device, seed=2)
    for pick in range(3):
        zc = z.clone().requires_grad_(True)
        out = ops.gate(zc, noise, 0.1)[pick]
        out.float().sum().backward()
        z64 = z.cpu().double().requires_grad_(True)
        ref = oracle.gate(z64, noise.cpu(), 0.1)
        ref[(0, 1, 3)[pick]].sum().backward()
        torch.testing.assert_close(zc.grad.cpu().double(), z64.grad, rtol=1e-5, atol=1e-6)


def test_finite_differences():
    """dp/dz and dy/dz against central differences of the forward kernel
    itself (float32, tau = 1 so the differences are well conditioned)."""
    z = torch.randn(1, 2, 16, dtype=torch.float32) * 2
    noise = ops.logistic_noise_like(z, seed=11)
    gp = torch.randn(z.shape)
    gy = torch.randn(z.shape)
    zc = z.clone().requires_grad_(True)
    y, p, _ = ops.gate(zc, noise, 1.0)
    ((p * gp).sum() + (y * gy).sum()).backward()
    eps = 1e-2
    for idx in [(0, 0, 0), (0, 1, 7), (0, 0, 15)]:
        plus, minus = z.clone(), z.clone()
        plus[idx] += eps
        minus[idx] -= eps
        yp, pp, _ = ops.gate_forward(plus, noise, 1.0)
        ym, pm, _ = ops.gate_forward(minus, noise, 1.0)
        fd = (((pp - pm) * gp).sum() + ((yp - ym) * gy).sum()).double() / (2 * eps)
        assert abs(zc.grad[idx].item() - fd.item()) < 2e-3 * (1 + abs(fd.item()))


def test_numpy_path_equals_torch_path():
    z = (np.random.default_rng(0).standard_normal((2, 3, 50)) * 4).astype(np.float32)
    noise = ops.logistic_noise(np.empty(z.shape, np.float32), seed=9, process_index=2)
    y, p, a = ops.gate(z, noise, 0.1)
    assert isinstance(y, np.ndarray) and isinstance(a, np.ndarray) and a.dtype == np.float32
    yt, pt, at = ops.gate(torch.from_numpy(z), torch.from_numpy(noise), 0.1)
    np.testing.assert_array_equal(y, yt.numpy())
    np.testing.assert_array_equal(p, pt.numpy())
    np.testing.assert_array_equal(a, at.numpy())
    gz = ops.gate_backward(y, np.ones_like(y), None, None, 0.1)
    gzt = ops.gate_backward(yt, torch.ones_like(yt), None, None, 0.1)
    np.testing.assert_array_equal(gz, gzt.numpy())


def test_thread_count_does_not_change_results():
    z, noise = _inputs((4, 8, 2048), torch.float32, "cpu")
    try:
        dms.set_num_threads(1)
        one = ops.gate(z, noise, 0.1)
        n1 = ops.logistic_noise_like(z, seed=4)
        dms.set_num_threads(2)
        two = ops.gate(z, noise, 0.1)
        n2 = ops.logistic_noise_like(z, seed=4)
    finally:
        dms.set_num_threads(0)
    for x, w in zip(one, two):
        assert torch.equal(x, w)
    assert torch.equal(n1, n2)
    with pytest.raises(ValueError, match="num_threads"):
        dms.set_num_threads(-1)


# ---- noise -----------------------------------------------------------------


def test_noise_is_logistic():
    n = ops.logistic_noise(torch.empty(1 << 20), seed=1234, global_step=5).double()
    assert n.isfinite().all()
    assert abs(n.mean().item()) < 0.02
    assert abs(n.var().item() - math.pi**2 / 3) < 0.05
    # Kolmogorov-Smirnov distance to the logistic CDF (critical value at
    # p = 0.001 for 2^20 samples is ~0.0019).
    s, _ = torch.sort(n)
    cdf = torch.sigmoid(s)
    k = torch.arange(1, s.numel() + 1, dtype=torch.float64) / s.numel()
    assert (k - cdf).abs().max().item() < 0.0019


def test_noise_same_distribution_as_gumbel_difference():
    """SPEC writes the noise as g1 - g2 with g1, g2 Gumbel; the two-sample KS
    distance between ours and the oracle's construction is small."""
    ours = torch.sort(ops.logistic_noise(torch.empty(200_000), seed=7).double())[0]
    theirs = torch.sort(oracle.gumbel_difference_noise((200_000,), torch.Generator().manual_seed(7)))[0]
    grid = torch.linspace(-8, 8, 401, dtype=torch.float64)
    f1 = torch.searchsorted(ours, grid).double() / ours.numel()
    f2 = torch.searchsorted(theirs, grid).double() / theirs.numel()
    assert (f1 - f2).abs().max().item() < 0.0062  # p ~ 0.001 for n = m = 2e5


def test_noise_is_a_function_of_its_counters():
    base = dict(seed=5, process_index=1, accum_step=2, global_step=3)
    a = ops.logistic_noise(torch.empty(3, 5, 7), **base)
    b = ops.logistic_noise(torch.empty(3, 5, 7), **base)
    assert torch.equal(a, b)
    # Element i depends only on i: a longer buffer starts with the same noise.
    longer = ops.logistic_noise(torch.empty(1000), **base)
    assert torch.equal(longer[: a.numel()], a.flatten())
    for key in base:
        other = ops.logistic_noise(torch.empty(3, 5, 7), **{**base, key: base[key] + 1})
        assert (other == a).sum() < 3, key
    np_noise = ops.logistic_noise(np.empty((3, 5, 7), np.float32), **base)
    np.testing.assert_array_equal(np_noise, a.numpy())


def test_noise_counter_ranges():
    with pytest.raises(ValueError, match="global_step"):
        ops.logistic_noise(torch.empty(4), seed=0, global_step=2**32)
    with pytest.raises(ValueError, match="seed"):
        ops.logistic_noise(torch.empty(4), seed=-1)
    ops.logistic_noise(torch.empty(4), seed=2**64 - 1, global_step=2**32 - 1)


# ---- CUDA against CPU --------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", Z_DTYPES, ids=str)
def test_cuda_matches_cpu(dtype):
    z, noise = _inputs((3, 8, 4099), dtype, "cpu")
    zc, nc = z.cuda().requires_grad_(True), ops.logistic_noise_like(z.cuda(), seed=0, global_step=7)
    torch.testing.assert_close(nc.cpu(), noise, rtol=1e-6, atol=1e-6)
    zz = z.clone().requires_grad_(True)
    cpu_out = ops.gate(zz, noise, 0.1)
    gpu_out = ops.gate(zc, nc, 0.1)
    for c, g in zip(cpu_out, gpu_out):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-5, atol=1e-5)
    sum(o.float().sum() for o in cpu_out).backward()
    sum(o.float().sum() for o in gpu_out).backward()
    torch.testing.assert_close(zc.grad.cpu(), zz.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_cuda_runs_on_the_current_stream():
    z = torch.randn(4, 8, 1 << 16, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y, p, a = ops.gate(z, None, 0.1)
    s.synchronize()
    assert torch.equal(a.bool(), z > 0)


# ---- bad input ---------------------------------------------------------------


def test_bad_input_names_the_argument():
    z = torch.zeros(2, 3, 5)
    cases = [
        (TypeError, "z: expected dtype float32, float16 or bfloat16, got float64",
         lambda: ops.gate(torch.zeros(2, 3, 5, dtype=torch.float64))),
        (TypeError, "z: expected dtype float32, float16 or bfloat16, got int32",
         lambda: ops.gate(torch.zeros(2, 3, 5, dtype=torch.int32))),
        (TypeError, "z: expected a torch tensor or a NumPy array, got list", lambda: ops.gate([1.0, 2.0])),
        (TypeError, "tau: expected a finite temperature > 0, got str '0.1'", lambda: ops.gate(z, None, "0.1")),
        (TypeError, "seed: expected an int, got NoneType", lambda: ops.logistic_noise_like(z, seed=None)),
        (TypeError, "seed: expected an int, got float 1.5", lambda: ops.logistic_noise_like(z, seed=1.5)),
        (ValueError, "global_step: expected an int in [0, 2^32), got -1",
         lambda: ops.logistic_noise_like(z, seed=0, global_step=-1)),
        (TypeError, "q: expected dtype float32, float16 or bfloat16, got float64",
         lambda: ops.attn_train_forward(np.zeros((1, 2, 4, 8)), np.zeros((1, 1, 4, 8)), np.zeros((1, 1, 4, 8)))),
        (TypeError, "z: expected dtype float32, float16 or bfloat16, got int64",
         lambda: dms._C.gate_forward(torch.zeros(2, 3, 5, dtype=torch.int64), None, 0.1, z, None, None)),
        (ValueError, "noise: expected shape (2, 3, 5)", lambda: ops.gate(z, torch.zeros(2, 3, 4))),
        (ValueError, "z: expected 3 dims", lambda: ops.gate(torch.zeros(2, 3))),
        (ValueError, "z: expected a non-empty tensor", lambda: ops.gate(torch.zeros(2, 0, 5))),
        (ValueError, "tau: expected a finite temperature > 0", lambda: ops.gate(z, None, 0.0)),
        (ValueError, "tau: expected a finite temperature > 0", lambda: ops.gate(z, None, float("inf"))),
        (ValueError, "a: output has stride 0", lambda: dms._C.gate_forward(z, None, 1.0, None, None,
                                                                            torch.zeros(2, 3, 1).expand(2, 3, 5))),
        (TypeError, "a: expected dtype", lambda: dms._C.gate_forward(z, None, 1.0, None, None,
                                                                     torch.zeros(2, 3, 5, dtype=torch.int32))),
        (ValueError, "grad_z: a tensor is required", lambda: dms._C.gate_backward(z, None, None, None, 1.0, None)),
        (TypeError, "y: expected a tensor supporting DLPack", lambda: dms._C.gate_forward(z, None, 1.0, [1.0], None,
                                                                                          None)),
        (ValueError, "out: expected a C-contiguous tensor", lambda: ops.logistic_noise(torch.zeros(4, 6)[:, ::2],
                                                                                      seed=0)),
        (TypeError, "out: expected dtype float32", lambda: ops.logistic_noise(torch.zeros(4, dtype=torch.float16),
                                                                              seed=0)),
        (BufferError, "z: ", lambda: ops.gate_forward(torch.zeros(2, 3, 5, requires_grad=True))),
    ]
    for exc, message, call in cases:
        with pytest.raises(exc) as info:
            call()
        assert str(info.value).startswith(message), (message, str(info.value))


def test_read_only_numpy_output_is_refused():
    z = np.zeros((2, 3, 5), np.float32)
    out = np.zeros((2, 3, 5), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="^a: output tensor is read-only"):
        dms._C.gate_forward(z, None, 1.0, None, None, out)
    # A read-only *input* is fine.
    z.flags.writeable = False
    dms._C.gate_forward(z, None, 1.0, None, None, np.zeros((2, 3, 5), np.float32))
