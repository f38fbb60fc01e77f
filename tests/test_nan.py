"""A NaN propagates through every attention kernel, as it does through
PyTorch's attention: it is how a diverging run is noticed. A NaN in a query
makes that query's output and log-sum-exp NaN (it used to give 0 and -inf, the
result of a row that sees nothing); a NaN in a key or value makes NaN every
output that sees it; everything else, padding rows and empty cache rows
included, is what it would be without the NaN (but a NaN value may also
reach rows that do not see it, as in PyTorch, where 0 x NaN is NaN). Training attention (forward
and backward), chunked prefill and decode, on every device present; the CPU
kernel variants run these tests again in test_attn_train.py and
test_attn_decode.py."""

import math

import pytest
import torch

from dms import ops
from dms.cache import PagedLayerCache
from tests import oracle
from tests.conftest import DEVICES

nan = float("nan")
B, H, G, T, D, W = 2, 2, 2, 40, 16, 5


def _inputs(dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H * G, T, D, generator=g)
    k = torch.randn(B, H, T, D, generator=g)
    v = torch.randn(B, H, T, D, generator=g)
    y = torch.randn(B, H, T, generator=g) * 4
    alpha = torch.rand(B, H, T, generator=g) < 0.5
    padding = torch.zeros(B, T, dtype=torch.bool)
    padding[1, :3] = True  # left padding in row 1
    return [t.to(dtype).to(device) if t.is_floating_point() and t is not y else t.to(device)
            for t in (q, k, v)] + [y.to(device), alpha.to(device), padding.to(device)]


def _poison(q, k, v):
    """NaN in one element of a query (row 0, head 1, token 20), of a key
    (row 1, KV head 0, token 30) and of a value (row 0, KV head 1, token 10);
    returns the poisoned copies."""
    q, k, v = q.clone(), k.clone(), v.clone()
    q[0, 1, 20, 3] = nan
    k[1, 0, 30, 5] = nan
    v[0, 1, 10, 7] = nan
    return q, k, v


def _expected_nan(visible):
    """Query rows [B, H*G, T] (bool) given the keys each query sees (visible
    [B, H, T, T], query j, key i): (scores, values, may). `scores`: rows
    whose output and log-sum-exp must be NaN (the NaN query, the queries
    that see the NaN key); `values`: rows whose output must hold a NaN (the
    queries that see the NaN value; their log-sum-exp is finite); `may`: the
    rows whose output may hold one: a NaN value times a probability of 0 is
    NaN, so it may reach rows of its KV head that do not see it (PyTorch's
    attention puts NaN in all of them)."""
    scores = torch.zeros(B, H * G, T, dtype=torch.bool)
    values = torch.zeros_like(scores)
    scores[0, 1, 20] = True
    for g in range(G):
        scores[1, 0 * G + g] |= visible[1, 0, :, 30]
        values[0, 1 * G + g] |= visible[0, 1, :, 10]
    may = scores | values
    may[0, 1 * G:2 * G] = True
    return scores, values, may


def _check(o, lse, clean_o, clean_lse, expected, padding):
    scores, values, may = expected
    o, lse, clean_o, clean_lse = (t.detach().float().cpu() for t in (o, lse, clean_o, clean_lse))
    got = torch.isnan(o).any(-1)
    assert not ((scores | values) & ~got).any(), ((scores | values) & ~got).nonzero()[:5]
    assert not (got & ~may).any(), (got & ~may).nonzero()[:5]
    assert torch.isnan(o[scores]).all() and torch.equal(torch.isnan(lse), scores)
    finite = ~torch.isnan(o)
    assert torch.equal(o[finite], clean_o[finite]) and torch.equal(lse[~scores], clean_lse[~scores])
    pad = padding.cpu()[:, None, :].expand_as(scores)
    assert torch.all(o[pad] == 0) and torch.all(lse[pad] == -math.inf)  # padding rows stay silent


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_train_forward_and_backward(device, dtype):
    q, k, v, y, _, padding = _inputs(dtype, device)
    clean_o, clean_lse = ops.attn_train_forward(q, k, v, y, padding, window=W)
    pq, pk, pv = _poison(q, k, v)
    ins = [t.clone().requires_grad_(True) for t in (pq, pk, pv, y)]
    o, lse = ops.AttnTrain.apply(*ins, padding, W, None)
    causal = oracle.visibility_mask(torch.zeros(B, H, T), T, padding.cpu())  # training attention: every earlier key
    want = _expected_nan(causal)
    _check(o, lse, clean_o, clean_lse, want, padding)
    o.float().sum().backward()
    assert torch.isnan(ins[0].grad[0, 1, 20]).all()  # the poisoned query's gradient
    assert torch.isnan(ins[1].grad[0, 0, :21]).any(-1).all()  # ... reaches every key it saw
    clean = [t.clone().requires_grad_(True) for t in (q, k, v, y)]
    ops.AttnTrain.apply(*clean, padding, W, None)[0].float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in clean)


