"""Score-based eviction on the paged cache (dms.eval.baselines.TOVA, H2O and
PagedLayerCache.retain): every call's attention output and the tokens kept
after it equal a dense float64 reference that runs the policy's rule on
Python sets; retained pages go back to the pool; a whole model under TOVA
with room for every token equals the model without eviction."""

import math

import pytest
import torch

from dms.cache import PagedLayerCache
from dms.eval.baselines import H2O, TOVA, eviction_policy

from .test_qwen3_oracle import TINY, _model


def _reference(q, k, v, chunks, kind, budget, recent, scale):
    """Dense float64 run of a score policy over one batch row: q [H*G, T, D],
    k, v [H, T, D]. Returns (outputs [H*G, T, D], kept positions per head
    after each chunk)."""
    HG, T, D = q.shape
    H = k.shape[0]
    G = HG // H
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(HG, T, D, dtype=torch.float64)
    stored = [[] for _ in range(H)]
    acc = [{} for _ in range(H)]
    history = []
    for t0, t1 in chunks:
        for h in range(H):
            keys = stored[h] + list(range(t0, t1))
            weights = {}  # (g, j) -> {i: w}
            for g in range(G):
                for j in range(t0, t1):
                    seen = [i for i in keys if i <= j]
                    logits = torch.stack([scale * q[h * G + g, j] @ k[h, i] for i in seen])
                    w = torch.softmax(logits, 0)
                    out[h * G + g, j] = sum(wi * v[h, i] for wi, i in zip(w, seen))
                    weights[g, j] = dict(zip(seen, w.tolist()))
            stored[h] = keys
            if kind == "tova":
                score = {i: sum(weights[g, t1 - 1][i] for g in range(G)) / G for i in keys}
                protect = {t1 - 1}
            else:
                for i in keys:
                    acc[h][i] = acc[h].get(i, 0.0) + sum(ws.get(i, 0.0) for ws in weights.values())
                score = acc[h]
                protect = set(keys[-recent:])
            if len(keys) > budget:
                others = sorted((i for i in keys if i not in protect), key=lambda i: -score[i])
                chosen = protect | set(others[:budget - len(protect)])
                stored[h] = [i for i in keys if i in chosen]
                acc[h] = {i: a for i, a in acc[h].items() if i in chosen}
        history.append([list(s) for s in stored])
    return out, history


def _stored_positions(paged, k):
    """Positions (in k [H, T, D]) of the keys each row stores, in slot order."""
    index, counts = paged.slot_index()
    D = k.shape[-1]
    keys = paged.k_pages.view(-1, D)[index.clamp(min=0)]
    out = []
    for h in range(k.shape[0]):
        row = keys[h, :int(counts[h])]
        match = (row[:, None, :] == k[h][None, :, :]).all(-1)
        assert bool((match.sum(1) == 1).all())
        out.append(match.int().argmax(1).tolist())
    return out


@pytest.mark.parametrize("kind", ["tova", "h2o"])
@pytest.mark.parametrize("G,P", [(1, 4), (3, 5)])
def test_each_call_and_what_it_keeps_equal_the_float64_reference(kind, G, P):
    H, D, T, budget = 2, 16, 47, 11
    gen = torch.Generator().manual_seed(5 + G)
    q = torch.randn(H * G, T, D, generator=gen) * 1.5
    k = torch.randn(H, T, D, generator=gen)
    v = torch.randn(H, T, D, generator=gen)
    chunks = [(0, 9), (9, 10), (10, 23), (23, 24), (24, 25)] + [(t, t + 1) for t in range(25, 40)] + [(40, 47)]
    scale = D ** -0.5
    policy = TOVA(budget) if kind == "tova" else H2O(budget, recent=4)
    expected, history = _reference(q, k, v, chunks, kind, budget, 4, scale)
    paged = PagedLayerCache(1, H, D, window_size=0, page_size=P, dtype=torch.float32)
    for (t0, t1), kept in zip(chunks, history):
        qc, kc, vc = q[None, :, t0:t1].contiguous(), k[None, :, t0:t1].contiguous(), v[None, :, t0:t1].contiguous()
        decisions = torch.zeros(1, H, t1 - t0, dtype=torch.bool)
        if t1 - t0 == 1:
            paged.append(kc, vc, decisions)
            o, _ = paged.decode_attention(qc, scale)
        else:
            o, _ = paged.prefill_attention(qc, kc, vc, decisions, scale=scale)
            paged.append(kc, vc, decisions)
        policy.after_attend(0, paged, qc, scale)
        torch.testing.assert_close(o[0].double(), expected[:, t0:t1], rtol=1e-5, atol=1e-5)
        assert _stored_positions(paged, k) == kept
        pages = math.ceil(len(kept[0]) / P) + math.ceil(len(kept[1]) / P)
        assert paged.bytes_in_use() == 2 * pages * P * D * 4
        assert int(paged.free_count) == paged.k_pages.shape[0] - pages  # every freed page is back in the pool
    assert max(len(s) for s in history[-1]) == budget


