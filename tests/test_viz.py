"""dms.viz on a real cache: the arrays drawn are layers x KV heads and equal
the tokens a DMS cache must hold by SPEC §4, computed here from the model's
decisions (not from the cache's own counters)."""

import sys

import pytest

matplotlib = pytest.importorskip("matplotlib")  # an optional dependency (dms-kv[eval])
matplotlib.use("Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dms import viz  # noqa: E402
from dms.tiny import tiny_model  # noqa: E402

W = 64  # the tiny model's dms_window_size
B, T = 2, 300


def expected_stored(decisions, w=W):
    """[..., T] hard decisions -> [...] tokens a row stores after all T
    (SPEC §4): the last w + 1 tokens, plus every older token i whose flag
    e[i] = decision[i + 1] is 0."""
    t = decisions.shape[-1]
    old = max(t - w - 1, 0)
    return min(t, w + 1) + (decisions[..., 1:old + 1] == 0).sum(-1)


@pytest.fixture(scope="module")
def filled():
    model = tiny_model(seed=1).eval()
    ids = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(0))
    cache = model.get_cache()
    with torch.no_grad():
        out = model.model(ids, cache=cache, use_cache=True)
    decisions = out.dms_decisions.numpy().astype(np.int64)  # [layers, B, H, T]
    return model, cache, decisions


def test_heatmap_draws_layers_by_heads_kept_fraction(filled):
    model, cache, decisions = filled
    L, H = model.config.num_hidden_layers, model.config.num_key_value_heads
    stored = expected_stored(decisions).astype(np.float64)  # [L, B, H]
    assert stored.min() < T  # the tiny adapters evict: the test can tell kept from seen
    fig, data = viz.plot_compression_heatmap(cache)
    assert data.shape == (L, H)
    np.testing.assert_allclose(data, stored.sum(1) / (B * T), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(fig.axes[0].images[0].get_array()), data)
    seen_counts, stored_counts = viz.head_counts(cache)
    np.testing.assert_array_equal(seen_counts, np.full((L, H), B * T))
    np.testing.assert_array_equal(stored_counts, stored.sum(1))


def test_compression_values_are_tokens_seen_over_stored_like_the_cache(filled):
    model, cache, decisions = filled
    L, H = model.config.num_hidden_layers, model.config.num_key_value_heads
    stored = expected_stored(decisions).astype(np.float64)  # [L, B, H]
    ratios = viz.head_values(cache, "compression")
    np.testing.assert_allclose(ratios, B * T / stored.sum(1), rtol=1e-12)
    np.testing.assert_allclose(H * B * T / stored.sum((1, 2)), cache.compression_ratios(), rtol=1e-9)
    assert cache.compression_ratio() == pytest.approx(L * H * B * T / stored.sum())
    assert cache.mean_row_compression_ratio() == pytest.approx((T / stored).mean())
    fig, data = viz.plot_compression_heatmap(cache, value="compression", annotate=False)
    np.testing.assert_array_equal(data, ratios)


def test_heatmap_png_and_sources_carrying_a_cache(filled, tmp_path):
    model, cache, _ = filled
    path = tmp_path / "heat.png"
    viz.plot_compression_heatmap(cache, path=str(path), title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ids = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=256,
                             return_dict_in_generate=True)
    found = getattr(out, "cache", None) or out.past_key_values
    np.testing.assert_array_equal(viz.head_values(out), viz.head_values(found))


def test_timeline_follows_spec_step_by_step(filled):
    model = filled[0]
    H = model.config.num_key_value_heads
    n_prompt, n_new = 100, 12
    ids = torch.randint(0, 256, (1, n_prompt), generator=torch.Generator().manual_seed(5))
    out, timeline = viz.record_generation(model, ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                          pad_token_id=256)
    assert out.shape == (1, n_prompt + n_new)
    np.testing.assert_array_equal(timeline.positions, n_prompt + np.arange(n_new))
    np.testing.assert_array_equal(timeline.tokens_seen, H * timeline.positions[:, None].repeat(4, 1))
    # The decisions of a one-shot forward over the tokens fed are those decode made (SPEC §5).
    with torch.no_grad():
        decisions = model.model(out[:, :-1], use_cache=False).dms_decisions.numpy().astype(np.int64)
    want = np.stack([expected_stored(decisions[..., :p]).sum((1, 2)) for p in timeline.positions])
    np.testing.assert_array_equal(timeline.tokens_stored, want)
    np.testing.assert_array_equal(timeline.tokens_stored[-1], viz.head_counts(timeline)[1].sum(1))
    assert timeline.bytes_in_use[-1] == timeline.cache.bytes_in_use()
    fig, stored = viz.plot_cache_timeline(timeline)
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_ydata(), want.sum(1))
    fig, per_layer = viz.plot_cache_timeline(timeline, per_layer=True)
    assert per_layer.shape == (n_new, 4)


def test_timeline_without_eviction_stores_everything(filled):
    model = filled[0]
    ids = torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(6))
    model.config.dms_disable_eviction = True
    try:
        _, timeline = viz.record_generation(model, ids, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                            pad_token_id=256)
    finally:
        model.config.dms_disable_eviction = False
    np.testing.assert_array_equal(timeline.tokens_stored, timeline.tokens_seen)


def test_report_lists_every_layer(filled):
    model, cache, _ = filled
    text = viz.compression_report(cache)
    for i, ratio in enumerate(cache.compression_ratios()):
        assert f"{i:>5}  {ratio:>10.2f}x" in text
    assert f"{cache.bytes_in_use():,}" in text
    assert "empty" in viz.compression_report(model.get_cache())
    assert np.isnan(viz.head_values(model.get_cache())).all()


def test_bad_input_is_named(filled, monkeypatch):
    cache = filled[1]
    with pytest.raises(ValueError, match="value"):
        viz.head_values(cache, "ratio")
    with pytest.raises(TypeError, match="source"):
        viz.plot_compression_heatmap(object())
    with pytest.raises(TypeError, match="timeline"):
        viz.plot_cache_timeline(cache)
    with pytest.raises(TypeError, match="model"):
        viz.record_generation(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long))
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match="matplotlib"):
        viz.plot_compression_heatmap(cache)
