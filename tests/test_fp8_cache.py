"""FP8 cache pages (csrc/dms.h: dms_kv_format; issue 18): the conversion
against torch's float8 types, code by code and on every rounding boundary,
with saturation where torch's cast gives NaN or infinity; the per-row scales;
prefill, chunked prefill, decode and new turns against the float64 oracle on
the oracle's rounding (oracle.fp8_round); select_rows and retain carrying the
scales; the byte accounting; and a model that stores its cache in FP8 from
the config field through generate. The decode kernel variants run these
rows through tests/test_attn_decode.py (test_fp8_decode_matches_float64)."""

import pytest
import torch

from dms.cache import PagedLayerCache
from tests import oracle
from tests.conftest import DEVICES
from tests.test_cache import _oracle, _run_sequence, _sequence

FORMATS = {"fp8_e4m3": (torch.float8_e4m3fn, 448.0, 0x7E), "fp8_e5m2": (torch.float8_e5m2, 57344.0, 0x7B)}


def _stored(cache, rows_of_values):
    """Appends rows [N, D] (row i as token i of the single row of a 1-head
    cache that keeps everything) and returns (codes [N, D] uint8, scales [N])
    as the pages hold them."""
    N, D = rows_of_values.shape
    k = rows_of_values.view(1, 1, N, D).contiguous()
    cache.append(k, k, torch.zeros(1, 1, N, dtype=torch.bool))
    index, _ = cache.slot_index()
    slots = index[0, :N]
    return cache.k_pages.view(-1, D)[slots], cache.k_scales.view(-1)[slots]


def _cache(D, kv_cache_dtype, dtype=torch.float32):
    return PagedLayerCache(1, 1, D, 4, page_size=8, dtype=dtype, kv_cache_dtype=kv_cache_dtype)


def _with_max(values, fmax, D=16):
    """values as rows of D - 1, each closed by fmax, so that the row's scale
    is exactly 1 and its codes are the plain conversion of its values."""
    pad = (-values.numel()) % (D - 1)
    values = torch.cat([values.float(), torch.zeros(pad)]).view(-1, D - 1)
    return torch.cat([values, torch.full((values.shape[0], 1), fmax)], dim=1)


@pytest.mark.parametrize("kv_cache_dtype", FORMATS)
def test_every_code_converts_as_torch(kv_cache_dtype):
    fp8, fmax, top = FORMATS[kv_cache_dtype]
    values = torch.arange(256, dtype=torch.uint8).view(fp8).float()
    finite = values[values.isfinite()]
    assert len(finite) == (254 if fp8 == torch.float8_e4m3fn else 248)
    rows = _with_max(finite, fmax)
    codes, scales = _stored(_cache(16, kv_cache_dtype), rows)
    assert torch.equal(scales, torch.ones_like(scales))
    want = rows.to(fp8).view(torch.uint8)
    assert torch.equal(codes, want)
    assert torch.equal(codes.view(fp8).float(), rows)  # and back: exact


@pytest.mark.parametrize("kv_cache_dtype", FORMATS)
def test_rounding_is_to_nearest_even_on_every_boundary(kv_cache_dtype):
    """Midpoints between neighbouring codes (ties: the even code), a float32
    ulp either side of them, and random values over the whole range (the
    subnormals included) round as torch's cast does."""
    fp8, fmax, top = FORMATS[kv_cache_dtype]
    grid = torch.arange(128, dtype=torch.uint8).view(fp8).float()
    grid = grid[grid.isfinite() & (grid <= fmax)]
    mid = (grid[1:] + grid[:-1]) / 2  # exact in float32
    near = torch.cat([mid, torch.nextafter(mid, torch.tensor(0.0)), torch.nextafter(mid, torch.tensor(1e9))])
    g = torch.Generator().manual_seed(0)
    random = torch.exp(torch.empty(3000).uniform_(-25, float(torch.log(torch.tensor(fmax))), generator=g))
    values = torch.cat([near, random]).clamp(max=fmax)
    values = torch.cat([values, -values])
    rows = _with_max(values, fmax)
    codes, _ = _stored(_cache(16, kv_cache_dtype), rows)
    assert torch.equal(codes, rows.to(fp8).view(torch.uint8))
    ties = codes[:, :-1].reshape(-1)[: len(mid)].int()
    assert bool((ties % 2 == 0).all())  # every exact midpoint went to the even neighbour