def test_retain_moves_the_kept_tokens_and_keeps_the_window_valid():
    H, D, w, P = 2, 8, 3, 4
    gen = torch.Generator().manual_seed(1)
    paged = PagedLayerCache(1, H, D, window_size=w, page_size=P, dtype=torch.float32)
    k, v = torch.randn(1, H, 30, D, generator=gen), torch.randn(1, H, 30, D, generator=gen)
    decisions = torch.rand(1, H, 30, generator=gen) < 0.3
    paged.append(k[:, :, :20].contiguous(), v[:, :, :20].contiguous(), decisions[:, :, :20].contiguous())
    index, counts = paged.slot_index()
    ring = set(paged.window.view(-1).tolist())
    keep = torch.rand(index.shape, generator=gen) < 0.5
    keep |= torch.isin(index, torch.tensor(sorted(ring)))  # the window record must stay
    before = [(paged.k_pages.view(-1, D)[index[r, :counts[r]]], paged.slot_limit.view(-1)[index[r, :counts[r]]])
              for r in range(H)]
    new_slot = paged.retain(keep)
    index2, counts2 = paged.slot_index()
    for r in range(H):
        mask = keep[r, :int(counts[r])]
        assert int(counts2[r]) == int(mask.sum())
        torch.testing.assert_close(paged.k_pages.view(-1, D)[index2[r, :counts2[r]]], before[r][0][mask])
        assert paged.slot_limit.view(-1)[index2[r, :counts2[r]]].tolist() == before[r][1][mask].tolist()
        assert new_slot[r, :int(counts[r])][mask].tolist() == list(range(int(counts2[r])))
    # The next tokens: the window record still names the right slots, so the
    # flags they carry land on the right tokens and attention sees what it should.
    q = torch.randn(1, H, 1, D, generator=gen)
    for t in range(20, 30):
        kept_keys = [paged.k_pages.view(-1, D)[index2[r, :counts2[r]]] for r in range(H)]
        paged.append(k[:, :, t:t + 1].contiguous(), v[:, :, t:t + 1].contiguous(), decisions[:, :, t:t + 1].contiguous())
        o, _ = paged.decode_attention(q)
        index2, counts2 = paged.slot_index()
        for r in range(H):
            limits = paged.slot_limit.view(-1)[index2[r, :counts2[r]]]
            visible = limits > t
            keys = paged.k_pages.view(-1, D)[index2[r, :counts2[r]]][visible].double()
            vals = paged.v_pages.view(-1, D)[index2[r, :counts2[r]]][visible].double()
            ref = torch.softmax(keys @ q[0, r, 0].double() * D ** -0.5, 0) @ vals
            torch.testing.assert_close(o[0, r, 0].double(), ref, rtol=1e-5, atol=1e-5)
            assert any(torch.equal(k[0, r, t], key) for key in paged.k_pages.view(-1, D)[index2[r, :counts2[r]]])
        del kept_keys


def test_retain_refuses_bad_masks_and_dropping_the_window():
    paged = PagedLayerCache(1, 2, 8, window_size=2, page_size=4, dtype=torch.float32)
    paged.append(torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8), torch.zeros(1, 2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^keep: expected a bool tensor \[rows=2, >= 9 slots\]"):
        paged.retain(torch.ones(2, 9))
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, 8] = False  # the newest token: in the window record
    with pytest.raises(ValueError, match="window record"):
        paged.retain(keep)
    assert paged.tokens_stored().tolist() == [[9, 9]]


def test_policy_arguments_are_named():
    with pytest.raises(ValueError, match="^budget: expected an int >= 1"):
        TOVA(0)
    with pytest.raises(ValueError, match="^chunk: expected an int >= 1"):
        H2O(8, chunk=0)
    with pytest.raises(ValueError, match=r"^recent: expected an int in \[1, budget=8\]"):
        H2O(8, recent=9)


@pytest.mark.parametrize("policy", [TOVA(10_000), H2O(10_000)], ids=["tova", "h2o"])
def test_a_model_whose_budget_holds_everything_equals_no_eviction(policy):
    m = _model(dms_separate_alpha=True, dms_disable_eviction=True).eval()
    ids = torch.randint(0, TINY["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = m(ids).logits
        with eviction_policy(m, policy):
            cache = m.get_cache()
            got = torch.cat([m(ids[:, :33], cache=cache).logits] + [m(ids[:, t:t + 1], cache=cache).logits
                                                                    for t in range(33, 40)], 1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert m.config.dms_window_size == 5 and m.config.dms_chunked_prefill is None  # restored


def test_a_small_budget_bounds_every_row_through_generate():
    m = _model(dms_separate_alpha=True).eval()
    ids = torch.randint(0, TINY["vocab_size"], (1, 60), generator=torch.Generator().manual_seed(4))
    from dms.models.qwen3.modeling_qwen3_dms import cache_kwargs

    for policy in (TOVA(12, chunk=8), H2O(12, chunk=8)):
        with torch.no_grad(), eviction_policy(m, policy):
            cache = m.get_cache()
            m.generate(ids, max_new_tokens=5, do_sample=False, **cache_kwargs(cache))
        for layer in cache.layers:
            assert layer.paged.tokens_stored().max() <= 12 and layer.paged.tokens_seen().min() == 64
