"""The paged DMS cache (SPEC §4–§5): random operation sequences checked after
every operation against a plain-Python model of the cache, and the attention
of prefill, chunked prefill, decode and new turns checked against the float64
oracle on the whole sequence."""

import random

import pytest
import torch

import dms
from dms.cache import DMSCacheLayer, PagedLayerCache
from tests import oracle
from tests.conftest import DEVICES


class CacheModel:
    """SPEC §4 in plain Python: per row, the list of (position, token id,
    flag) it has seen; it stores a token iff its flag is not 1 or it is one
    of the last w + 1 tokens."""

    def __init__(self, rows, window):
        self.window = window
        self.tokens = [[] for _ in range(rows)]  # [pos, id, flag or None]

    def append(self, row, token_id, decision):
        seen = self.tokens[row]
        if seen:
            seen[-1][2] = int(decision)
        seen.append([len(seen), token_id, None])

    def stored(self, row):
        seen = self.tokens[row]
        now = len(seen) - 1
        return {tid for pos, tid, flag in seen if flag != 1 or now - pos <= self.window}

    def seen(self, row):
        return len(self.tokens[row])


def _stored_ids(cache, row):
    """Token ids held by a row: the first key component of each stored slot."""
    P = cache.page_size
    n = int(cache.row_slots[row])
    pages = cache.page_table[row].tolist()
    ids = set()
    for i in range(n):
        page = pages[i // P]
        ids.add(int(cache.k_pages[page, i % P, 0].item()))
    return ids


def _check_against_model(cache, model):
    for r in range(cache.rows):
        assert int(cache.row_seen[r]) == model.seen(r)
        want = model.stored(r)
        assert int(cache.row_slots[r]) == len(want), r
        assert _stored_ids(cache, r) == want, r
    live = [r for r in range(cache.rows) if model.seen(r)]
    if live:
        mean_row = sum(model.seen(r) / len(model.stored(r)) for r in live) / len(live)
        assert cache.mean_row_compression_ratio() == pytest.approx(mean_row)
        ratio = sum(model.seen(r) for r in live) / sum(len(model.stored(r)) for r in live)
        assert cache.compression_ratio() == pytest.approx(ratio)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("page_size,window", [(1, 0), (1, 3), (2, 3), (4, 9), (16, 5)])
def test_random_operations_match_the_model(seed, page_size, window):
    rng = random.Random(seed * 100 + page_size * 10 + window)
    B, H, D = rng.randint(1, 3), rng.randint(1, 3), 4
    cache = PagedLayerCache(B, H, D, window, page_size=page_size, dtype=torch.float32)
    model = CacheModel(B * H, window)
    next_id = 1
    for _ in range(25):
        op = rng.choice(["prefill", "prefill", "decode", "decode", "decode", "reset"] if next_id > 1
                        else ["prefill"])
        if op == "reset":
            cache.reset()
            model = CacheModel(B * H, window)
            _check_against_model(cache, model)
            continue
        n = 1 if op == "decode" else rng.randint(1, 3 * window + 5)
        k = torch.randn(B, H, n, D)
        ids = torch.arange(next_id, next_id + B * H * n, dtype=torch.float32).view(B, H, n)
        k[..., 0] = ids  # every token of every row is identifiable
        next_id += B * H * n
        decisions = torch.rand(B, H, n) < rng.choice([0.2, 0.5, 0.9])
        padding = torch.rand(B, n) < (0.3 if op == "prefill" else 0.1)
        cache.append(k, k.clone(), decisions, padding)
        for b in range(B):
            for h in range(H):
                for t in range(n):
                    if not padding[b, t]:
                        model.append(b * H + h, int(ids[b, h, t]), decisions[b, h, t])
        _check_against_model(cache, model)
    assert cache.bytes_in_use() <= cache.bytes_reserved()


def test_pool_grows_on_demand_and_keeps_data():
    cache = PagedLayerCache(2, 2, 4, 2, page_size=2, dtype=torch.float32)
    assert cache.k_pages.shape[0] == 4  # one page per row to start
    model = CacheModel(4, 2)
    for step in range(40):
        k = torch.full((2, 2, 1, 4), float(step + 1))
        k[..., 0] += torch.arange(4, dtype=torch.float32).view(2, 2, 1) * 1000
        cache.append(k, k, torch.zeros(2, 2, 1, dtype=torch.bool))  # keep everything
        for r in range(4):
            model.append(r, int(k[r // 2, r % 2, 0, 0]), 0)
        _check_against_model(cache, model)
    assert cache.k_pages.shape[0] >= 4 * 20  # 40 tokens per row, 2 per page


def test_pool_exhaustion_without_growth_changes_nothing():
    cache = PagedLayerCache(1, 2, 4, 3, page_size=2, dtype=torch.float32, allow_growth=False)
    k = torch.randn(1, 2, 2, 4)
    cache.append(k, k, torch.zeros(1, 2, 2, dtype=torch.bool))  # fills the two pages
    before = _snapshot(cache)
    with pytest.raises(dms.PoolExhaustedError, match="needs"):
        cache.append(k, k, torch.zeros(1, 2, 2, dtype=torch.bool))
    assert _unchanged(before, cache)


def _snapshot(cache):
    return [t.clone() for t in cache._state()]


def _unchanged(before, cache):
    """Every state tensor as before; the page table may have gained empty
    columns (capacity, not content)."""
    for name, a, b in zip(range(9), before, cache._state()):
        if name == 3:  # page_table
            if not (torch.equal(a, b[:, : a.shape[1]]) and bool((b[:, a.shape[1]:] == -1).all())):
                return False
        elif not torch.equal(a, b):
            return False
    return True


def _run_sequence(q, k, v, alpha, padding, window, page_size, chunks, dtype=torch.float32, device="cpu",
                  kv_cache_dtype="auto"):
    """Feeds the sequence through the cache: a chunk of size c > 0 is a prefill
    (attention, then append), 0 a decode step (append, then attention)."""
    B, H, T, D = k.shape
    cache = PagedLayerCache(B, H, D, window, page_size=page_size, dtype=dtype, device=device,
                            kv_cache_dtype=kv_cache_dtype)
    outs, t0 = [], 0
    for c in chunks:
        n = max(c, 1)
        sl = slice(t0, t0 + n)
        args = [x[:, :, sl].to(device, dtype) for x in (q, k, v)]
        dec, pad = alpha[:, :, sl].to(device), padding[:, sl].to(device)
        if c > 0:
            o, _ = cache.prefill_attention(*args, dec, pad)
            cache.append(args[1], args[2], dec, pad)
        else:
            cache.append(args[1], args[2], dec, pad)
            o, _ = cache.decode_attention(args[0])
            o = o * (~pad).view(-1, 1, 1, 1).to(o.dtype)  # a padding step's query is not a token
        outs.append(o.cpu().double())
        t0 += n
    assert t0 == T
    return torch.cat(outs, dim=2), cache


def _sequence(B, H, G, T, D, seed, left_pad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H * G, T, D, generator=g)
    k = torch.randn(B, H, T, D, generator=g)
    v = torch.randn(B, H, T, D, generator=g)
    alpha = torch.rand(B, H, T, generator=g) < 0.6
    padding = torch.zeros(B, T, dtype=torch.bool)
    if left_pad and B > 1:
        padding[1, :3] = True
    return q, k, v, alpha, padding


def _oracle(q, k, v, alpha, padding, window):
    ref = oracle.attention_with_decisions(q, k, v, alpha.double(), window, key_padding=padding)
    return ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window,page_size", [(0, 1), (3, 2), (8, 4), (40, 16)])
@pytest.mark.parametrize("chunks", [[37], [5, 0, 0, 7, 0, 11, 0, 0, 0, 10], [1] * 37, [16, 16, 5],
                                    [3, 0, 0, 0, 0, 0, 9, 0, 20], [150, 0, 0, 140]])
def test_attention_matches_oracle_for_any_turn_pattern(device, window, page_size, chunks):
    """Prefill, chunked prefill, decode steps and new turns (prefill after
    decode) all give the oracle's attention on the whole sequence. The last
    pattern has several query tiles per prefill: a later tile leaves out the
    keys evicted before its first query (its own and cached ones)."""
    B, H, G, D = 2, 2, 2, 16
    T = sum(max(c, 1) for c in chunks)
    q, k, v, alpha, padding = _sequence(B, H, G, T, D, seed=len(chunks) + window)
    got, cache = _run_sequence(q, k, v, alpha, padding, window, page_size, chunks, device=device)
    want = _oracle(q, k, v, alpha, padding, window)
    pad_q = padding.view(B, 1, T, 1).expand_as(want)
    want = want.masked_fill(pad_q, 0.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert cache.compression_ratio() >= 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("chunks,D,page_size", [([20, 0, 0, 0, 10] + [0] * 15, 64, 4),
                                               ([150, 0, 0, 90] + [0] * 5, 128, 16)], ids=["short", "tiles"])
def test_reduced_precision_cache(dtype, chunks, D, page_size, device):
    """bfloat16/float16 pages: prefill (several query and key tiles in the
    second case, cached keys in the second prefill) and decode."""
    B, H, G, T = 1, 2, 4, sum(max(c, 1) for c in chunks)
    q, k, v, alpha, padding = _sequence(B, H, G, T, D, seed=7)
    got, _ = _run_sequence(q, k, v, alpha, padding, 8, page_size, chunks, dtype=dtype, device=device)
    rounded = [x.to(dtype).double() for x in (q, k, v)]
    want = _oracle(*rounded, alpha, padding, 8)
    assert ((got - want).abs().max() / want.abs().max()).item() < (2e-2 if dtype == torch.bfloat16 else 4e-3)


def test_decode_splits_agree_with_one_pass():
    """Decode splits long rows over threads; the merge must not change the
    result beyond rounding."""
    B, H, G, T, D = 1, 1, 4, 3000, 32
    q, k, v, alpha, padding = _sequence(B, H, G, T, D, seed=3)
    cache = PagedLayerCache(B, H, D, 64, page_size=16, dtype=torch.float32)
    cache.append(k, v, alpha, padding)
    qd = q[:, :, -1:].contiguous()
    try:
        dms.set_num_threads(1)
        one, lse1 = cache.decode_attention(qd)
        dms.set_num_threads(2)
        two, lse2 = cache.decode_attention(qd)
    finally:
        dms.set_num_threads(0)
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse1, lse2, rtol=1e-6, atol=1e-6)


def test_bad_input_is_named_and_changes_nothing():
    cache = PagedLayerCache(1, 2, 4, 3, page_size=2, dtype=torch.float32)
    k = torch.randn(1, 2, 3, 4)
    ok = torch.zeros(1, 2, 3, dtype=torch.bool)
    cache.append(k, k, ok)
    before = _snapshot(cache)
    cases = [
        (TypeError, "k_new: expected dtype float32, got bfloat16", lambda: cache.append(k.bfloat16(), k, ok)),
        (ValueError, "decisions: expected 0 or 1, got 2", lambda: cache.append(k, k, torch.full((1, 2, 3), 2,
                                                                                                dtype=torch.uint8))),
        (ValueError, "decisions: expected shape (1, 2, 3), got (1, 2, 2)", lambda: cache.append(k, k, ok[..., :2])),
        (ValueError, "k_new: 2 x 2 (batch x heads) rows, but the cache has 2 rows",
         lambda: cache.append(torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4), torch.zeros(2, 2, 3, dtype=torch.bool))),
        (ValueError, "v_new: expected shape (1, 2, 3, 4)", lambda: cache.append(k, k[..., :3], ok)),
        (TypeError, "key_padding: expected dtype uint8 or bool", lambda: cache.append(k, k, ok, torch.zeros(1, 3))),
        (ValueError, "q: 5 query heads of batch 1 do not split", lambda: cache.decode_attention(torch.randn(1, 5, 1, 4))),
        (ValueError, "q: expected shape (1, 4, 1, 4)", lambda: cache.decode_attention(torch.randn(1, 4, 2, 4))),
        (ValueError, "scale: expected a finite value > 0", lambda: cache.decode_attention(torch.randn(1, 4, 1, 4),
                                                                                          scale=-1.0)),
    ]
    for exc, message, call in cases:
        with pytest.raises(exc) as info:
            call()
        assert str(info.value).startswith(message), (message, str(info.value))
        assert _unchanged(before, cache), message


def test_constructor_validates_arguments():
    with pytest.raises(ValueError, match="^window_size: expected an int >= 0"):
        PagedLayerCache(1, 1, 4, -1)
    with pytest.raises(ValueError, match="^page_size: expected an int >= 1"):
        PagedLayerCache(1, 1, 4, 3, page_size=0)
    with pytest.raises(ValueError, match="^growth"):
        PagedLayerCache(1, 1, 4, 3, growth=1.0)


@pytest.mark.parametrize("seed", range(4))
def test_select_rows_matches_the_model(seed):
    """Beam-search style reorders (with repeats) and batch shrinking between
    random appends; every copy then evolves on its own."""
    rng = random.Random(seed)
    B, H, D, w, P = 3, 2, 4, 3, 2
    cache = PagedLayerCache(B, H, D, w, page_size=P, dtype=torch.float32)
    model = CacheModel(B * H, w)
    next_id = 1
    for step in range(12):
        if step % 3 == 2:
            index = [rng.randrange(cache.batch_size) for _ in range(rng.randint(1, 4))]
            cache.select_rows(index)
            old = model.tokens
            model = CacheModel(len(index) * H, w)
            model.tokens = [[list(t) for t in old[b * H + h]] for b in index for h in range(H)]
            _check_against_model(cache, model)
        B = cache.batch_size
        n = rng.randint(1, 6)
        k = torch.randn(B, H, n, D)
        ids = torch.arange(next_id, next_id + B * H * n, dtype=torch.float32).view(B, H, n)
        k[..., 0] = ids
        next_id += B * H * n
        decisions = torch.rand(B, H, n) < 0.5
        cache.append(k, k.clone(), decisions)
        for b in range(B):
            for h in range(H):
                for t in range(n):
                    model.append(b * H + h, int(ids[b, h, t]), decisions[b, h, t])
        _check_against_model(cache, model)


def test_select_rows_then_attention_matches_oracle():
    B, H, G, T, D, w = 2, 2, 2, 30, 8, 4
    q, k, v, alpha, padding = _sequence(B, H, G, T, D, seed=11, left_pad=False)
    cache = PagedLayerCache(B, H, D, w, page_size=2, dtype=torch.float32)
    cache.append(k[:, :, :20], v[:, :, :20], alpha[:, :, :20])
    cache.select_rows([1, 1, 0])
    sel = torch.tensor([1, 1, 0])
    qs, ks, vs, als = q[sel], k[sel], v[sel], alpha[sel]
    o, _ = cache.prefill_attention(qs[:, :, 20:], ks[:, :, 20:], vs[:, :, 20:], als[:, :, 20:])
    want = oracle.attention_with_decisions(qs, ks, vs, als.double(), w)[:, :, 20:]
    torch.testing.assert_close(o.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"^batch_index: expected values in \[0, 3\)"):
        cache.select_rows([3])


def test_select_rows_takes_a_bool_mask_as_a_mask_and_refuses_floats():
    B, H, G, T, D, w = 3, 2, 2, 20, 8, 4
    q, k, v, alpha, padding = _sequence(B, H, G, T, D, seed=12, left_pad=False)
    cache = PagedLayerCache(B, H, D, w, page_size=2, dtype=torch.float32)
    cache.append(k[:, :, :12], v[:, :, :12], alpha[:, :, :12])
    seen = cache.tokens_stored().clone()
    with pytest.raises(TypeError, match="^batch_index: expected integer indices or a bool mask, got torch.float32"):
        cache.select_rows([0.5])
    with pytest.raises(ValueError, match=r"^batch_index: a bool mask must have shape \(3,\)"):
        cache.select_rows(torch.tensor([True, False]))
    cache.select_rows(torch.tensor([True, False, True]))  # keeps rows 0 and 2, in order (not indices 1, 0, 1)
    assert torch.equal(cache.tokens_stored(), seen[[0, 2]])
    sel = torch.tensor([0, 2])
    o, _ = cache.prefill_attention(q[sel][:, :, 12:], k[sel][:, :, 12:], v[sel][:, :, 12:], alpha[sel][:, :, 12:])
    want = oracle.attention_with_decisions(q[sel], k[sel], v[sel], alpha[sel].double(), w)[:, :, 12:]
    torch.testing.assert_close(o.double(), want, rtol=1e-5, atol=1e-5)


# ---- the Hugging Face cache -----------------------------------------------------


def test_dms_cache_drives_layers_like_generate_does():
    from transformers.cache_utils import Cache

    from dms.cache import DMSCache

    B, H, G, D, w = 2, 2, 2, 8, 3
    T = 30
    q, k, v, alpha, padding = _sequence(B, H, G, T, D, seed=5)
    cache = DMSCache(num_layers=2, window_size=w, page_size=2)
    assert isinstance(cache, Cache) and len(cache.layers) == 2
    assert cache.get_seq_length() == 0 and cache.get_mask_sizes(7, 0) == (7, 0)
    outs = []
    t0 = 0
    for n in [12] + [1] * 8 + [10]:  # prefill, decode steps, a new turn
        sl = slice(t0, t0 + n)
        o0 = cache.layers[0].attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], alpha[:, :, sl], padding[:, sl])
        cache.layers[1].attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], alpha[:, :, sl], padding[:, sl])
        outs.append(o0)
        t0 += n
        assert cache.get_seq_length() == t0 and cache.get_mask_sizes(1, 0) == (t0 + 1, 0)
    got = torch.cat(outs, 2).double()
    want = _oracle(q, k, v, alpha, padding, w).masked_fill(padding.view(B, 1, T, 1), 0.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ratios = cache.compression_ratios()
    assert len(ratios) == 2 and ratios[0] == ratios[1] > 1.0
    assert cache.compression_ratio() == pytest.approx(ratios[0])
    assert 0 < cache.bytes_in_use() <= cache.bytes_reserved()

    cache.reorder_cache(torch.tensor([1, 0]))
    assert cache.layers[0].paged.tokens_seen()[0].tolist() == [27, 27]  # element 1 had 3 padding tokens
    cache.batch_repeat_interleave(2)
    assert cache.layers[1].paged.batch_size == 4
    cache.batch_select_indices(torch.tensor([3]))
    assert cache.layers[0].paged.batch_size == 1
    with pytest.raises(NotImplementedError, match="cannot be rolled back"):
        cache.crop(5)
    with pytest.raises(NotImplementedError, match="attend"):
        cache.update(k, v, 0)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.compression_ratio() == 1.0


# ---- the cache tensors imported once (_C.CacheViews) ---------------------------


def test_cache_views_are_reused_until_a_state_tensor_is_replaced():
    cache = PagedLayerCache(1, 2, 4, 3, page_size=2, dtype=torch.float32)
    k = torch.randn(1, 2, 1, 4)
    keep = torch.zeros(1, 2, 1, dtype=torch.bool)
    cache.append(k, k, keep)
    views = cache._views
    assert isinstance(views, dms._C.CacheViews) and views.holds(cache._state())
    cache.decode_attention(torch.randn(1, 4, 1, 4))
    assert cache._views is views  # reused, not imported again
    assert not views.holds(cache._state(), 7)  # another stream
    assert not views.holds(cache._state()[:8]) and not views.holds(list(cache._state()))
    # Replaced from outside: the identity check notices, the op writes into the new tensor.
    old_seen = cache.row_seen
    cache.row_seen = old_seen.clone()
    assert not views.holds(cache._state())
    cache.append(k, k, keep)
    assert cache._views is not views
    assert cache.row_seen.tolist() == [2, 2] and old_seen.tolist() == [1, 1]
    # Pool growth replaces the pool: imported again, contents kept.
    views = cache._views
    for _ in range(6):
        cache.append(k, k, keep)
    assert cache._views is not views and cache.k_pages.shape[0] > 2
    assert torch.equal(cache.k_pages[0, 0], k[0, 0, 0])


def test_cache_views_give_the_same_results_as_the_tuple():
    from dms import _C

    B, H, G, D = 2, 2, 2, 16
    q, k, v, alpha, padding = _sequence(B, H, G, 40, D, seed=11)
    cache = PagedLayerCache(B, H, D, 8, page_size=4, dtype=torch.float32)
    cache.append(k, v, alpha, padding)
    qd = q[:, :, -1:].contiguous()
    outs = []
    for state in (cache._state(), _C.CacheViews(cache._state())):
        o, lse = torch.empty_like(qd), torch.empty(B, H * G, 1)
        _C.attn_decode(state, 8, qd, 0.25, o, lse, None)
        outs.append((o, lse))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_cache_views_bad_input_is_named():
    from dms import _C

    cache = PagedLayerCache(1, 2, 4, 3, page_size=2, dtype=torch.float32)
    with pytest.raises(TypeError, match=r"^cache: expected a tuple of 9 tensors .* or a CacheViews of one, got int"):
        _C.CacheViews(42)
    with pytest.raises(TypeError, match=r"^cache: expected a tuple of 9 tensors"):
        _C.CacheViews(cache._state()[:8])
    with pytest.raises(TypeError, match=r"^cache.row_seen: expected a tensor supporting DLPack"):
        _C.CacheViews(cache._state()[:5] + ("row_seen",) + cache._state()[6:])
    with pytest.raises(BufferError, match=r"^cache.window: "):  # torch refuses to export it
        _C.CacheViews(cache._state()[:6] + (cache.window.float().requires_grad_(),) + cache._state()[7:])
    # The views hold whatever DLPack gives; the op checks them at every call.
    state = cache._state()
    views = _C.CacheViews(state[:2] + (state[2].float(),) + state[3:])
    q, o, lse = torch.randn(1, 4, 1, 4), torch.empty(1, 4, 1, 4), torch.empty(1, 4, 1)
    with pytest.raises(TypeError, match=r"^cache.slot_limit: expected dtype int32, got float32"):
        _C.attn_decode(views, 3, q, 0.5, o, lse, None)
    views = _C.CacheViews(state)
    with pytest.raises(TypeError, match=r"^q: expected dtype float32, got bfloat16"):
        _C.attn_decode(views, 3, q.bfloat16(), 0.5, o, lse, None)
    with pytest.raises(ValueError, match=r"^lse: a tensor is required, got None"):
        _C.attn_decode(views, 3, q, 0.5, o, None, None)


def test_preallocated_outputs_are_written():
    cache = PagedLayerCache(1, 2, 4, 3, page_size=2, dtype=torch.float32)
    k = torch.randn(1, 2, 3, 4)
    slots = torch.full((1, 2, 3), 99, dtype=torch.int32)
    assert cache.append(k, k, torch.zeros(1, 2, 3, dtype=torch.bool), token_slots=slots) is slots
    assert bool((slots >= 0).all()) and slots.unique().numel() == 6  # six tokens, six slots
    q = torch.randn(1, 4, 1, 4)
    want_o, want_lse = cache.decode_attention(q)
    o, lse = torch.empty_like(want_o), torch.empty_like(want_lse)
    got_o, got_lse = cache.decode_attention(q, o=o, lse=lse)
    assert got_o is o and got_lse is lse
    assert torch.equal(o, want_o) and torch.equal(lse, want_lse)


def test_decode_steps_after_the_batch_changes():
    """DMSCacheLayer keeps token_slots and lse buffers between decode steps;
    a reorder that changes the batch size must not reuse them."""
    from dms.cache import DMSCacheLayer

    B, H, G, D, w = 2, 2, 2, 8, 3
    q, k, v, alpha, padding = _sequence(B, H, G, 14, D, seed=9, left_pad=False)
    one, two = DMSCacheLayer(w, 2), DMSCacheLayer(w, 2)
    for layer in (one, two):
        layer.attend(q[:, :, :12], k[:, :, :12], v[:, :, :12], alpha[:, :, :12])
        layer.attend(q[:, :, 12:13], k[:, :, 12:13], v[:, :, 12:13], alpha[:, :, 12:13])
    two.batch_repeat_interleave(2)
    rep = torch.tensor([0, 0, 1, 1])
    sl = slice(13, 14)
    want = one.attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], alpha[:, :, sl])
    got = two.attend(q[rep, :, sl], k[rep, :, sl], v[rep, :, sl], alpha[rep, :, sl])
    assert torch.equal(got, want[rep])