def _prefill(q, k, v, alpha, padding, dtype, device, chunks=(17, 23)):
    cache = PagedLayerCache(B, H, D, W, page_size=4, dtype=dtype, device=device)
    outs, lses, at = [], [], 0
    for n in chunks:
        s = slice(at, at + n)
        chunk = [t[:, :, s].contiguous() for t in (q, k, v, alpha)] + [padding[:, s].contiguous()]
        o, lse = cache.prefill_attention(*chunk)
        cache.append(*chunk[1:])
        outs.append(o)
        lses.append(lse)
        at += n
    return torch.cat(outs, 2), torch.cat(lses, 2), cache


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_prefill(device, dtype):
    q, k, v, _, alpha, padding = _inputs(dtype, device)
    clean_o, clean_lse, _ = _prefill(q, k, v, alpha, padding, dtype, device)
    o, lse, _ = _prefill(*_poison(q, k, v), alpha, padding, dtype, device)
    visible = oracle.visibility_mask(oracle.eviction_flags(alpha.cpu()), W, padding.cpu())
    _check(o, lse, clean_o, clean_lse, _expected_nan(visible), padding)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_nan_decode(device, dtype):
    """Decode over rows that hold a NaN key, a NaN value that was evicted,
    and nothing at all; and a NaN query."""
    q, k, v, _, alpha, padding = _inputs(dtype, device)
    alpha = alpha.clone()
    alpha[0, 1, 11] = True  # token 10 of (row 0, KV head 1) leaves once the window has passed
    alpha[1, 0, 31] = False  # token 30 of (row 1, KV head 0) stays
    pk, pv = k.clone(), v.clone()
    pk[1, 0, 30, 5] = nan
    pv[0, 1, 10, 7] = nan
    pv[0, 0, T - 2, 1] = nan  # in the window of every decode query of row 0, head 0
    query = torch.randn(B, H * G, 1, D).to(dtype).to(device)
    caches = []
    for keys, values in ((k, v), (pk, pv)):
        cache = PagedLayerCache(B + 1, H, D, W, page_size=4, dtype=dtype, device=device)
        row_pad = torch.cat([padding, torch.ones(1, T, dtype=torch.bool, device=device)])  # row 2 stays empty
        pad3 = lambda t: torch.cat([t, torch.zeros_like(t[:1])])  # noqa: E731
        cache.append(pad3(keys), pad3(values), pad3(alpha), row_pad)
        caches.append(cache)
    three = torch.cat([query, query[:1]])
    clean_o, clean_lse = caches[0].decode_attention(three)
    o, lse = caches[1].decode_attention(three)
    o, lse, clean_o, clean_lse = (t[:, :, 0].float().cpu() for t in (o, lse, clean_o, clean_lse))
    scores = torch.zeros(B + 1, H * G, dtype=torch.bool)
    scores[1, :G] = True  # key 30 of (row 1, KV head 0) is kept: every query of the head sees it
    values = torch.zeros_like(scores)
    values[0, :G] = True  # the value at T - 2 is in the window; the evicted one at 10 reaches nothing
    assert torch.equal(torch.isnan(o).any(-1), scores | values) and torch.isnan(o[scores]).all()
    assert torch.equal(torch.isnan(lse), scores)
    finite = ~torch.isnan(o)
    assert torch.equal(o[finite], clean_o[finite]) and torch.equal(lse[~scores], clean_lse[~scores])
    assert torch.all(o[2] == 0) and torch.all(lse[2] == -math.inf)  # the empty row
    nan_query = three.clone()
    nan_query[2, 0, 0, 0] = nan  # an empty row: nothing to see, NaN or not
    nan_query[1, 3, 0, 2] = nan
    o, lse = caches[0].decode_attention(nan_query)
    o, lse = o[:, :, 0].float().cpu(), lse[:, :, 0].float().cpu()
    assert torch.isnan(o[1, 3]).all() and torch.isnan(lse[1, 3])
    assert torch.all(o[2] == 0) and torch.all(lse[2] == -math.inf)
    rest = torch.ones(B + 1, H * G, dtype=torch.bool)
    rest[1, 3] = rest[2] = False
    assert torch.equal(o[rest], clean_o[rest])
