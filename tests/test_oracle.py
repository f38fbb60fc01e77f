"""Tests of the float64 DMS oracle (tests/oracle.py) itself.

Each test compares the oracle with an independent formulation (literal per-element loops,
PyTorch's own causal attention, hand-written matrices) or with a limit it must reach, so that a
wrong oracle fails here before it is used to judge the kernels.
"""

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oracle  # noqa: E402

F64 = torch.float64


def _randn(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64)


def _qkv(B, H, G, T, D, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H * G, T, D, generator=g, dtype=F64)
    k = torch.randn(B, H, T, D, generator=g, dtype=F64)
    v = torch.randn(B, H, T, D, generator=g, dtype=F64)
    return q, k, v


def _causal_reference(q, k, v, scale=None):
    """Plain causal GQA attention by PyTorch's own SDPA, float64."""
    G = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1),
        is_causal=True, scale=scale)


def _padding(B, T):
    """Left padding on batch 0, a hole and right padding on batch 1 (True = padding)."""
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, :2] = True
    if B > 1:
        pad[1, 3] = True
        pad[1, -1] = True
    return pad


# --------------------------------------------------------------------------------------------
# §2 gate and noise
# --------------------------------------------------------------------------------------------

def test_gate_values_and_straight_through_gradient():
    tau = 0.1
    z = _randn(2, 3, 17, seed=0).requires_grad_(True)
    noise = _randn(2, 3, 17, seed=1)
    y, p, a, a_ste = oracle.gate(z, noise, tau=tau)

    expected_y = (z.detach() + noise) / tau
    torch.testing.assert_close(y.detach(), expected_y, rtol=0, atol=1e-12)
    torch.testing.assert_close(p.detach(), 1.0 / (1.0 + torch.exp(-expected_y)),
                               rtol=1e-12, atol=1e-15)
    assert a.dtype == F64
    assert torch.equal(a, (p.detach() > 0.5).double())
    assert 0 < a.sum() < a.numel()  # both decisions occur
    assert torch.equal(a_ste.detach(), a)

    (grad,) = torch.autograd.grad(a_ste.sum(), z)
    pd = p.detach()
    torch.testing.assert_close(grad, pd * (1 - pd) / tau, rtol=1e-12, atol=1e-15)


def test_gate_without_noise_equals_zero_noise():
    z = _randn(1, 2, 9, seed=2)
    out_none = oracle.gate(z, None, tau=0.3)
    out_zero = oracle.gate(z, torch.zeros_like(z), tau=0.3)
    for x, y in zip(out_none, out_zero):
        assert torch.equal(x, y)
    # Inference gate: alpha = 1[z > 0].
    assert torch.equal(out_none[2], (z > 0).double())


def test_gate_boundary_is_keep():
    # z = 0 gives p = 1/2 exactly, which is not > 1/2: keep (alpha = 0).
    z = torch.tensor([[[0.0, -0.0, 1e-3, -1e-3]]], dtype=F64)
    y, p, a, _ = oracle.gate(z)
    assert torch.equal(p[..., :2], torch.full((1, 1, 2), 0.5, dtype=F64))
    assert torch.equal(a, torch.tensor([[[0.0, 0.0, 1.0, 0.0]]], dtype=F64))