@pytest.mark.cuda
def test_cuda_cache_views_belong_to_one_stream():
    from dms import _C

    cache = PagedLayerCache(1, 2, 4, 3, page_size=2, dtype=torch.float32, device="cuda")
    q = torch.randn(1, 4, 1, 4, device="cuda")
    o, lse = torch.empty_like(q), torch.empty(1, 4, 1, device="cuda")
    side = torch.cuda.Stream()
    views = _C.CacheViews(cache._state(), stream=side.cuda_stream)
    with pytest.raises(ValueError, match=r"^cache: its CacheViews were exported for CUDA stream"):
        _C.attn_decode(views, 3, q, 0.5, o, lse, None, stream=torch.cuda.current_stream().cuda_stream)
    with torch.cuda.stream(side):  # the Python cache imports again for the stream it runs on
        k = torch.randn(1, 2, 1, 4, device="cuda")
        cache.append(k, k, torch.zeros(1, 2, 1, dtype=torch.bool, device="cuda"))
        assert cache._views.holds(cache._state(), side.cuda_stream)
    torch.cuda.synchronize()


def test_bad_construction_and_stale_caches_are_named_at_once():
    """Values that used to be accepted and fail (or misbehave) at first use."""
    from dms.tiny import tiny_model

    cases = [
        (dict(growth="2"), "^growth: expected a finite factor > 1, got '2'"),
        (dict(dtype=torch.float64), "^dtype: expected one of torch.float32, torch.float16, torch.bfloat16"),
        (dict(dtype=torch.int32), "^dtype: expected one of"),
        (dict(device="meta"), r"^device: expected cpu or cuda\[:N\] \(the engine's devices\), got 'meta'"),
        (dict(preallocate_for_tokens=-5), "^preallocate_for_tokens: expected None or an int >= 0, got -5"),
        (dict(max_tokens=1.5), "^max_tokens: expected None or an int >= 0, got 1.5"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            PagedLayerCache(1, 1, 8, 4, page_size=2, **kwargs)
    cache = PagedLayerCache(1, 1, 8, 4, page_size=2, dtype=torch.float32)
    for extra in (2.5, -5, True):
        with pytest.raises(ValueError, match="^extra_pages: expected an int >= 0"):
            cache.grow_pool(extra)
    model = tiny_model().eval()
    with pytest.raises(ValueError, match="^preallocate_for_tokens: expected None or an int >= 0, got -5"):
        model.get_cache(preallocate_for_tokens=-5)
    with pytest.raises(ValueError, match="^max_tokens: expected None or an int >= 0, got -1"):
        DMSCacheLayer(max_tokens=-1)
    sized = PagedLayerCache(2, 1, 8, 4, page_size=4, dtype=torch.float32, max_tokens=30)
    assert tuple(sized.page_table.shape) == (2, 8)  # ceil(30 / 4) columns up front
    layer = model.get_cache().layers[0]  # a model's cache: its tables cover max_position_embeddings
    assert layer.max_tokens == model.config.max_position_embeddings
    filled = model.get_cache()
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        model(ids, cache=filled)
        model.to(torch.bfloat16)
        with pytest.raises(ValueError, match="^cache: holds float32 keys on cpu, the model now computes in bfloat16"):
            model(ids[:, :1], cache=filled)
        filled.reset()  # a reset cache takes the new dtype
        assert model(ids[:, :5], cache=filled).logits.dtype == torch.bfloat16


def _count_reads(cache):
    reads = [0]
    read = cache._read_free_count

    def counted():
        reads[0] += 1
        return read()
    cache._read_free_count = counted
    return reads


def test_decode_reads_the_free_count_at_most_once_per_page_of_tokens():
    """The free-page count is device state (a sync on CUDA): 64 rows, pages
    of 256, the model's default reservation (4096 tokens per row), a
    1000-token prefill, then 2000 decode steps read it at most once per 256
    steps (the old bound read it ~988 times)."""
    g = torch.Generator().manual_seed(0)
    B, D, P = 64, 8, 256
    cache = PagedLayerCache(B, 1, D, 64, page_size=P, dtype=torch.float32, preallocate_for_tokens=4096)
    reads = _count_reads(cache)
    k = torch.randn(B, 1, 1000, D, generator=g)
    cache.append(k, k, torch.rand(B, 1, 1000, generator=g) < 0.5)
    for _ in range(2000):
        k = torch.randn(B, 1, 1, D, generator=g)
        cache.append(k, k, torch.rand(B, 1, 1, generator=g) < 0.1)
    assert reads[0] <= 2000 // P


@pytest.mark.parametrize("seed", range(3))
def test_an_append_without_a_read_always_fits(seed):
    """Whatever the pattern (padding, eviction rates, call lengths, growth),
    an append that the free-page bound lets through without reading the
    count never runs out of pages (on the CPU the C dry run would refuse it
    and the pool grow; on CUDA nothing else checks)."""
    rng = torch.Generator().manual_seed(seed)
    B, H, D, P = 3, 2, 4, 4
    cache = PagedLayerCache(B, H, D, 5, page_size=P, dtype=torch.float32, preallocate_for_tokens=8)
    reads = _count_reads(cache)
    grow, unread_refusals, grown = cache._grow_for, [], [0]

    def watched(missing):
        grown[0] += 1
        if reads[0] == before:  # refused although the bound read nothing
            unread_refusals.append(step)
        return grow(missing)
    cache._grow_for = watched
    for step in range(300):
        n = int(torch.randint(1, 4, (1,), generator=rng)) if step % 7 else int(torch.randint(4, 20, (1,), generator=rng))
        k = torch.randn(B, H, n, D, generator=rng)
        rate = [0.0, 0.3, 0.9][step // 100]
        pad = torch.rand(B, n, generator=rng) < 0.2
        before = reads[0]
        cache.append(k, k, torch.rand(B, H, n, generator=rng) < rate, pad)
    assert not unread_refusals and grown[0] > 0
    assert 0 < reads[0] < 300


@pytest.mark.parametrize("corrupt, field", [
    (lambda c: c.window.fill_(-1), "window"),
    (lambda c: c.page_table.fill_(-1), "page_table"),
    (lambda c: c.page_table.fill_(10**6), "page_table"),
    (lambda c: c.row_slots.fill_(10**6), "row_slots"),
])
def test_state_changed_by_hand_is_refused_not_followed(corrupt, field):
    """The kernels index the pool with the state's ids; a state edited
    outside dms (here: each row's counters or tables) is named, never read
    past the pool."""
    cache = PagedLayerCache(1, 2, 8, 4, page_size=4, dtype=torch.float32)
    k = torch.randn(1, 2, 10, 8)
    cache.append(k, k, torch.zeros(1, 2, 10, dtype=torch.bool))
    corrupt(cache)
    q = torch.randn(1, 4, 1, 8)
    one = torch.zeros(1, 2, 1, dtype=torch.bool)
    calls = [lambda: cache.append(k[:, :, :1], k[:, :, :1], one),
             lambda: cache.prefill_attention(q, k[:, :, :1], k[:, :, :1], one)]
    if field != "window":  # decode reads no window record, so it checks none
        calls.append(lambda: cache.decode_attention(q))
    for call in calls:
        with pytest.raises(ValueError, match=rf"^cache.{field}: row 0 holds .* reset the cache"):
            call()
