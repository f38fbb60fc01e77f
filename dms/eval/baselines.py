"""Training-free KV eviction at a chosen budget, run on the same paged DMS
cache as DMS itself, so the memory each one frees is real and measured the
same way (SPEC §4 counts):

- `ContentBlind(rate, seed)`: every token is flagged for eviction with
  probability `rate`, whatever its content (DMS's eviction rate, without its
  choice of what to evict); flagged tokens leave after the window as in DMS.
- `StreamingLLM(sinks)`: attention sinks plus a sliding window: the first
  `sinks` tokens are kept, every other token leaves once it is `window`
  tokens old (Xiao et al., 2023). The window is the cache's: pass it to
  `eviction_policy(..., window_size=W)`.

    with eviction_policy(model, StreamingLLM(sinks=4), window_size=96):
        out = model.generate(ids, max_new_tokens=8, **cache_kwargs(model.get_cache()))

Each policy maps (layer, z [B, H, T], tokens the cache had seen) to the
decisions of T new tokens (bool [B, H, T]; decision t flags token t - 1,
SPEC §3), which `Qwen3AttentionDMS.decision_policy` uses in eval mode in
place of z > 0. Score-based policies (TOVA, H2O) evict by attention weights
rather than by a per-token flag and are not expressible this way.
"""

import contextlib

import torch

__all__ = ["ContentBlind", "StreamingLLM", "eviction_policy"]


class ContentBlind:
    """Flags each token with probability `rate` (0 <= rate <= 1), drawn from
    a generator seeded by (seed, layer, position of the first new token), so
    the same call gives the same flags."""

    def __init__(self, rate, seed=0):
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 <= rate <= 1:
            raise ValueError(f"rate: expected a probability in [0, 1], got {rate!r}")
        self.rate, self.seed = float(rate), int(seed)

    def __call__(self, layer_idx, z, tokens_fed):
        generator = torch.Generator().manual_seed(hash((self.seed, layer_idx, tokens_fed)) & 0x7FFF_FFFF)
        return (torch.rand(z.shape, generator=generator) < self.rate).to(z.device)

    def __repr__(self):
        return f"ContentBlind(rate={self.rate:.3f}, seed={self.seed})"


class StreamingLLM:
    """Keeps the first `sinks` tokens (>= 0) of every row and evicts every
    other token once it leaves the window."""

    def __init__(self, sinks=4):
        if not isinstance(sinks, int) or isinstance(sinks, bool) or sinks < 0:
            raise ValueError(f"sinks: expected an int >= 0, got {sinks!r}")
        self.sinks = sinks

    def __call__(self, layer_idx, z, tokens_fed):
        T = z.shape[-1]
        positions = torch.arange(tokens_fed, tokens_fed + T, device=z.device)
        # decision t flags token t - 1: keep tokens 0 .. sinks - 1
        return (positions > self.sinks).expand(z.shape).contiguous()

    def __repr__(self):
        return f"StreamingLLM(sinks={self.sinks})"


@contextlib.contextmanager
def eviction_policy(model, policy, window_size=None):
    """Within the block, `model`'s attention layers decide evictions with
    `policy` (None: the model's own decisions) and, when given, caches made by
    `model.get_cache()` use `window_size` as their window. Positions count per
    cache, so use one unpadded sequence per row (batch size 1)."""
    layers = [layer.self_attn for layer in model.model.layers]
    saved = [attn.decision_policy for attn in layers], model.config.dms_window_size
    if window_size is not None:
        if not isinstance(window_size, int) or window_size <= model.config.dms_paged_attention_block_size:
            raise ValueError(f"window_size: expected an int larger than the page size "
                             f"({model.config.dms_paged_attention_block_size}), got {window_size!r}")
        model.config.dms_window_size = window_size
    try:
        for attn in layers:
            attn.decision_policy = policy
        yield model
    finally:
        for attn, old in zip(layers, saved[0]):
            attn.decision_policy = old
        model.config.dms_window_size = saved[1]