def test_gumbel_difference_noise_is_logistic():
    n_samples = 200_000
    g = torch.Generator().manual_seed(1234)
    n = oracle.gumbel_difference_noise((n_samples,), g)
    assert n.dtype == F64 and n.shape == (n_samples,)
    assert torch.isfinite(n).all()

    # Kolmogorov-Smirnov statistic against the standard logistic CDF, sigmoid(x).
    xs, _ = torch.sort(n)
    cdf = torch.sigmoid(xs)
    ranks = torch.arange(1, n_samples + 1, dtype=F64)
    ks = torch.maximum(ranks / n_samples - cdf, cdf - (ranks - 1) / n_samples).max().item()
    assert ks < 1.95 / math.sqrt(n_samples)  # 0.1% critical value

    # Against a standard normal of matched variance the KS statistic would be ~0.02: make sure
    # the test above can tell the two apart.
    sd = math.pi / math.sqrt(3)
    normal_cdf = 0.5 * (1 + torch.erf(xs / (sd * math.sqrt(2))))
    ks_normal = torch.maximum(ranks / n_samples - normal_cdf,
                              normal_cdf - (ranks - 1) / n_samples).max().item()
    assert ks_normal > 3 * ks

    assert abs(n.mean().item()) < 0.02  # standard error ~0.004
    assert abs(n.var().item() - math.pi ** 2 / 3) < 0.06  # standard error ~0.013

    # Deterministic given the generator state.
    again = oracle.gumbel_difference_noise((n_samples,), torch.Generator().manual_seed(1234))
    assert torch.equal(n, again)


# --------------------------------------------------------------------------------------------
# §3 flags and visibility
# --------------------------------------------------------------------------------------------

def test_eviction_flags_hand_example():
    alpha = torch.tensor([[[1, 0, 1, 1, 0],
                           [0, 1, 0, 0, 1]]], dtype=F64)  # [B=1, H=2, T=5]
    expected = torch.tensor([[[0, 1, 1, 0, 0],
                              [1, 0, 0, 1, 0]]], dtype=F64)
    e = oracle.eviction_flags(alpha)
    assert e.dtype == F64
    assert torch.equal(e, expected)
    assert torch.equal(alpha, torch.tensor([[[1, 0, 1, 1, 0], [0, 1, 0, 0, 1]]], dtype=F64))


# alpha = [0, 1, 0, 1, 1]  ->  e = [1, 0, 1, 1, 0]
_ALPHA_5 = torch.tensor([[[0, 1, 0, 1, 1]]], dtype=F64)

_VISIBLE_W1 = [  # rows: query j, columns: key i
    [1, 0, 0, 0, 0],
    [1, 1, 0, 0, 0],
    [0, 1, 1, 0, 0],
    [0, 1, 1, 1, 0],
    [0, 1, 0, 1, 1],
]
_VISIBLE_W2 = [
    [1, 0, 0, 0, 0],
    [1, 1, 0, 0, 0],
    [1, 1, 1, 0, 0],
    [0, 1, 1, 1, 0],
    [0, 1, 1, 1, 1],
]
_VISIBLE_W2_PAD0 = [  # token 0 is padding
    [0, 0, 0, 0, 0],
    [0, 1, 0, 0, 0],
    [0, 1, 1, 0, 0],
    [0, 1, 1, 1, 0],
    [0, 1, 1, 1, 1],
]


@pytest.mark.parametrize("window, expected, pad0", [
    (1, _VISIBLE_W1, False),
    (2, _VISIBLE_W2, False),
    (2, _VISIBLE_W2_PAD0, True),
])
def test_visibility_mask_hand_example(window, expected, pad0):
    e = oracle.eviction_flags(_ALPHA_5)
    assert torch.equal(e, torch.tensor([[[1, 0, 1, 1, 0]]], dtype=F64))
    key_padding = None
    if pad0:
        key_padding = torch.tensor([[True, False, False, False, False]])
    mask = oracle.visibility_mask(e, window, key_padding)
    assert mask.dtype == torch.bool and mask.shape == (1, 1, 5, 5)
    assert torch.equal(mask[0, 0], torch.tensor(expected, dtype=torch.bool))


def test_visibility_mask_large_window_is_causal():
    e = torch.ones(2, 3, 6, dtype=F64)
    mask = oracle.visibility_mask(e, 6)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert torch.equal(mask, causal.expand(2, 3, 6, 6))


# --------------------------------------------------------------------------------------------
# Independent literal implementations (python ints and floats, one query at a time)
# --------------------------------------------------------------------------------------------

