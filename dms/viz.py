"""Pictures and reports of what a DMS cache keeps.

- `head_counts` / `head_values`: [layers, KV heads] tokens seen and stored,
  and the fraction kept (or compression) per (layer, KV head), as numpy arrays.
- `plot_compression_heatmap`: that array as a heatmap (PNG file or inline).
- `record_generation` / `CacheSizeRecorder`: the cache's size after every
  forward of `generate` (prefill, then each new token) as a `CacheTimeline`;
  `plot_cache_timeline` draws it against what a dense cache would hold.
- `compression_report`: a text table of the same numbers.

Every function takes a `DMSCache` or anything that carries one (a model
output, a `generate(..., return_dict_in_generate=True)` output, a
`CacheTimeline`). matplotlib is imported only when drawing (pip install
"dms-kv[eval]" or matplotlib); the plot functions return the figure and the
numpy array they drew.
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import LogitsProcessor

from dms.cache import DMSCache

__all__ = ["CacheSizeRecorder", "CacheTimeline", "compression_report", "head_counts", "head_values",
           "plot_cache_timeline", "plot_compression_heatmap", "record_generation"]

_VALUES = ("kept", "compression")


def _cache_of(source, name="source"):
    if isinstance(source, DMSCache):
        return source
    for attr in ("cache", "past_key_values"):
        found = getattr(source, attr, None)
        if isinstance(found, DMSCache):
            return found
    raise TypeError(f"{name}: expected a DMSCache or an object carrying one (a model or generate output with "
                    f"return_dict_in_generate=True, a CacheTimeline), got {type(source).__name__}")


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("dms.viz draws with matplotlib, which is not installed: pip install matplotlib "
                          "(or pip install 'dms[eval]')") from exc
    return plt


def head_counts(source):
    """(seen, stored): two [layers, KV heads] int64 arrays, the tokens each
    (layer, KV head) has seen and stores now, summed over the batch (padding
    is not a token). Layers the cache has not used yet are rows of zeros;
    layer widths differ only if the model's layers do (then the narrower are
    zero-padded)."""
    cache = _cache_of(source)
    layers = [layer.paged if layer.is_initialized else None for layer in cache.layers]
    width = max((p.num_kv_heads for p in layers if p is not None), default=1)
    seen = np.zeros((len(layers), width), dtype=np.int64)
    stored = np.zeros((len(layers), width), dtype=np.int64)
    for i, p in enumerate(layers):
        if p is not None:
            seen[i, :p.num_kv_heads] = p.tokens_seen().sum(0).cpu().numpy()
            stored[i, :p.num_kv_heads] = p.tokens_stored().sum(0).cpu().numpy()
    return seen, stored


def head_values(source, value="kept"):
    """[layers, KV heads] float64 array per (layer, KV head):

    - value="kept" (default): tokens stored / tokens seen over the batch (1 =
      nothing evicted);
    - value="compression": tokens seen / stored over the batch (the memory
      saved in that head; a layer's `DMSCache.compression_ratios()` entry is
      its heads' seen summed over their stored).

    NaN where the (layer, head) has seen no token."""
    if value not in _VALUES:
        raise ValueError(f"value: expected one of {_VALUES}, got {value!r}")
    seen, stored = head_counts(_cache_of(source))
    with np.errstate(invalid="ignore", divide="ignore"):
        if value == "kept":
            return np.where(seen > 0, stored / np.maximum(seen, 1), np.nan)
        return np.where(stored > 0, seen / np.maximum(stored, 1), np.nan)


def plot_compression_heatmap(source, value="kept", path=None, ax=None, title=None, annotate=None):
    """Heatmap of `head_values(source, value)`: layers down, KV heads across.

    Args:
        source: a DMSCache or an object carrying one.
        value: "kept" (fraction stored, default) or "compression" (seen / stored).
        path: save the figure there as PNG (default None: do not save).
        ax: draw into this matplotlib Axes (default None: a new figure).
        title: the figure title (default: what is drawn and the overall ratio).
        annotate: write each cell's value (default: when there are at most 256 cells).

    Returns (figure, array): the array is exactly what the image shows."""
    data = head_values(source, value)
    plt = _pyplot()
    if ax is None:
        L, H = data.shape
        fig, ax = plt.subplots(figsize=(max(3.5, 0.5 * H + 2.5), max(2.5, 0.3 * L + 1.5)))
    else:
        fig = ax.figure
    cache = _cache_of(source)
    if value == "kept":
        image = ax.imshow(data, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        label = "tokens stored / seen"
    else:
        image = ax.imshow(data, cmap="magma", vmin=1.0, aspect="auto", interpolation="nearest")
        label = "compression (seen / stored)"
    fig.colorbar(image, ax=ax, label=label)
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(data.shape[1]))
    ax.set_yticks(range(data.shape[0]))
    if annotate is None:
        annotate = data.size <= 256
    if annotate:
        for (i, j), v in np.ndenumerate(data):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if (value == "kept" and v < 0.5) else "black")
    ax.set_title(title if title is not None else f"DMS cache: {label} (overall {cache.compression_ratio():.2f}x)")
    if path is not None:
        fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return fig, data


@dataclass
class CacheTimeline:
    """The cache's size after each recorded forward (step 0: after prefill).

    positions: [S] tokens fed to the cache so far (padding included).
    tokens_seen: [S, layers] tokens seen, summed over rows (what a dense
        cache would hold).
    tokens_stored: [S, layers] tokens stored, summed over rows.
    bytes_in_use: [S] bytes of keys and values in the pages holding tokens.
    cache: the recorded DMSCache.
    """

    positions: np.ndarray
    tokens_seen: np.ndarray
    tokens_stored: np.ndarray
    bytes_in_use: np.ndarray
    cache: DMSCache = field(repr=False)


class CacheSizeRecorder(LogitsProcessor):
    """A logits processor that changes nothing and records `cache`'s size:
    generate calls it after every forward (the prefill, then each step), so
    `timeline()` has one entry per generated token. Each record reads the
    per-row counters (on CUDA: a sync per layer and step)."""

    def __init__(self, cache):
        self.cache = _cache_of(cache, "cache")
        self._records = []

    def record(self):
        layers = self.cache.layers
        seen = [int(layer.paged.tokens_seen().sum()) if layer.is_initialized else 0 for layer in layers]
        stored = [int(layer.paged.tokens_stored().sum()) if layer.is_initialized else 0 for layer in layers]
        self._records.append((self.cache.get_seq_length(), seen, stored, self.cache.bytes_in_use()))

    def __call__(self, input_ids, scores):
        self.record()
        return scores

    def timeline(self) -> CacheTimeline:
        recs = self._records
        n = len(self.cache.layers)
        return CacheTimeline(
            positions=np.array([r[0] for r in recs], dtype=np.int64),
            tokens_seen=np.array([r[1] for r in recs], dtype=np.int64).reshape(len(recs), n),
            tokens_stored=np.array([r[2] for r in recs], dtype=np.int64).reshape(len(recs), n),
            bytes_in_use=np.array([r[3] for r in recs], dtype=np.int64),
            cache=self.cache)


def record_generation(model, input_ids, cache=None, **generate_kwargs):
    """Runs `model.generate(input_ids, ...)` on a DMS cache while recording its
    size after every forward.

    Args:
        model: a DMS causal LM (`get_cache()`, e.g. Qwen3ForCausalLMDMS).
        input_ids: [B, T] prompt (pass attention_mask in generate_kwargs for
            a left-padded batch).
        cache: the DMSCache to fill (default None: `model.get_cache()`); a
            cache holding earlier turns continues them.
        generate_kwargs: passed to generate (a `logits_processor` list given
            there is kept; the recorder is added to it).

    Returns (generate's output, CacheTimeline)."""
    from transformers import LogitsProcessorList

    from dms.models.qwen3.modeling_qwen3_dms import cache_kwargs

    if not hasattr(model, "get_cache"):
        raise TypeError(f"model: expected a DMS model with get_cache() (e.g. Qwen3ForCausalLMDMS), "
                        f"got {type(model).__name__}")
    cache = model.get_cache() if cache is None else _cache_of(cache, "cache")
    recorder = CacheSizeRecorder(cache)
    processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
    processors.append(recorder)
    with torch.no_grad():
        out = model.generate(input_ids, logits_processor=processors, **cache_kwargs(cache), **generate_kwargs)
    return out, recorder.timeline()


def plot_cache_timeline(timeline, path=None, ax=None, title=None, per_layer=False):
    """Tokens stored in the cache against tokens seen (what a dense cache
    would hold), step by step, summed over rows (and layers unless per_layer).

    Args:
        timeline: a CacheTimeline (from record_generation or CacheSizeRecorder).
        path: save the figure there as PNG (default None).
        ax: draw into this Axes (default None: a new figure).
        title: the title (default: a description).
        per_layer: one line per layer instead of the total (default False).

    Returns (figure, stored): stored is the plotted [S] (or [S, layers]) array."""
    if not isinstance(timeline, CacheTimeline):
        raise TypeError(f"timeline: expected a CacheTimeline, got {type(timeline).__name__}")
    if len(timeline.positions) == 0:
        raise ValueError("timeline: it holds no record (generate made no forward pass)")
    plt = _pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
    else:
        fig = ax.figure
    x = timeline.positions
    if per_layer:
        stored = timeline.tokens_stored
        for i in range(stored.shape[1]):
            ax.plot(x, stored[:, i], label=f"layer {i}")
        ax.plot(x, timeline.tokens_seen[:, 0], "k--", label="dense (tokens seen)")
    else:
        stored = timeline.tokens_stored.sum(1)
        ax.plot(x, stored, label="DMS: tokens stored")
        ax.plot(x, timeline.tokens_seen.sum(1), "k--", label="dense: tokens seen")
    first = stored[0, 0] if per_layer else stored[0]
    ax.plot([x[0]], [first], "o", color="tab:blue")
    ax.annotate(" after prefill", (x[0], first), fontsize=8, va="top")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("tokens fed to the cache")
    ax.set_ylabel("KV entries (all rows" + (")" if per_layer else ", all layers)"))
    ax.legend(fontsize=8)
    ax.set_title(title if title is not None else "KV cache size during generation")
    if path is not None:
        fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return fig, stored


def compression_report(source) -> str:
    """A text table: per layer the compression ratio and the fraction kept per
    KV head; overall ratio; bytes in use against a dense cache of the same
    dtype (2 x tokens seen x head_dim x element size per row, no paging)."""
    cache = _cache_of(source)
    used = [layer.paged for layer in cache.layers if layer.is_initialized]
    if not used:
        return "DMS cache: empty (no forward pass has used it)"
    kept = head_values(cache, "kept")
    seen, stored = head_counts(cache)
    dense = sum(int(p.tokens_seen().sum()) * 2 * p.head_dim * p.k_pages.element_size() for p in used)
    p0 = used[0]
    lines = [f"DMS cache: {len(cache.layers)} layers x {p0.num_kv_heads} KV heads, batch {p0.batch_size}, "
             f"window {p0.window_size}, page {p0.page_size}, {p0.dtype}".replace("torch.", ""),
             f"tokens fed {cache.get_seq_length()}, stored {int(stored.sum())} of {int(seen.sum())} seen "
             f"(all layers and rows); compression {cache.compression_ratio():.2f}x (seen / stored; "
             f"mean of per-row ratios {cache.mean_row_compression_ratio():.2f}x)",
             f"KV bytes in use {cache.bytes_in_use():,} (reserved {cache.bytes_reserved():,}); "
             f"a dense cache would hold {dense:,}",
             "layer  compression  kept per KV head"]
    for i, ratio in enumerate(cache.compression_ratios()):
        heads = " ".join("  -  " if np.isnan(v) else f"{v:.2f}" for v in kept[i])
        lines.append(f"{i:>5}  {ratio:>10.2f}x  {heads}")
    return "\n".join(lines)