@pytest.mark.parametrize("kv_cache_dtype", FORMATS)
def test_rows_scale_to_the_largest_value_and_saturate_never_overflow(kv_cache_dtype):
    """Rows of any magnitude (1e-30 to 1e38, an all-zero row): the scale is
    amax / fmax in float32; the largest element's x / s may round past fmax
    (torch would give NaN or infinity there), the page holds the largest
    finite code instead; no stored code is NaN or infinite."""
    fp8, fmax, top = FORMATS[kv_cache_dtype]
    g = torch.Generator().manual_seed(1)
    magnitudes = torch.tensor([1e-30, 3e-7, 0.1, 1.0, 7.0, 300.0, 6e4, 1e20, 1e38])
    rows = torch.randn(len(magnitudes) * 40, 24, generator=g) * magnitudes.repeat_interleave(40)[:, None]
    rows = torch.cat([rows, torch.zeros(1, 24)])
    codes, scales = _stored(_cache(24, kv_cache_dtype), rows)
    amax = rows.abs().amax(1)
    assert torch.equal(scales, amax / fmax)
    decoded = codes.view(fp8).float()
    assert bool(decoded.isfinite().all())
    at_max = codes.gather(1, rows.abs().argmax(1, keepdim=True)).flatten()[:-1] & 0x7F
    assert bool((at_max == top).all())
    assert not codes[-1].any() and scales[-1] == 0  # the zero row: zero codes, zero scale
    torch.testing.assert_close(decoded.double() * scales.double()[:, None], oracle.fp8_round(rows, kv_cache_dtype),
                               rtol=0, atol=0)