def _loop_hard_attention(q, k, v, alpha, window, scale, key_padding):
    B, HG, T, D = q.shape
    G = HG // k.shape[1]
    out = torch.zeros(B, HG, T, D, dtype=F64)
    for b in range(B):
        for qh in range(HG):
            h = qh // G
            for j in range(T):
                if key_padding[b, j]:
                    continue
                visible = []
                for i in range(T):
                    if i > j or key_padding[b, i]:
                        continue
                    flag = int(alpha[b, h, i + 1]) if i + 1 < T else 0
                    if flag == 0 or j - i <= window:
                        visible.append(i)
                scores = [scale * sum(float(q[b, qh, j, d]) * float(k[b, h, i, d])
                                      for d in range(D)) for i in visible]
                m = max(scores)
                weights = [math.exp(s - m) for s in scores]
                total = sum(weights)
                for d in range(D):
                    out[b, qh, j, d] = sum(w_ * float(v[b, h, i, d])
                                           for w_, i in zip(weights, visible)) / total
    return out


def _loop_soft_attention(q, k, v, y, window, scale, key_padding):
    """Literal §3 soft rule; log(1 - sigmoid(y)) computed as -log(1 + exp(y)) (|y| moderate)."""
    B, HG, T, D = q.shape
    G = HG // k.shape[1]
    scores_out = torch.full((B, HG, T, T), -math.inf, dtype=F64)
    out = torch.zeros(B, HG, T, D, dtype=F64)
    lse_out = torch.full((B, HG, T), -math.inf, dtype=F64)
    for b in range(B):
        for qh in range(HG):
            h = qh // G
            for j in range(T):
                for i in range(j + 1):
                    s = scale * sum(float(q[b, qh, j, d]) * float(k[b, h, i, d])
                                    for d in range(D))
                    if j - i > window:
                        s += -math.log1p(math.exp(float(y[b, h, i + 1])))
                    scores_out[b, qh, j, i] = s
                if key_padding is not None and key_padding[b, j]:
                    continue
                keys = [i for i in range(j + 1)
                        if key_padding is None or not key_padding[b, i]]
                scores = [float(scores_out[b, qh, j, i]) for i in keys]
                m = max(scores)
                total = sum(math.exp(s - m) for s in scores)
                lse_out[b, qh, j] = m + math.log(total)
                for d in range(D):
                    out[b, qh, j, d] = sum(math.exp(s - m) * float(v[b, h, i, d])
                                           for s, i in zip(scores, keys)) / total
    return scores_out, out, lse_out


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("window", [0, 1, 3, 9])
def test_hard_attention_matches_literal_loop(G, window):
    B, H, T, D = 2, 2, 7, 3
    q, k, v = _qkv(B, H, G, T, D, seed=10 * G + window)
    g = torch.Generator().manual_seed(100 + window)
    alpha = (torch.rand(B, H, T, generator=g) < 0.6).double()
    pad = _padding(B, T)
    scale = 0.7
    expected = _loop_hard_attention(q, k, v, alpha, window, scale, pad)
    got = oracle.attention_with_decisions(q, k, v, alpha, window, scale, pad)
    assert got.dtype == F64 and got.shape == (B, H * G, T, D)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # With an eviction flag set somewhere beyond the window, eviction must change the result.
    if window < T - 2:
        no_evict = oracle.attention_with_decisions(q, k, v, torch.zeros_like(alpha), window,
                                                   scale, pad)
        assert not torch.allclose(got, no_evict)


