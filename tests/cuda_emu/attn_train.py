"""Emulated csrc/cuda/attn_train.cu (tensor-core kernels of
attn_train_mma.cuh for bfloat16 / float16 and supported D, SIMT kernels
otherwise) against the float64 oracle (tests/oracle.py): forward (o, lse)
and all four gradients with the tolerances of tests/test_attn_train.py, plus
padding semantics, bitwise-deterministic backward, and a check that the
expected kernel family ran (the tensor-core kernels load with cp.async)."""
import ctypes
import itertools
import math
import random

import torch

from tests import oracle
from tests.cuda_emu.harness import Tensor, rel_err, strided, view

RTOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}  # as tests/test_attn_train.py


class Args(ctypes.Structure):  # struct dms_attn_train_args (csrc/core/internal.h)
    _fields_ = [(n, ctypes.POINTER(Tensor)) for n in
                ["q", "k", "v", "y", "key_padding", "o", "lse", "grad_o", "grad_q", "grad_k", "grad_v", "grad_y"]] + \
               [(n, ctypes.c_int64) for n in ["B", "H", "G", "T", "D", "window"]] + [("scale", ctypes.c_float)]


def run_case(lib, B, H, G, T, D, window, dtype=torch.bfloat16, odtype=None, godtype=None, use_y=True, pad=False,
             layout="c", limit=232448, seed=0, tensor_cores=None, nan_query=False, hot_padding_key=False):
    """One forward + backward; raises AssertionError on any mismatch and
    returns {output: relative error}. tensor_cores: True / False asserts
    which kernel family ran (None: either). nan_query: one element of the
    last query of row 0, head 0 is NaN; its o and lse must be NaN (the
    oracle's), its query gradient too, every other output as ever.
    hot_padding_key: in each row, the queries point one way and the last
    padding key points the same way, scaled up: its score beats the row's
    log-sum-exp by far more than 16 bits can hold (it must stay masked)."""
    gen = torch.Generator().manual_seed(seed)
    odtype, godtype, HG, keep = odtype or dtype, godtype or dtype, H * G, []
    q = strided((B, HG, T, D), dtype, layout, gen=gen)
    k = strided((B, H, T, D), dtype, layout, gen=gen)
    v = strided((B, H, T, D), dtype, layout, gen=gen)
    y = strided((B, H, T), torch.float32, "c", gen=gen, mag=4.0) if use_y else None
    kp = None
    if pad:  # a strided [B, T] view: left padding (as generate makes it), right padding, and a hole
        full = torch.zeros(B, T + 2, dtype=torch.bool)
        rng = random.Random(seed)
        for b in range(B):
            n = rng.randint(0, T // 3)
            full[b, :n] = b % 2 == 0
            full[b, T - n:T] = b % 2 == 1
            if T > 3:
                full[b, T // 2] = True
        kp = full[:, :T]
    if nan_query:
        q[0, 0, T - 1, D // 2] = float("nan")
    if hot_padding_key:
        assert kp is not None, "hot_padding_key needs pad=True"
        for b in range(B):
            pads = kp[b].nonzero().flatten()
            if len(pads):
                q[b].copy_(1 + 0.3 * torch.randn(q[b].shape, generator=gen))
                k[b, :, int(pads[-1])] = 8.0  # score 8 sqrt(D) nats: 64 at D = 64
    scale = 1.0 / math.sqrt(D)
    o = strided((B, HG, T, D), odtype, layout, fill=float("nan"))
    lse = strided((B, HG, T), torch.float32, "c", fill=float("nan"))
    lib.emu_set_limit(limit)
    a = Args()
    a.q, a.k, a.v, a.y, a.key_padding = (view(t, keep) for t in (q, k, v, y, kp))
    a.o, a.lse = view(o, keep), view(lse, keep)
    a.B, a.H, a.G, a.T, a.D, a.window, a.scale = B, H, G, T, D, window, scale
    cp0 = lib.emu_get_cp_count()
    st = lib.dms_attn_train_forward_cuda(ctypes.byref(a), None)
    assert st == 0, (st, lib.dms_last_error())
    used_cp = lib.emu_get_cp_count() > cp0

    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    yd = (y.double() if y is not None else torch.full((B, H, T), -1e30, dtype=torch.float64)).requires_grad_()
    ro, rlse = oracle.attention_train(qd, kd, vd, yd, window, scale, kp)
    errs = {"o": rel_err("o", o, ro.detach()), "lse": rel_err("lse", lse, rlse.detach())}

    go = strided((B, HG, T, D), godtype, layout, gen=gen)
    (ro * go.double()).sum().backward()
    gq = strided((B, HG, T, D), odtype, layout, fill=float("nan"))
    gk = strided((B, H, T, D), odtype, layout, fill=float("nan"))
    gv = strided((B, H, T, D), odtype, layout, fill=float("nan"))
    gy = strided((B, H, T), torch.float32, "c", fill=float("nan")) if y is not None else None
    a.grad_o, a.grad_q, a.grad_k, a.grad_v, a.grad_y = (view(t, keep) for t in (go, gq, gk, gv, gy))
    st = lib.dms_attn_train_backward_cuda(ctypes.byref(a), None)
    assert st == 0, (st, lib.dms_last_error())
    if nan_query:  # the oracle's NaN gradients reach every key of the head; the kernels' only those it sees
        silent = kp is not None and bool(kp[0, T - 1])
        assert silent or torch.isnan(gq[0, 0, T - 1].float()).all(), "a NaN query's gradient is NaN"
        return errs
    errs["dq"] = rel_err("grad_q", gq, qd.grad)
    errs["dk"] = rel_err("grad_k", gk, kd.grad)
    errs["dv"] = rel_err("grad_v", gv, vd.grad)
    if gy is not None:
        errs["dy"] = rel_err("grad_y", gy, yd.grad)
    bad = {n: e for n, e in errs.items() if not e < RTOL[dtype]}
    assert not bad, f"errors over {RTOL[dtype]}: {bad}"
    if kp is not None:  # padding queries: o = 0, lse = -inf, no gradient; padding keys: no gradient
        padq = kp[:, None, :].expand(B, HG, T)
        assert torch.all(o.float()[padq] == 0) and torch.all(lse[padq] == -math.inf), "padding query output"
        assert torch.all(gq.float()[padq] == 0), "padding query gradient"
        padk = kp[:, None, :].expand(B, H, T)
        assert torch.all(gk.float()[padk] == 0) and torch.all(gv.float()[padk] == 0), "padding key gradient"
    if gy is not None:
        assert torch.all(gy[..., 0] == 0), "y[0] decides nothing, so its gradient is 0"
    grads = [t for t in (gq, gk, gv, gy) if t is not None]
    first = [t.clone() for t in grads]
    assert lib.dms_attn_train_backward_cuda(ctypes.byref(a), None) == 0
    assert all(torch.equal(x, x0) for x, x0 in zip(grads, first)), "backward not deterministic"
    if tensor_cores is not None:
        assert used_cp == tensor_cores, f"tensor-core kernels ran: {used_cp}, expected {tensor_cores}"
    return errs


def matrix():
    """The full tensor-core matrix (320 cases): every T against the tiles,
    G, D, window (none, small, across tiles, >= T), padding and 16-bit type."""
    cases = []
    for T, G, D, w, pad, dtype in itertools.product([1, 17, 64, 130, 300], [1, 4], [64, 128], [0, 3, 40, "T"],
                                                   [False, True], [torch.bfloat16, torch.float16]):
        cases.append(dict(B=2 if pad else 1, H=1, G=G, T=T, D=D, window=T + 5 if w == "T" else w, pad=pad,
                          dtype=dtype, tensor_cores=True))
    return cases


def simt_matrix():
    """SIMT kernels: float32, head dims the tensor-core path does not take,
    strided layouts, and a low shared-memory limit (smaller tiles)."""
    cases = []
    for T, D, w, pad, layout in itertools.product([1, 33, 97], [1, 24, 65], [0, 4, "T"], [False, True], ["c", "t", "g"]):
        cases.append(dict(B=2 if pad else 1, H=2, G=2, T=T, D=D, window=T + 5 if w == "T" else w, pad=pad,
                          layout=layout, dtype=torch.float32, tensor_cores=False))
    cases += [dict(B=1, H=1, G=2, T=70, D=48, window=5, dtype=torch.bfloat16, limit=49152),
              dict(B=1, H=1, G=1, T=50, D=64, window=7, dtype=torch.float16, use_y=False)]
    return cases