@pytest.mark.parametrize("kv_cache_dtype", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_stored_rows_equal_the_oracle_rounding(kv_cache_dtype, dtype):
    """What the pages hold, read back (code * scale), is exactly the oracle's
    rounding of the model's keys, from every input dtype."""
    k = (torch.randn(37, 40, generator=torch.Generator().manual_seed(2)) * 5).to(dtype)
    codes, scales = _stored(_cache(40, kv_cache_dtype, dtype), k.float().to(dtype))
    got = codes.view(FORMATS[kv_cache_dtype][0]).double() * scales.double()[:, None]
    torch.testing.assert_close(got, oracle.fp8_round(k, kv_cache_dtype), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_cache_dtype", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window,page_size,D", [(0, 1, 8), (3, 2, 19), (8, 4, 64), (40, 16, 16)])
@pytest.mark.parametrize("chunks", [[37], [5, 0, 0, 7, 0, 11, 0, 0, 0, 10], [1] * 37,
                                    [3, 0, 0, 0, 0, 0, 9, 0, 20]])
def test_fp8_attention_matches_oracle_for_any_turn_pattern(kv_cache_dtype, dtype, window, page_size, D, chunks,
                                                           device):
    """Prefill (the new tokens rounded as they will be stored), chunked
    prefill over FP8 pages, decode and new turns: the oracle's attention on
    the rounded keys and values of the whole sequence, whatever the split."""
    B, H, G = 2, 2, 2
    T = sum(max(c, 1) for c in chunks)
    q, k, v, alpha, padding = _sequence(B, H, G, T, D, seed=len(chunks) + window)
    k = k * 3  # sharper attention: the rounding shows more
    got, cache = _run_sequence(q, k, v, alpha, padding, window, page_size, chunks, dtype=dtype, device=device,
                               kv_cache_dtype=kv_cache_dtype)
    rounded = [oracle.fp8_round(x.to(dtype), kv_cache_dtype) for x in (k, v)]
    want = _oracle(q.to(dtype).double(), *rounded, alpha, padding, window)
    want = want.masked_fill(padding.view(B, 1, T, 1).expand_as(want), 0.0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert cache.k_pages.dtype == torch.uint8 and cache.k_scales.dtype == torch.float32


def test_select_rows_and_retain_carry_the_scales():
    B, H, G, T, D, w = 2, 2, 2, 30, 8, 4
    q, k, v, alpha, padding = _sequence(B, H, G, T, D, seed=11, left_pad=False)
    cache = PagedLayerCache(B, H, D, w, page_size=2, dtype=torch.float32, kv_cache_dtype="fp8_e4m3")
    cache.append(k[:, :, :20] * 4, v[:, :, :20], alpha[:, :, :20])
    cache.select_rows([1, 1, 0])
    sel = torch.tensor([1, 1, 0])
    qs, ks, vs, als = q[sel], k[sel] * 4, v[sel], alpha[sel]
    o, _ = cache.prefill_attention(qs[:, :, 20:], ks[:, :, 20:], vs[:, :, 20:], als[:, :, 20:])
    rounded = [oracle.fp8_round(x, "fp8_e4m3") for x in (ks, vs)]
    want = oracle.attention_with_decisions(qs.double(), *rounded, als.double(), w)[:, :, 20:]
    torch.testing.assert_close(o.double(), want, rtol=1e-5, atol=1e-5)
    # retain: keep the first and the window slots of every row; decode sees the kept ones with their scales
    index, counts = cache.slot_index()
    keep = (index[:, :, None] == cache.window.long()[:, None, :]).any(2)  # the window record's slots ...
    keep[:, 0] = True  # ... and the first
    S = index.shape[1]
    assert bool((keep.sum(1) < counts).all())  # something is freed
    kept_codes = [cache.k_pages.view(-1, D)[index[r][keep[r, :S]]] for r in range(cache.rows)]
    kept_scales = [cache.k_scales.view(-1)[index[r][keep[r, :S]]] for r in range(cache.rows)]
    cache.retain(keep)
    index, counts = cache.slot_index()
    for r in range(cache.rows):
        slots = index[r, :int(counts[r])]
        assert torch.equal(cache.k_pages.view(-1, D)[slots], kept_codes[r])
        assert torch.equal(cache.k_scales.view(-1)[slots], kept_scales[r])


def test_bytes_count_codes_and_scales():
    D, P = 64, 16
    native = PagedLayerCache(1, 2, D, 32, page_size=P, dtype=torch.bfloat16)
    fp8 = PagedLayerCache(1, 2, D, 32, page_size=P, dtype=torch.bfloat16, kv_cache_dtype="fp8")
    k = torch.randn(1, 2, 40, D, dtype=torch.bfloat16)
    for c in (native, fp8):
        c.append(k, k, torch.zeros(1, 2, 40, dtype=torch.bool))
    pages = 2 * 3  # 40 tokens in pages of 16, two rows
    assert native.bytes_in_use() == pages * P * 2 * D * 2
    assert fp8.bytes_in_use() == pages * P * 2 * (D + 4)
    assert fp8.bytes_reserved() == fp8.k_pages.shape[0] * P * 2 * (D + 4)
    fp8.grow_pool(3)
    assert fp8.k_scales.shape == (fp8.k_pages.shape[0], P) == fp8.v_scales.shape


def test_bad_formats_and_tensors_are_named():
    with pytest.raises(ValueError, match=r"^kv_cache_dtype: expected one of 'auto', 'fp8', 'fp8_e4m3', 'fp8_e5m2', "
                                         r"got 'fp8_e4m3fn'"):
        PagedLayerCache(1, 1, 8, 4, kv_cache_dtype="fp8_e4m3fn")
    from dms import _C

    cache = PagedLayerCache(1, 1, 8, 4, page_size=2, dtype=torch.float32, kv_cache_dtype="fp8_e4m3")
    k = torch.randn(1, 1, 3, 8)
    d = torch.zeros(1, 1, 3, dtype=torch.bool)
    slots = torch.empty(1, 1, 3, dtype=torch.int32)
    state = cache._state()
    with pytest.raises(ValueError, match=r"^cache.k_scales: required with FP8 pages"):
        _C.cache_append(state[:9], 4, k, k, d, None, slots, kv_format=1)
    native = PagedLayerCache(1, 1, 8, 4, page_size=2, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"^cache.k_scales: expected none \(pages of dtype float32 have no scales\)"):
        _C.cache_append(native._state() + state[9:], 4, k, k, d, None, slots, kv_format=0)
    with pytest.raises(ValueError, match=r"^cache.kv_format: expected 0 \(native\), 1 \(fp8_e4m3\) or 2 "
                                         r"\(fp8_e5m2\), got 7"):
        _C.cache_append(state, 4, k, k, d, None, slots, kv_format=7)
    with pytest.raises(ValueError, match=r"^cache.k_scales: expected dim 1 to be 2 \(page size\)"):
        _C.cache_append(state[:9] + (state[9][:, :1], state[10]), 4, k, k, d, None, slots, kv_format=1)
    with pytest.raises(TypeError, match=r"^v_new: expected dtype float32"):
        _C.cache_append(state, 4, k, k.bfloat16(), d, None, slots, kv_format=1)
    with pytest.raises(TypeError, match=r"^cache.k_pages: expected dtype uint8"):  # float pages called FP8
        _C.cache_append(native._state() + state[9:], 4, k, k, d, None, slots, kv_format=1)


def test_a_model_stores_its_cache_in_fp8_from_the_config(tmp_path):
    """dms_kv_cache_dtype given to from_pretrained (the path of lm-eval's
    --model_args) reaches every layer's pages, survives save_pretrained, and
    generate runs on it; the logits move by the rounding only."""
    from dms import Qwen3ForCausalLMDMS
    from dms.tiny import save_tiny

    path = save_tiny(str(tmp_path / "tiny"))
    native = Qwen3ForCausalLMDMS.from_pretrained(path).eval()
    model = Qwen3ForCausalLMDMS.from_pretrained(path, dms_kv_cache_dtype="fp8_e4m3").eval()
    assert model.config.dms_kv_cache_dtype == "fp8_e4m3" and native.config.dms_kv_cache_dtype == "auto"
    ids = torch.randint(0, 250, (2, 90), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        caches = [m.get_cache() for m in (native, model)]
        logits = [m(input_ids=ids, past_key_values=c).logits for m, c in zip((native, model), caches)]
        step = [m(input_ids=ids[:, :1], past_key_values=c).logits for m, c in zip((native, model), caches)]
    for layer in caches[1].layers:
        assert layer.paged.k_pages.dtype == torch.uint8 and layer.paged.k_scales.shape[0] == layer.paged.k_pages.shape[0]
    assert caches[1].layers[0].paged.bytes_in_use() < 0.6 * caches[0].layers[0].paged.bytes_in_use()
    for ours, ref in ((logits[1], logits[0]), (step[1], step[0])):
        change = (ours - ref).abs().max() / ref.abs().max()
        assert 1e-4 < change < 0.08, change
    override = model.get_cache(kv_cache_dtype="auto")
    assert override.layers[0].kv_cache_dtype == "auto"
    model.save_pretrained(tmp_path / "saved")
    again = Qwen3ForCausalLMDMS.from_pretrained(tmp_path / "saved")
    assert again.config.dms_kv_cache_dtype == "fp8_e4m3"
    out = again.generate(ids[:1, :20], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 25)
