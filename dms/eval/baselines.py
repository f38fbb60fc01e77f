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

Score-based policies evict by attention weights, after each call, and free
the pages for real (`PagedLayerCache.retain`); every row (layer, KV head)
holds at most `budget` tokens after each call, and a call of n tokens holds
up to budget + n while it runs:

- `TOVA(budget)`: keeps the tokens the newest query attends to most (Oren et
  al., 2024), weights averaged over the query heads of the KV head.
- `H2O(budget, recent)`: keeps the `recent` newest tokens and the heavy
  hitters, the tokens with the largest attention summed over every query
  since they were stored (Zhang et al., 2023).

They evict once per call: a prompt is read in chunks of `chunk` tokens
(default 16; the papers' token-by-token reading is chunk=1, 16x slower here),
so TOVA scores by the chunk's last query. Their window is 0: nothing is
flagged, the window record only holds the newest token, which is never
evicted.

Each policy maps (layer, z [B, H, T], tokens the cache had seen) to the
decisions of T new tokens (bool [B, H, T]; decision t flags token t - 1,
SPEC §3), which `Qwen3AttentionDMS.decision_policy` uses in eval mode in
place of z > 0 (all False for the score-based ones); a policy with an
`after_attend(layer_idx, paged, q, scale)` method is called after every
attention call with the layer's `PagedLayerCache` and that call's queries.
"""

import contextlib

import torch

__all__ = ["ContentBlind", "H2O", "StreamingLLM", "TOVA", "eviction_policy"]


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


class _ScorePolicy:
    """Flags nothing; after every attention call scores the stored tokens
    of each row by the call's attention weights (recomputed in float32 from
    the pages) and keeps `budget` of them. A subclass defines
    `_choose(layer_idx, weights [R, G, n, S], counts [R], first)` -> [R, S]
    keep mask or None (every row fits)."""

    window_size = 0

    def __init__(self, budget, chunk=16):
        for name, value in (("budget", budget), ("chunk", chunk)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        self.budget, self.chunk = budget, chunk

    def __call__(self, layer_idx, z, tokens_fed):
        return torch.zeros(z.shape, dtype=torch.bool, device=z.device)

    @torch.no_grad()
    def after_attend(self, layer_idx, paged, q, scale, key_padding=None):
        """Scores the stored tokens of every row of `paged` by the attention of
        q [B, H*G, n, D] (the call's queries, already attended) and evicts
        down to the budget."""
        if key_padding is not None and bool(key_padding.any()):
            raise ValueError(f"{type(self).__name__}: score-based eviction needs unpadded rows (one sequence "
                             "per batch row, no padding)")
        B, HG, n, D = q.shape
        H = paged.num_kv_heads
        index, counts = paged.slot_index()
        R, S = index.shape
        k = paged.k_pages.view(-1, D)[index.clamp(min=0)].float()  # [R, S, D]
        logits = torch.einsum("rgnd,rsd->rgns", q.float().reshape(R, HG // H, n, D), k) * scale
        # Nothing is flagged, so the call's n tokens took each row's last n
        # slots in order: slot s holds call token s - (counts - n).
        s = torch.arange(S, device=q.device)
        call_index = s[None, :] - (counts[:, None] - n)  # [R, S], < 0 for tokens of earlier calls
        visible = (s[None, None, :] < counts[:, None, None]) & \
            (call_index[:, None, :] <= torch.arange(n, device=q.device)[None, :, None])  # [R, n, S]
        weights = torch.softmax(logits.masked_fill(~visible[:, None], float("-inf")), dim=-1)
        first = bool((paged.row_seen.long() == n).all())  # a fresh cache: forget earlier scores
        keep = self._choose(layer_idx, weights, counts, first)
        if keep is not None:
            new_slot = paged.retain(keep)
            self._moved(layer_idx, new_slot)

    def _moved(self, layer_idx, new_slot):
        pass

    def _top(self, score, counts, protect):
        """[R, S] keep mask: the `budget` highest scores among each row's
        slots, slots in `protect` always in, or None when every row fits."""
        if int(counts.max()) <= self.budget:
            return None
        S = score.shape[1]
        used = torch.arange(S, device=score.device)[None, :] < counts[:, None]
        score = score.masked_fill(protect, float("inf")).masked_fill(~used, float("-inf"))
        top = score.topk(min(self.budget, S), dim=1).indices
        keep = torch.zeros_like(used).scatter_(1, top, True)
        return keep & used


class TOVA(_ScorePolicy):
    """Token Omission Via Attention: after each call, every row keeps the
    `budget` tokens with the largest attention weight from the call's last
    query (mean over the KV head's query heads); the newest token stays."""

    def _choose(self, layer_idx, weights, counts, first):
        score = weights[:, :, -1, :].mean(1)  # [R, S]
        newest = torch.arange(score.shape[1], device=score.device)[None, :] == (counts[:, None] - 1)
        return self._top(score, counts, newest)

    def __repr__(self):
        return f"TOVA(budget={self.budget}, chunk={self.chunk})"


class H2O(_ScorePolicy):
    """Heavy-Hitter Oracle: every row keeps its `recent` newest tokens
    (default budget // 2) and, of the others, the budget - recent tokens with
    the largest attention weight summed over every query (and query head of
    the KV head) since they were stored."""

    def __init__(self, budget, recent=None, chunk=16):
        super().__init__(budget, chunk)
        recent = budget // 2 if recent is None else recent
        if not isinstance(recent, int) or isinstance(recent, bool) or not 1 <= recent <= budget:
            raise ValueError(f"recent: expected an int in [1, budget={budget}], got {recent!r}")
        self.recent = recent
        self._scores = {}  # layer -> [R, S] accumulated attention of each slot

    def _choose(self, layer_idx, weights, counts, first):
        R, S = weights.shape[0], weights.shape[-1]
        acc = torch.zeros(R, S, dtype=torch.float32, device=weights.device)
        old = None if first else self._scores.get(layer_idx)
        if old is not None:
            width = min(S, old.shape[1])
            acc[:, :width] = old[:, :width]
        acc += weights.sum(dim=(1, 2))
        self._scores[layer_idx] = acc
        recent = torch.arange(S, device=acc.device)[None, :] >= (counts[:, None] - self.recent)
        return self._top(acc, counts, recent)

    def _moved(self, layer_idx, new_slot):
        acc = self._scores[layer_idx]
        moved = torch.zeros_like(acc)
        kept = new_slot >= 0
        rows = torch.arange(acc.shape[0], device=acc.device)[:, None].expand_as(new_slot)
        moved[rows[kept], new_slot[kept]] = acc[kept]
        self._scores[layer_idx] = moved

    def __repr__(self):
        return f"H2O(budget={self.budget}, recent={self.recent}, chunk={self.chunk})"


@contextlib.contextmanager
def eviction_policy(model, policy, window_size=None):
    """Within the block, `model`'s attention layers decide evictions with
    `policy` (None: the model's own decisions) and, when given, caches made by
    `model.get_cache()` use `window_size` as their window (default: the
    policy's own `window_size` where it has one, else the model's). A policy
    with a `chunk` reads prompts in chunks of that many tokens
    (`dms_chunked_prefill`). Positions count per cache, so use one unpadded
    sequence per row (batch size 1)."""
    layers = [layer.self_attn for layer in model.model.layers]
    saved = ([attn.decision_policy for attn in layers], model.config.dms_window_size,
             model.config.dms_chunked_prefill)
    if window_size is None and getattr(policy, "window_size", None) is not None:
        model.config.dms_window_size = policy.window_size  # score-based: flags nothing, see the module doc
    elif window_size is not None:
        if not isinstance(window_size, int) or window_size <= model.config.dms_paged_attention_block_size:
            raise ValueError(f"window_size: expected an int larger than the page size "
                             f"({model.config.dms_paged_attention_block_size}), got {window_size!r}")
        model.config.dms_window_size = window_size
    if getattr(policy, "chunk", None) is not None:
        model.config.dms_chunked_prefill = policy.chunk
    try:
        for attn in layers:
            attn.decision_policy = policy
        yield model
    finally:
        for attn, old in zip(layers, saved[0]):
            attn.decision_policy = old
        model.config.dms_window_size, model.config.dms_chunked_prefill = saved[1], saved[2]