@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("window", [0, 2])
def test_soft_attention_matches_literal_loop(G, window):
    B, H, T, D = 2, 2, 6, 3
    q, k, v = _qkv(B, H, G, T, D, seed=7 + G + window)
    y = 3.0 * _randn(B, H, T, seed=99)
    pad = _padding(B, T)
    scale = 0.6
    exp_scores, exp_o, exp_lse = _loop_soft_attention(q, k, v, y, window, scale, pad)
    s = oracle.soft_scores(q, k, y, window, scale)
    assert s.shape == (B, H * G, T, T)
    torch.testing.assert_close(s, exp_scores, rtol=1e-12, atol=1e-12)
    o, lse = oracle.attention_train(q, k, v, y, window, scale, pad)
    torch.testing.assert_close(o, exp_o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, exp_lse, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Limits: large window, y -> -inf, y -> +inf, and soft vs hard consistency
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("G", [1, 3])
def test_large_window_is_plain_causal_attention(G):
    B, H, T, D = 2, 2, 8, 4
    q, k, v = _qkv(B, H, G, T, D, seed=3)
    y = 5.0 * _randn(B, H, T, seed=4)  # would be penalised if the window did not cover all
    for window in (T - 1, T, 100):
        scale = 1.0 / math.sqrt(D)
        s = oracle.soft_scores(q, k, y, window, scale)
        causal_scores = scale * q @ k.repeat_interleave(G, dim=1).transpose(-1, -2)
        causal_scores = causal_scores.masked_fill(
            ~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
        torch.testing.assert_close(s, causal_scores, rtol=1e-13, atol=1e-13)

        o, lse = oracle.attention_train(q, k, v, y, window)  # scale None -> 1/sqrt(D)
        expected = _causal_reference(q, k, v)
        torch.testing.assert_close(o, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, torch.logsumexp(causal_scores, -1), rtol=1e-12,
                                   atol=1e-12)
        alpha = torch.ones(B, H, T, dtype=F64)
        torch.testing.assert_close(oracle.attention_with_decisions(q, k, v, alpha, window),
                                   expected, rtol=1e-12, atol=1e-12)


def test_soft_scores_window_smaller_than_T_is_penalised():
    # Guard against a window comparison that never triggers.
    q, k, _ = _qkv(1, 1, 1, 6, 2, seed=5)
    y = torch.zeros(1, 1, 6, dtype=F64)  # log(1 - 1/2) = -log 2
    s = oracle.soft_scores(q, k, y, 1, 1.0)
    raw = q @ k.transpose(-1, -2)
    j, i = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    far = (j - i) > 1
    torch.testing.assert_close(s[0, 0][far], raw[0, 0][far] - math.log(2), rtol=0, atol=1e-13)
    near = (i <= j) & ~far
    torch.testing.assert_close(s[0, 0][near], raw[0, 0][near], rtol=0, atol=0)


def test_soft_penalty_is_stable_for_large_logits():
    # 1 - sigmoid(60) rounds to 0 in float64; logsigmoid(-60) is still -60 (to 1e-26).
    q, k, v = _qkv(1, 1, 1, 5, 2, seed=8)
    y = torch.full((1, 1, 5), 60.0, dtype=F64, requires_grad=True)
    s = oracle.soft_scores(q, k, y, 0, 1.0)
    raw = (q @ k.transpose(-1, -2))[0, 0]
    far = torch.ones(5, 5, dtype=torch.bool).tril(-1)
    torch.testing.assert_close(s[0, 0][far], raw[far] - 60.0, rtol=0, atol=1e-12)
    o, _ = oracle.attention_train(q, k, v, y, 0)
    (grad,) = torch.autograd.grad(o.sum(), y)
    assert torch.isfinite(grad).all()


def test_negative_infinite_gate_logits_give_causal_attention():
    B, H, G, T, D, window = 2, 2, 2, 9, 4, 2
    q, k, v = _qkv(B, H, G, T, D, seed=6)
    y = torch.full((B, H, T), -1e4, dtype=F64)
    o, _ = oracle.attention_train(q, k, v, y, window)
    torch.testing.assert_close(o, _causal_reference(q, k, v), rtol=1e-12, atol=1e-12)


def test_positive_infinite_gate_logits_give_hard_eviction():
    B, H, G, T, D, window = 2, 2, 2, 9, 4, 2
    q, k, v = _qkv(B, H, G, T, D, seed=7)
    y = torch.full((B, H, T), 1e4, dtype=F64)
    o, _ = oracle.attention_train(q, k, v, y, window)
    alpha = torch.ones(B, H, T, dtype=F64)
    hard = oracle.attention_with_decisions(q, k, v, alpha, window)
    torch.testing.assert_close(o, hard, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(hard, _causal_reference(q, k, v))


@pytest.mark.parametrize("G, window", [(1, 0), (2, 1), (4, 3)])
def test_saturated_soft_gate_equals_hard_decisions(G, window):
    B, H, T, D = 2, 3, 10, 4
    q, k, v = _qkv(B, H, G, T, D, seed=20 + G)
    g = torch.Generator().manual_seed(30 + G)
    alpha = (torch.rand(B, H, T, generator=g) < 0.5).double()
    pad = _padding(B, T)
    y = (2 * alpha - 1) * 1e4
    o, lse = oracle.attention_train(q, k, v, y, window, key_padding=pad)
    hard = oracle.attention_with_decisions(q, k, v, alpha, window, key_padding=pad)
    torch.testing.assert_close(o, hard, rtol=1e-12, atol=1e-12)
    # An index shift (e[i] = alpha[i] instead of alpha[i+1]) would give a different answer.
    wrong_flags = alpha.clone()
    wrong = oracle.attention_hard(q, k, v, wrong_flags, window, key_padding=pad)
    assert not torch.allclose(o, wrong)
    assert torch.isneginf(lse[pad[:, None, :].expand_as(lse)]).all()
    assert torch.isfinite(lse[~pad[:, None, :].expand_as(lse)]).all()


# --------------------------------------------------------------------------------------------
# §1 decision logits
# --------------------------------------------------------------------------------------------

def test_decision_logits_separate_zero_projection_is_minus_offset():
    x = _randn(2, 5, 8, seed=40)
    norm_w = _randn(8, seed=41)
    z = oracle.decision_logits_separate(x, norm_w, torch.zeros(3, 8), scale=100.0, offset=5.0)
    assert z.dtype == F64 and z.shape == (2, 3, 5)
    assert torch.equal(z, torch.full((2, 3, 5), -5.0, dtype=F64))


@pytest.mark.parametrize("with_bias", [False, True])
def test_decision_logits_separate_matches_loop(with_bias):
    B, T, hidden, H = 2, 3, 4, 2
    x = _randn(B, T, hidden, seed=42)
    norm_w = _randn(hidden, seed=43)
    proj_w = 0.1 * _randn(H, hidden, seed=44)
    bias = 0.05 * _randn(H, seed=45) if with_bias else None
    eps, scale, offset = 1e-6, 100.0, 5.0
    z = oracle.decision_logits_separate(x.float(), norm_w, proj_w, bias,
                                        scale=scale, offset=offset, eps=eps)
    x32 = x.float().double()  # the oracle promotes its input; compare on the same values
    for b in range(B):
        for t in range(T):
            row = [float(x32[b, t, c]) for c in range(hidden)]
            rms = math.sqrt(sum(r * r for r in row) / hidden + eps)
            normed = [row[c] / rms * float(norm_w[c]) for c in range(hidden)]
            for h in range(H):
                raw = sum(normed[c] * float(proj_w[h, c]) for c in range(hidden))
                if bias is not None:
                    raw += float(bias[h])
                assert z[b, h, t].item() == pytest.approx(scale * raw - offset, rel=1e-12,
                                                          abs=1e-11)


def test_decision_logits_borrowed():
    B, H, G, T, D = 2, 2, 3, 4, 5
    q = _randn(B, H * G, T, D, seed=50)
    q_before = q.clone()
    z, q_zeroed = oracle.decision_logits_borrowed(q, H, scale=10.0, offset=2.0)
    assert z.shape == (B, H, T) and z.dtype == F64
    for b in range(B):
        for h in range(H):
            for t in range(T):
                assert z[b, h, t].item() == pytest.approx(10.0 * q[b, h * G, t, D - 1].item() - 2.0,
                                                          rel=1e-14)
    changed = torch.zeros(B, H * G, T, D, dtype=torch.bool)
    for h in range(H):
        changed[:, h * G, :, D - 1] = True
    assert torch.equal(q_zeroed != q, changed)
    assert (q_zeroed[changed] == 0).all()
    assert torch.equal(q, q_before)  # input untouched


def test_per_layer_broadcasts_head_zero():
    z = _randn(2, 4, 6, seed=60)
    out = oracle.per_layer(z)
    assert out.shape == z.shape
    for h in range(4):
        assert torch.equal(out[:, h], z[:, 0])
    out[:, 1] += 1.0  # a real copy, not a view of z
    assert torch.equal(out[:, 0], z[:, 0])


# --------------------------------------------------------------------------------------------
# Gradients of attention_train
# --------------------------------------------------------------------------------------------

def test_attention_train_gradcheck():
    B, H, G, T, D, window = 1, 1, 2, 5, 3, 1
    q, k, v = _qkv(B, H, G, T, D, seed=70)
    y = _randn(B, H, T, seed=71)
    inputs = tuple(t.clone().requires_grad_(True) for t in (q, k, v, y))

    def fn(q_, k_, v_, y_):
        return oracle.attention_train(q_, k_, v_, y_, window)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_attention_train_gradcheck_with_padding():
    B, H, G, T, D, window = 2, 1, 2, 5, 3, 1
    q, k, v = _qkv(B, H, G, T, D, seed=72)
    y = _randn(B, H, T, seed=73)
    pad = _padding(B, T)
    keep = ~pad[:, None, :].expand(B, H * G, T)
    inputs = tuple(t.clone().requires_grad_(True) for t in (q, k, v, y))

    def fn(q_, k_, v_, y_):
        o, lse = oracle.attention_train(q_, k_, v_, y_, window, key_padding=pad)
        return o, lse[keep]  # lse is -inf at padding queries

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_attention_train_padding_queries_zero_output_and_grads():
    B, H, G, T, D, window = 2, 2, 2, 7, 3, 1
    q, k, v = _qkv(B, H, G, T, D, seed=80)
    y = _randn(B, H, T, seed=81)
    pad = _padding(B, T)  # batch 0 starts with padding: its first query has no visible key
    q, k, v, y = (t.requires_grad_(True) for t in (q, k, v, y))
    o, lse = oracle.attention_train(q, k, v, y, window, key_padding=pad)
    upstream = _randn(*o.shape, seed=82)
    (o * upstream).sum().backward()
    for t in (o, q.grad, k.grad, v.grad, y.grad):
        assert torch.isfinite(t).all()

    pad_q = pad[:, None, :, None].expand_as(o)
    assert (o[pad_q] == 0).all()
    assert (o[~pad_q] != 0).all()
    pad_kv = pad[:, None, :, None].expand_as(k)
    assert (q.grad[pad_q] == 0).all()  # padding queries do not influence anything
    assert (k.grad[pad_kv] == 0).all()  # padding keys are never visible
    assert (v.grad[pad_kv] == 0).all()
    # A query with a single visible key has a constant softmax, hence zero q gradient.
    several_keys = (~pad & ((~pad).cumsum(-1) >= 2))[:, None, :, None].expand_as(o)
    assert (q.grad[several_keys] != 0).all()
    # y[0] concerns no key (e[i] = alpha[i+1]); y[i+1] reaches key i only from queries i+w+1..
    assert (y.grad[..., 0] == 0).all()
    assert (y.grad[..., 1:T - window - 1][~pad[:, None, :T - window - 2].expand(B, H, -1)]
            != 0).all()


def test_attention_hard_padding_queries_are_zero():
    B, H, G, T, D = 2, 1, 2, 6, 3
    q, k, v = _qkv(B, H, G, T, D, seed=90)
    alpha = torch.ones(B, H, T, dtype=F64)
    pad = _padding(B, T)
    o = oracle.attention_with_decisions(q, k, v, alpha, 1, key_padding=pad)
    assert torch.isfinite(o).all()
    pad_q = pad[:, None, :, None].expand_as(o)
    assert (o[pad_q] == 0).all()
    assert (o[~pad_q] != 0).all()
