"""The paged DMS cache (SPEC §4–§5) on top of the C engine: one layer's
`PagedLayerCache`, and `DMSCache`, a Hugging Face `Cache` made of
`DMSCacheLayer`s that `generate` and `Qwen3ForCausalLMDMS` use.

Every row (batch element b, KV head h) keeps its own slots: all keys whose
eviction flag is 0 plus the last w + 1 tokens. Storage is a pool of pages of
P slots shared by the layer's rows, a page table per row, and the per-row
window record; all of it lives in tensors this object owns (on the model's
device), which the C/CUDA kernels read and update in place
(`dms._C.cache_append`, `attn_prefill`, `attn_decode`).

Shapes: B batch, H KV heads, G query heads per KV head, n new tokens, D head
dim, P page size, w window.
"""

import math
import threading
import weakref
from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from dms._ext import _C
from dms.runtime import exec_kwargs

__all__ = ["KV_CACHE_DTYPES", "CompressionTally", "DMSCache", "DMSCacheLayer", "PagedLayerCache",
           "check_kv_cache_dtype", "compression_tally"]

_INT32_MAX = 2**31 - 1
_PAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# kv_cache_dtype -> the C engine's dms_kv_format (csrc/dms.h). "auto": pages
# in the model's dtype; FP8: uint8 pages of E4M3 / E5M2 codes, one float32
# scale per stored (token, KV head) row of K and of V. "fp8" is E4M3, as in
# vLLM.
KV_CACHE_DTYPES = {"auto": 0, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 2}


def check_kv_cache_dtype(value, name="kv_cache_dtype"):
    """`value` if it names a KV page format (KV_CACHE_DTYPES), else a
    ValueError naming `name`."""
    if not isinstance(value, str) or value not in KV_CACHE_DTYPES:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, KV_CACHE_DTYPES))}, got {value!r}")
    return value


@torch.compiler.disable
def _multiprocessors(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


# id(k_pages) -> its PagedLayerCache: lets the custom ops below reuse the
# cache's imported views when torch.compile hands them the cache's own tensors.
_owners = weakref.WeakValueDictionary()


def _views_of(state, stream):
    """`_C.CacheViews` of the state tensors a custom op was given (nine, and
    the two scale tensors of FP8 pages when not None): the
    owning cache's kept views when these are its tensors (compiled graphs pass
    them as they are), else imported for this call (e.g. the copies that a
    functionalizing backend such as aot_eager makes)."""
    state = tuple(t for t in state if t is not None)
    owner = _owners.get(id(state[0]))
    if owner is not None and len(owner._state()) == len(state) and all(a is b for a, b in zip(owner._state(), state)):
        return owner._cache_views(stream)
    return _C.CacheViews(state, stream=stream)


# The cache's kernels as torch.library custom ops, for torch.compile: Dynamo
# traces through them (no graph break) with the cache's tensors as explicit,
# mutated arguments. Eager calls go straight to dms._C (see PagedLayerCache).
_STATE = ("k_pages", "v_pages", "slot_limit", "page_table", "row_slots", "row_seen", "window", "free_pages",
          "free_count", "k_scales", "v_scales")


@torch.library.custom_op("dms::cache_append", mutates_args=_STATE + ("token_slots",))
def _cache_append_op(k_pages: torch.Tensor, v_pages: torch.Tensor, slot_limit: torch.Tensor,
                     page_table: torch.Tensor, row_slots: torch.Tensor, row_seen: torch.Tensor,
                     window: torch.Tensor, free_pages: torch.Tensor, free_count: torch.Tensor,
                     k_scales: Optional[torch.Tensor], v_scales: Optional[torch.Tensor], window_size: int,
                     kv_format: int, k_new: torch.Tensor, v_new: torch.Tensor, decisions: torch.Tensor,
                     key_padding: Optional[torch.Tensor], token_slots: torch.Tensor) -> None:
    state = (k_pages, v_pages, slot_limit, page_table, row_slots, row_seen, window, free_pages, free_count, k_scales,
             v_scales)
    ex = exec_kwargs(k_new)
    _C.cache_append(_views_of(state, ex["stream"]), window_size, k_new, v_new, decisions, key_padding, token_slots,
                    kv_format=kv_format, **ex)


@_cache_append_op.register_fake
def _(*args):
    return None


@torch.library.custom_op("dms::attn_prefill", mutates_args=("o", "lse"))
def _attn_prefill_op(k_pages: torch.Tensor, v_pages: torch.Tensor, slot_limit: torch.Tensor,
                     page_table: torch.Tensor, row_slots: torch.Tensor, row_seen: torch.Tensor,
                     window: torch.Tensor, free_pages: torch.Tensor, free_count: torch.Tensor,
                     k_scales: Optional[torch.Tensor], v_scales: Optional[torch.Tensor], window_size: int,
                     kv_format: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                     decisions: torch.Tensor, key_padding: Optional[torch.Tensor], scale: float, o: torch.Tensor,
                     lse: torch.Tensor) -> None:
    state = (k_pages, v_pages, slot_limit, page_table, row_slots, row_seen, window, free_pages, free_count, k_scales,
             v_scales)
    ex = exec_kwargs(q)
    _C.attn_prefill(_views_of(state, ex["stream"]), window_size, q, k_new, v_new, decisions, key_padding, scale, o,
                    lse, kv_format=kv_format, **ex)


@_attn_prefill_op.register_fake
def _(*args):
    return None


@torch.library.custom_op("dms::attn_decode", mutates_args=("o", "lse", "workspace"))
def _attn_decode_op(k_pages: torch.Tensor, v_pages: torch.Tensor, slot_limit: torch.Tensor,
                    page_table: torch.Tensor, row_slots: torch.Tensor, row_seen: torch.Tensor,
                    window: torch.Tensor, free_pages: torch.Tensor, free_count: torch.Tensor,
                    k_scales: Optional[torch.Tensor], v_scales: Optional[torch.Tensor], window_size: int,
                    kv_format: int, q: torch.Tensor, scale: float, o: torch.Tensor, lse: torch.Tensor,
                    workspace: Optional[torch.Tensor]) -> None:
    state = (k_pages, v_pages, slot_limit, page_table, row_slots, row_seen, window, free_pages, free_count, k_scales,
             v_scales)
    ex = exec_kwargs(q)
    _C.attn_decode(_views_of(state, ex["stream"]), window_size, q, scale, o, lse, workspace, kv_format=kv_format, **ex)


@_attn_decode_op.register_fake
def _(*args):
    return None


@torch.library.custom_op("dms::snapshot", mutates_args=())
def _snapshot_op(x: torch.Tensor) -> torch.Tensor:
    """A copy of x made where the op stands in a compiled graph. Inductor
    inlines a plain copy into the kernels that consume it, which may run after
    an op above has changed x in place (the positions of a step read the
    counters that the step's appends advance)."""
    return x.clone()


@_snapshot_op.register_fake
def _(x):
    return torch.empty_like(x)


def _check_preallocate(value, name="preallocate_for_tokens"):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name}: expected None or an int >= 0, got {value!r}")


class CompressionTally:
    """Process-wide record of the compression DMS caches reached.

    Every `DMSCache` adds what it holds when it is reset and when it is
    garbage-collected, so runs that never see their caches (generate makes and
    drops one per call, as lm-eval's does) can still report the compression
    they reached: `dms.eval` writes `compression_tally.summary()` next to
    lm-eval's results. A cache adds nothing while it holds no tokens, so a
    reset cache is not counted twice. Adding costs one pass over each layer's
    [B*H] counters (on CUDA, a few syncs per cache); set `enabled = False` to
    skip it.
    """

    def __init__(self):
        self._lock = threading.RLock()  # re-entrant: a cache collected while add() holds it adds itself
        self.enabled = True
        self.reset()

    def reset(self):
        """Forget everything added so far."""
        with self._lock:
            self.caches = 0
            self.mean_row_ratio_sum = 0.0  # sum of each cache's DMSCache.mean_row_compression_ratio()
            self.tokens_seen = []  # per layer: sum over rows and caches
            self.tokens_stored = []

    def add(self, cache):
        """Adds `cache`'s current contents (nothing if it holds no tokens)."""
        if not self.enabled or not any(layer.is_initialized for layer in cache.layers):
            return
        stats = cache.compression_stats(local=True)  # no collective: caches are collected at any time
        if not any(stats["tokens_seen"]):
            return
        with self._lock:
            n = len(cache.layers)
            for per_layer in (self.tokens_seen, self.tokens_stored):
                per_layer.extend([0] * (n - len(per_layer)))
            for i, (seen, stored) in enumerate(zip(stats["tokens_seen"], stats["tokens_stored"])):
                self.tokens_seen[i] += seen
                self.tokens_stored[i] += stored
            self.caches += 1
            self.mean_row_ratio_sum += stats["mean_row_compression_ratio"]

    def snapshot(self) -> dict:
        """The raw sums (to merge tallies of several processes: add them up)."""
        with self._lock:
            return {"caches": self.caches, "mean_row_ratio_sum": self.mean_row_ratio_sum,
                    "tokens_seen": list(self.tokens_seen), "tokens_stored": list(self.tokens_stored)}

    @staticmethod
    def summarize(snapshot) -> dict:
        """compression_ratio: all tokens seen / all tokens stored, over every
        cache, layer and row (the KV memory saved); per_layer: the same per
        layer; mean_row_compression_ratio: the mean over caches of each
        cache's `DMSCache.mean_row_compression_ratio()` (overstates the
        memory saved when rows differ in length); plus the raw sums. Ratios
        are None when nothing was added."""
        seen, stored = snapshot["tokens_seen"], snapshot["tokens_stored"]
        caches = snapshot["caches"]
        return {
            "caches": caches,
            "compression_ratio": sum(seen) / sum(stored) if sum(stored) else None,
            "mean_row_compression_ratio": snapshot["mean_row_ratio_sum"] / caches if caches else None,
            "per_layer": [a / b if b else None for a, b in zip(seen, stored)],
            "tokens_seen": list(seen),
            "tokens_stored": list(stored),
        }

    def summary(self) -> dict:
        """`summarize(snapshot())`."""
        return self.summarize(self.snapshot())


compression_tally = CompressionTally()


class PagedLayerCache:
    """Paged DMS cache of one attention layer.

    Args:
        batch_size: B.
        num_kv_heads: H.
        head_dim: D.
        window_size: eviction delay w (SPEC: `dms_window_size`, default 512).
        page_size: P slots per page (default 256).
        dtype: dtype of the keys/values given (default bfloat16), and of the
            pages with kv_cache_dtype "auto".
        kv_cache_dtype: how pages store keys and values (default "auto": in
            `dtype`); "fp8_e4m3" (or "fp8") / "fp8_e5m2": one byte per
            element (uint8 pages of FP8 codes: view them with
            `.view(torch.float8_e4m3fn)` / `float8_e5m2`) plus a float32
            scale per stored (token, KV head) row of K and of V, in
            `k_scales` / `v_scales` [n_pages, P]: each row is scaled so its
            largest magnitude maps to the format's largest finite value,
            rounded to nearest even (csrc/dms.h: dms_kv_format). Every key
            and value attention uses, the new tokens' too, goes through that
            rounding.
        device: where the cache lives (default "cpu").
        preallocate_for_tokens: reserve pages for this many tokens per row up
            front (default None: start with one page per row and grow).
        growth: factor by which the pool grows when it runs out (default 2).
        allow_growth: if False, a call that needs more pages than the pool has
            raises `dms.PoolExhaustedError` and changes nothing.
        max_tokens: tokens per row the page table (a few bytes per page) is
            sized for up front (default None: it grows on demand). A model's
            cache passes `max_position_embeddings`, so that a compiled decode
            step never sees the table change shape.
    """

    def __init__(self, batch_size, num_kv_heads, head_dim, window_size=512, *, page_size=256,
                 dtype=torch.bfloat16, device="cpu", preallocate_for_tokens=None, growth=2.0, allow_growth=True,
                 max_tokens=None, kv_cache_dtype="auto"):
        for name, value, low in (("batch_size", batch_size, 1), ("num_kv_heads", num_kv_heads, 1),
                                 ("head_dim", head_dim, 1), ("window_size", window_size, 0),
                                 ("page_size", page_size, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if isinstance(growth, bool) or not isinstance(growth, (int, float)) or not (math.isfinite(growth)
                                                                                    and growth > 1):
            raise ValueError(f"growth: expected a finite factor > 1, got {growth!r}")
        _check_preallocate(preallocate_for_tokens)
        _check_preallocate(max_tokens, "max_tokens")
        if dtype not in _PAGE_DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(str(d) for d in _PAGE_DTYPES)} for the pages, "
                             f"got {dtype!r}")
        self.kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)
        self.kv_format = KV_CACHE_DTYPES[kv_cache_dtype]
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device: expected cpu or cuda[:N], got {device!r}") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device: expected cpu or cuda[:N] (the engine's devices), got {str(device)!r}")
        self.batch_size, self.num_kv_heads, self.head_dim = batch_size, num_kv_heads, head_dim
        self.window_size, self.page_size = window_size, page_size
        self.dtype, self.device = dtype, device
        self.growth, self.allow_growth = float(growth), allow_growth
        if device.type == "cuda":
            self._sms = _multiprocessors(device)  # for the decode workspace, read here and not in a compiled step
        rows = batch_size * num_kv_heads
        per_row = max(1, math.ceil((preallocate_for_tokens or 0) / page_size))
        self._allocate(rows * per_row, max(per_row, math.ceil((max_tokens or 0) / page_size)))

    # ---- state -----------------------------------------------------------

    @property
    def k_pages(self):
        return self._k_pages

    @k_pages.setter
    def k_pages(self, pages):
        self._k_pages = pages
        _owners[id(pages)] = self  # for the custom ops (_views_of)

    @property
    def rows(self) -> int:
        return self.batch_size * self.num_kv_heads

    @property
    def page_dtype(self):
        """dtype of k_pages / v_pages: `dtype`, or uint8 (FP8 codes)."""
        return torch.uint8 if self.kv_format else self.dtype

    def _new_pages(self, n_pages):
        """Zeroed (k_pages, v_pages, k_scales, v_scales) for n_pages pages;
        the scales are None with native pages."""
        P, D, dev = self.page_size, self.head_dim, self.device
        pages = [torch.zeros(n_pages, P, D, dtype=self.page_dtype, device=dev) for _ in range(2)]
        scales = [torch.zeros(n_pages, P, dtype=torch.float32, device=dev) if self.kv_format else None
                  for _ in range(2)]
        return (*pages, *scales)

    def _allocate(self, n_pages, max_pages):
        P, D, R, dev = self.page_size, self.head_dim, self.rows, self.device
        self.k_pages, self.v_pages, self.k_scales, self.v_scales = self._new_pages(n_pages)
        self.slot_limit = torch.full((n_pages, P), _INT32_MAX, dtype=torch.int32, device=dev)
        self.page_table = torch.full((R, max_pages), -1, dtype=torch.int32, device=dev)
        self.row_slots = torch.zeros(R, dtype=torch.int32, device=dev)
        self.row_seen = torch.zeros(R, dtype=torch.int32, device=dev)
        self.window = torch.full((R, self.window_size + 1), -1, dtype=torch.int32, device=dev)
        # Pop from the top: page 0 is handed out first.
        self.free_pages = torch.arange(n_pages - 1, -1, -1, dtype=torch.int32, device=dev)
        self.free_count = torch.tensor([n_pages], dtype=torch.int32, device=dev)
        self._set_free_known(n_pages)
        self._seen_upper_bound = 0  # tokens any row may have seen (padding included)
        self._views = None

    def _state(self):
        """The state tensors as the C ops take them: nine, and the two scale
        tensors with FP8 pages."""
        state = (self.k_pages, self.v_pages, self.slot_limit, self.page_table, self.row_slots, self.row_seen,
                 self.window, self.free_pages, self.free_count)
        return state + (self.k_scales, self.v_scales) if self.kv_format else state

    def _op_state(self):
        """The custom ops' leading arguments: eleven state tensors (the
        scales None with native pages), the window and the page format."""
        return self._state()[:9] + (self.k_scales, self.v_scales, self.window_size, self.kv_format)

    def _cache_views(self, stream):
        """The state tensors imported into C once (`_C.CacheViews`), not per
        call: nine DLPack exports cost more than a short row's decode. They
        are imported again when any state tensor was replaced (the identity
        check covers assignments from outside too) or the stream changed;
        methods that replace tensors drop them at once so the old tensors
        are freed."""
        state = self._state()
        views = self._views
        if views is None or not views.holds(state, stream):
            views = self._views = _C.CacheViews(state, stream=stream)
        return views

    def reset(self):
        """Forget every token; all pages return to the pool (kept allocated)."""
        n_pages = self.k_pages.shape[0]
        self.slot_limit.fill_(_INT32_MAX)
        self.page_table.fill_(-1)
        self.row_slots.zero_()
        self.row_seen.zero_()
        self.window.fill_(-1)
        self.free_pages.copy_(torch.arange(n_pages - 1, -1, -1, dtype=torch.int32))
        self.free_count.fill_(n_pages)
        self._set_free_known(n_pages)
        self._seen_upper_bound = 0

    def grow_pool(self, extra_pages):
        """Adds `extra_pages` (an int >= 0) free pages; page ids (and so every
        slot) stay valid."""
        if isinstance(extra_pages, bool) or not isinstance(extra_pages, int) or extra_pages < 0:
            raise ValueError(f"extra_pages: expected an int >= 0, got {extra_pages!r}")
        if extra_pages == 0:
            return
        self._views = None
        old = self.k_pages.shape[0]
        new = old + extra_pages
        P, D, dev = self.page_size, self.head_dim, self.device
        extra = self._new_pages(extra_pages)
        self.k_pages = torch.cat([self.k_pages, extra[0]])
        self.v_pages = torch.cat([self.v_pages, extra[1]])
        if self.kv_format:
            self.k_scales = torch.cat([self.k_scales, extra[2]])
            self.v_scales = torch.cat([self.v_scales, extra[3]])
        self.slot_limit = torch.cat([self.slot_limit, torch.full((extra_pages, P), _INT32_MAX, dtype=torch.int32,
                                                                  device=dev)])
        # The stack's valid part is free_pages[:free_count]; new ids go on top.
        free = torch.empty(new, dtype=torch.int32, device=dev)
        free[:old] = self.free_pages
        count = self._read_free_count()
        free[count:count + extra_pages] = torch.arange(new - 1, old - 1, -1, dtype=torch.int32, device=dev)
        self.free_pages = free
        self.free_count.fill_(count + extra_pages)
        self._set_free_known(count + extra_pages)

    def _set_free_known(self, count):
        """The free-page count is `count` now (read, or known from a reset,
        growth or reorder); appends since then are counted from here."""
        self._free_known = count
        self._tokens_since_known = 0  # call lengths since: an upper bound of each row's new tokens

    def _reserve(self, n):
        """Makes sure the pool can take a call of n tokens per row, reading
        the exact free count (on CUDA a device sync) only when the bound
        cannot tell. A row pops a page only when its stored slots cross a
        multiple of P, and it stores at most one slot per token, so after m
        more tokens per row the pool has lost at most rows * ceil(m / P)
        pages since the count was known: while a page per row is free that
        is one read per P tokens at most. On CUDA the pool grows here, to
        keep that page per row (with allow_growth; without it reads come
        every call once the pool is nearly full), and so it does on the CPU
        under torch.compile; eager on the CPU, where a read costs nothing, the
        C call's dry run asks for growth (after checking the input, so a
        refused call changes nothing)."""
        P, R = self.page_size, self.rows
        if self._free_known - R * -(-(self._tokens_since_known + n) // P) >= 0:
            self._tokens_since_known += n
            return
        self._reserve_exactly(n, ahead=self.device.type == "cuda" or torch.compiler.is_compiling())

    @torch.compiler.disable
    def _reserve_exactly(self, n, ahead):
        """`_reserve` when the bound cannot tell: reads the free count and,
        `ahead` (when no C dry run can ask for growth: CUDA, or a compiled
        step), grows the pool. Eager also inside a compiled step (a graph
        break there, once per P tokens at most while the pool has room)."""
        P, R = self.page_size, self.rows
        exact = self._read_free_count()
        need = R * math.ceil(n / P)
        if ahead and exact < need + R and (self.allow_growth or exact < need):
            self._grow_for(need + R - exact)  # raises PoolExhaustedError without growth
            exact = self._free_known
        self._set_free_known(exact)
        self._tokens_since_known = n

    def _read_free_count(self) -> int:
        """The free-page count (on CUDA a sync: done only when the headroom
        bound runs low or the pool grows). A negative count means a CUDA
        append ran out of pages and was applied in part: the cache no longer
        matches the sequence."""
        count = int(self.free_count.item())
        if count < 0:
            raise _C.DMSError("cache: a CUDA append found the page pool exhausted and was applied in part "
                              "(free_count < 0); this cache no longer matches its sequence: reset it")
        return count

    def _ensure_page_table(self, max_tokens):
        need = math.ceil(max_tokens / self.page_size)
        have = self.page_table.shape[1]
        if need > have:
            self._views = None
            cols = max(need, int(have * self.growth))
            extra = torch.full((self.rows, cols - have), -1, dtype=torch.int32, device=self.device)
            self.page_table = torch.cat([self.page_table, extra], dim=1)

    def _grow_for(self, missing):
        if not self.allow_growth:
            raise _C.PoolExhaustedError(
                f"cache: the page pool ({self.k_pages.shape[0]} pages) needs {missing} more and allow_growth is False")
        self.grow_pool(max(missing, int(self.k_pages.shape[0] * (self.growth - 1))))

    # ---- ops ---------------------------------------------------------------

    def append(self, k_new, v_new, decisions, key_padding=None, *, token_slots=None):
        """Stores n new tokens per row with delayed eviction (SPEC §4).

        Args:
            k_new, v_new: [B, H, n, D] keys (RoPE applied) and values.
            decisions: [B, H, n] bool, the eviction decision of each token
                (it flags the token before it).
            key_padding: [B, n] bool, True = padding (never stored), or None.
            token_slots: [B, H, n] int32 tensor to write the result into
                (default: a new one).

        Returns:
            token_slots: [B, H, n] int32, each token's slot (-1 for padding
            and for tokens evicted within the call).
        """
        B, H, n = k_new.shape[:3]
        if token_slots is None:
            token_slots = torch.empty(B, H, n, dtype=torch.int32, device=self.device)
        self._ensure_page_table(self._seen_upper_bound + n)  # capacity only: no token moves
        self._reserve(n)  # no host read in steady state (see _reserve)
        if torch.compiler.is_compiling():  # the custom op: traced, no graph break (the pool has room)
            torch.ops.dms.cache_append(*self._op_state(), k_new, v_new, decisions, key_padding, token_slots)
            self._seen_upper_bound += n
            return token_slots
        ex = exec_kwargs(k_new)
        if self.device.type == "cuda":
            _C.cache_append(self._cache_views(ex["stream"]), self.window_size, k_new, v_new, decisions, key_padding,
                            token_slots, kv_format=self.kv_format, **ex)
            self._seen_upper_bound += n
            return token_slots
        while True:  # CPU: the C dry run also refuses a call the pool cannot take
            try:
                _C.cache_append(self._cache_views(ex["stream"]), self.window_size, k_new, v_new, decisions,
                                key_padding, token_slots, kv_format=self.kv_format, **ex)
                self._seen_upper_bound += n
                return token_slots
            except _C.PoolExhaustedError as exc:
                # The page table was sized above for every token fed so far,
                # so only the pool can be short; it grows geometrically.
                if "cache.free_pages" not in str(exc):
                    raise
                self._grow_for(max(1, self.rows))
                self._tokens_since_known = n  # the retried call counts against the new count

    def prefill_attention(self, q, k_new, v_new, decisions, key_padding=None, scale=None):
        """Attention of n new queries per row over the cache (as it is before
        `append` of the same tokens) and the new keys (SPEC §3 hard rule, §5).

        q: [B, H*G, n, D]; k_new, v_new: [B, H, n, D]; decisions: [B, H, n]
        bool; key_padding: [B, n] bool or None. Returns (o [B, H*G, n, D] in
        q's dtype, lse [B, H*G, n] float32).
        """
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        if torch.compiler.is_compiling():
            torch.ops.dms.attn_prefill(*self._op_state(), q, k_new, v_new, decisions, key_padding, scale, o, lse)
            return o, lse
        ex = exec_kwargs(q)
        _C.attn_prefill(self._cache_views(ex["stream"]), self.window_size, q, k_new, v_new, decisions, key_padding,
                        scale, o, lse, kv_format=self.kv_format, **ex)
        return o, lse

    def decode_attention(self, q, scale=None, *, o=None, lse=None):
        """Attention of one query per row over every stored slot, after
        `append` of the query's own token. q: [B, H*G, 1, D]. Returns (o, lse):
        o [B, H*G, 1, D] in q's dtype, lse [B, H*G, 1] float32, written into
        the `o` and `lse` given (preallocated, e.g. reused every step: saves
        two allocations per call) or into new tensors. On CUDA long rows are
        split over the GPU's multiprocessors (flash-decoding) through a
        workspace kept between calls."""
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        if o is None:
            o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if lse is None:
            lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        if torch.compiler.is_compiling():
            torch.ops.dms.attn_decode(*self._op_state(), q, scale, o, lse, self._decode_workspace(q))
            return o, lse
        ex = exec_kwargs(q)
        _C.attn_decode(self._cache_views(ex["stream"]), self.window_size, q, scale, o, lse, self._decode_workspace(q),
                       kv_format=self.kv_format, **ex)
        return o, lse

    def _decode_workspace(self, q):
        """[B*H*G, S, D + 2] float32 for S key ranges per row, enough to give
        every multiprocessor two blocks; None on CPU (it splits by itself)."""
        if self.device.type != "cuda":
            return None
        rows = q.shape[0] * q.shape[1]
        splits = max(1, min(64, -(-2 * self._sms // (q.shape[0] * self.num_kv_heads))))
        shape = (rows, splits, self.head_dim + 2)
        ws = getattr(self, "_workspace", None)
        if ws is None or tuple(ws.shape) != shape:
            ws = self._workspace = torch.empty(shape, dtype=torch.float32, device=self.device)
        return ws

    def select_rows(self, batch_index):
        """Keeps batch elements `batch_index` ([B'] ints, repeats allowed), in
        that order: beam-search reordering, dropping finished sequences; or,
        as a bool mask [B], the elements it marks. Each new row gets its own
        copy of its pages (rows keep writing into their last page and reuse
        evicted slots in place, so pages cannot be shared). Costs one host
        sync to size the new pool."""
        H, P, dev = self.num_kv_heads, self.page_size, self.device
        index = torch.as_tensor(batch_index, device=dev)
        if index.dtype == torch.bool:
            if tuple(index.shape) != (self.batch_size,):
                raise ValueError(f"batch_index: a bool mask must have shape ({self.batch_size},) (one flag per "
                                 f"batch element), got {tuple(index.shape)}")
            index = index.nonzero().reshape(-1)
        elif index.dtype.is_floating_point or index.dtype.is_complex:
            raise TypeError(f"batch_index: expected integer indices or a bool mask, got {index.dtype}")
        index = index.to(torch.long).reshape(-1)
        if index.numel() == 0:
            raise ValueError("batch_index: expected at least one batch element")
        if int(index.min()) < 0 or int(index.max()) >= self.batch_size:
            raise ValueError(f"batch_index: expected values in [0, {self.batch_size}), got {index.tolist()}")
        rows = (index[:, None] * H + torch.arange(H, device=dev)).reshape(-1)
        pages_per_row = (self.row_slots[rows].long() + P - 1) // P
        max_pages = self.page_table.shape[1]
        used = torch.arange(max_pages, device=dev)[None, :] < pages_per_row[:, None]
        old_table = self.page_table[rows].long()
        old_pages = old_table[used]
        total = int(old_pages.numel())
        n_pages = max(total + rows.numel(), 1)  # headroom: a page per row
        new_table = torch.full((rows.numel(), max_pages), -1, dtype=torch.int64, device=dev)
        new_table[used] = torch.arange(total, device=dev)
        # Window slots: find each one's page in its row's old table.
        ring = self.window[rows].long()
        hit = (old_table[:, None, :] == (ring // P)[:, :, None]) & used[:, None, :]
        column = hit.int().argmax(dim=2)
        new_ring = torch.where(ring >= 0, new_table.gather(1, column) * P + ring % P, ring)

        self._views = None
        new = self._new_pages(n_pages)
        slot_limit = torch.full((n_pages, P), _INT32_MAX, dtype=torch.int32, device=dev)
        for to, old in zip(new, (self.k_pages, self.v_pages, self.k_scales, self.v_scales)):
            if to is not None:
                to[:total] = old[old_pages]
        slot_limit[:total] = self.slot_limit[old_pages]
        self.k_pages, self.v_pages, self.k_scales, self.v_scales = new
        self.slot_limit = slot_limit
        self.page_table = new_table.int()
        self.window = new_ring.int()
        self.row_slots = self.row_slots[rows].clone()
        self.row_seen = self.row_seen[rows].clone()
        self.free_pages = torch.arange(n_pages - 1, -1, -1, dtype=torch.int32, device=dev)
        self.free_count = torch.tensor([n_pages - total], dtype=torch.int32, device=dev)
        self._set_free_known(n_pages - total)
        self.batch_size = int(index.numel())

    def slot_index(self):
        """([R, S] int64 index of each row's slot s into the flattened pages
        (-1 past the row's slots), [R] slots per row), S the longest row:
        `k_pages.view(-1, D)[index.clamp(min=0)]` gathers every row's keys in
        slot order. Costs one host read (S)."""
        P, dev = self.page_size, self.device
        counts = self.row_slots.long()
        S = max(int(counts.max()), 1)
        s = torch.arange(S, device=dev)
        used = s[None, :] < counts[:, None]
        page = self.page_table.long().gather(1, (s // P).clamp(max=self.page_table.shape[1] - 1)[None, :]
                                             .expand(self.rows, S))
        return torch.where(used, page * P + s % P, -1), counts

    def retain(self, keep):
        """Keeps, in each row, the stored slots `keep` marks and frees the
        rest for good: the kept tokens move to the row's first slots (in slot
        order) and pages no longer needed go back to the pool. This is how
        score-based eviction (`dms.eval.baselines`: TOVA, H2O) frees memory
        for real on the same pages.

        keep: [R, S] bool over slot positions (R = B*H rows, S >= the longest
        row; positions past a row's slots are ignored). A slot of the window
        record (the last w + 1 tokens, whose pending flags the next append
        reads) must be kept. Returns [R, S] int64: each old slot's new slot
        (-1 = freed). One host read (the free count)."""
        P, dev, R = self.page_size, self.device, self.rows
        index, counts = self.slot_index()
        S = index.shape[1]
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 2 or \
                keep.shape[0] != R or keep.shape[1] < S:
            got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise ValueError(f"keep: expected a bool tensor [rows={R}, >= {S} slots], got {got}")
        keep = keep[:, :S].to(dev) & (index >= 0)
        new_slot = torch.where(keep, keep.long().cumsum(1) - 1, -1)
        ring = self.window.long()
        held = ring >= 0
        # Each ring entry is a flat page slot: its slot position in the row.
        position_of = torch.full((self.k_pages.shape[0] * P,), -1, dtype=torch.long, device=dev)
        used = index >= 0
        position_of[index[used]] = torch.arange(S, device=dev)[None, :].expand(R, S)[used]
        position = torch.where(held, position_of[ring.clamp(min=0)], 0)
        if bool((held & ((position < 0) | ~keep.gather(1, position.clamp(min=0)))).any()):
            raise ValueError("keep: a slot of the window record (the last w + 1 tokens) must be kept")
        new_counts = keep.sum(1)
        # Move the kept slots down (gather, then scatter: a copy, so no overlap).
        src = index[keep]
        rows_of = torch.arange(R, device=dev)[:, None].expand(R, S)[keep]
        dst_slot = new_slot[keep]
        dst = self.page_table.long()[rows_of, dst_slot // P] * P + dst_slot % P
        D = self.head_dim
        for pages in (self.k_pages, self.v_pages):
            flat = pages.view(-1, D)
            flat[dst] = flat[src].clone()
        for scales in (self.k_scales, self.v_scales) if self.kv_format else ():
            flat = scales.view(-1)
            flat[dst] = flat[src].clone()
        limits = self.slot_limit.view(-1)
        limits[dst] = limits[src].clone()
        ring_slot = new_slot.gather(1, position)
        new_ring = torch.where(held, self.page_table.long().gather(1, ring_slot.clamp(min=0) // P) * P + ring_slot % P,
                               -1)
        self.window.copy_(new_ring.to(torch.int32))
        # Pages past each row's new last page go back to the free stack.
        cols = torch.arange(self.page_table.shape[1], device=dev)
        freed = (cols[None, :] >= (new_counts[:, None] + P - 1) // P) & (cols[None, :] < (counts[:, None] + P - 1) // P)
        freed_pages = self.page_table[freed]
        self.slot_limit[freed_pages.long()] = _INT32_MAX
        self.page_table[freed] = -1
        count = self._read_free_count()
        self.free_pages[count:count + freed_pages.numel()] = freed_pages
        self.free_count.fill_(count + freed_pages.numel())
        self._set_free_known(count + freed_pages.numel())
        self.row_slots.copy_(new_counts.to(torch.int32))
        return new_slot

    # ---- accounting --------------------------------------------------------

    def tokens_seen(self):
        """[B, H] int: tokens each row has seen (padding excluded)."""
        return self.row_seen.view(self.batch_size, self.num_kv_heads)

    def tokens_stored(self):
        """[B, H] int: tokens each row stores now."""
        return self.row_slots.view(self.batch_size, self.num_kv_heads)

    def compression_ratio(self) -> float:
        """Tokens seen / tokens stored, summed over the rows: the KV memory
        saved (1.0 while nothing is stored)."""
        return _compression_stats([self])[0][0]

    def mean_row_compression_ratio(self) -> float:
        """Each row's tokens seen / stored, averaged over the rows that hold
        tokens (1.0 if none). Short rows weigh as much as long ones, so this
        overstates the memory saved when rows differ; `compression_ratio` is
        the memory figure."""
        return _compression_stats([self])[0][1]

    def _bytes_per_slot(self):
        """Bytes one slot takes in K and V: 2 D elements, and two float32
        scales with FP8 pages."""
        return 2 * (self.head_dim * self.k_pages.element_size() + (4 if self.kv_format else 0))

    def bytes_in_use(self) -> int:
        """Bytes of keys and values (and FP8 scales) in the pages that hold
        tokens."""
        pages = int(((self.row_slots.long() + self.page_size - 1) // self.page_size).sum())
        return pages * self.page_size * self._bytes_per_slot()

    def bytes_reserved(self) -> int:
        """Bytes of the whole pool (K and V, FP8 scales), free pages
        included."""
        return self.k_pages.shape[0] * self.page_size * self._bytes_per_slot()


def _compression_stats(caches) -> list:
    """(compression_ratio, mean_row_compression_ratio, tokens seen, tokens
    stored, rows holding tokens) of each `PagedLayerCache` in `caches`, computed together: the
    model reports them after every forward, so a decode step pays a few
    tensor ops and one host read (one sync on CUDA) per device, not a dozen
    ops and a sync per layer."""
    stats = [(1.0, 1.0, 0, 0, 0)] * len(caches)
    groups = {}  # layers may sit on different devices (device_map="auto")
    for i, c in enumerate(caches):
        groups.setdefault((c.row_seen.device, c.row_seen.shape[0]), []).append(i)
    for index in groups.values():
        seen = torch.stack([caches[i].row_seen for i in index]).double()
        stored = torch.stack([caches[i].row_slots for i in index]).double()
        live = stored > 0
        count = live.sum(1, dtype=torch.float64)
        mean_row = torch.where(live, seen / stored.clamp_min(1), 0).sum(1) / count.clamp_min(1)
        table = torch.stack([seen.sum(1), stored.sum(1), mean_row, count]).tolist()
        for i, total_seen, total_stored, row_mean, n in zip(index, *table):
            if n:
                stats[i] = (total_seen / total_stored, row_mean, int(total_seen), int(total_stored), int(n))
    return stats


class DMSCacheLayer(CacheLayerMixin):
    """One layer of `DMSCache`: a `PagedLayerCache` created on first use from
    the shapes it is fed. The model's attention calls `attend`; the generic
    `update` of Hugging Face caches cannot be served (rows hold different
    numbers of tokens, so there is no dense [B, H, T, D] to return).

    Args (all optional, see `PagedLayerCache`): window_size (512), page_size
    (256), preallocate_for_tokens (None), allow_growth (True), max_tokens (None),
    kv_cache_dtype ("auto").
    """

    is_compileable = False
    is_sliding = False

    def __init__(self, window_size=512, page_size=256, preallocate_for_tokens=None, allow_growth=True,
                 max_tokens=None, kv_cache_dtype="auto"):
        _check_preallocate(preallocate_for_tokens)
        _check_preallocate(max_tokens, "max_tokens")
        super().__init__()
        self.kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)
        self.max_tokens = max_tokens
        self.window_size, self.page_size = window_size, page_size
        self.preallocate_for_tokens, self.allow_growth = preallocate_for_tokens, allow_growth
        self.paged = None
        self.tokens_fed = 0  # positions fed, padding included: what HF masks and positions count
        self._scratch = None  # (token_slots, lse) of decode steps, see _step_scratch

    def lazy_initialization(self, key_states, value_states=None):
        B, H, _, D = key_states.shape
        self.paged = PagedLayerCache(B, H, D, self.window_size, page_size=self.page_size, dtype=key_states.dtype,
                                     device=key_states.device, preallocate_for_tokens=self.preallocate_for_tokens,
                                     allow_growth=self.allow_growth, max_tokens=self.max_tokens,
                                     kv_cache_dtype=self.kv_cache_dtype)
        self._scratch = None
        self.is_initialized = True

    def attend(self, q, k, v, decisions, key_padding=None, scale=None):
        """Attention of the new tokens over this layer's cache, then their
        storage (SPEC §5): one token per row takes the decode path (append,
        then attention over the stored slots), more take the prefill path
        (attention over cache + new keys, then append).

        q: [B, H*G, n, D]; k, v: [B, H, n, D] (RoPE applied); decisions:
        [B, H, n] bool; key_padding: [B, n] bool (True = padding) or None.
        Returns o [B, H*G, n, D]."""
        if not self.is_initialized or (self.tokens_fed == 0 and not self._fits(k)):
            self.lazy_initialization(k, v)  # new, or emptied by reset() and fed another shape
        elif (k.dtype, k.device) != (self.paged.dtype, self.paged.device):
            raise ValueError(f"cache: holds {str(self.paged.dtype).removeprefix('torch.')} keys on "
                             f"{self.paged.device}, the model now computes in {str(k.dtype).removeprefix('torch.')} "
                             f"on {k.device} (it was converted or moved after the cache was filled); reset the "
                             "cache or make a new one with model.get_cache()")
        n = k.shape[2]
        if n == 1:
            # token_slots and lse are not used: buffers kept between steps
            # spare two allocations per layer and token.
            slots, lse = self._step_scratch(q)
            self.paged.append(k, v, decisions, key_padding, token_slots=slots)
            o, _ = self.paged.decode_attention(q, scale, lse=lse)
            if key_padding is not None:  # a padding position is not a token: its output is 0
                o = o.masked_fill(key_padding.view(-1, 1, 1, 1), 0)
        else:
            o, _ = self.paged.prefill_attention(q, k, v, decisions, key_padding, scale)
            self.paged.append(k, v, decisions, key_padding)
        self.tokens_fed += n
        return o

    def _fits(self, k):
        """Whether the pages can take k [B, H, n, D] as they are."""
        p = self.paged
        B, H, _, D = k.shape
        return (p.batch_size, p.num_kv_heads, p.head_dim, p.dtype, p.device) == (B, H, D, k.dtype, k.device)

    def _step_scratch(self, q):
        """token_slots [B, H, 1] int32 and lse [B, H*G, 1] float32 for a
        decode step, reallocated only when the shapes change (beam search
        reorders keep them)."""
        B, HG = q.shape[:2]
        scratch = self._scratch
        if scratch is None or scratch[1].shape[:2] != (B, HG):
            scratch = self._scratch = (torch.empty(B, self.paged.num_kv_heads, 1, dtype=torch.int32, device=q.device),
                                       torch.empty(B, HG, 1, dtype=torch.float32, device=q.device))
        return scratch

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(
            "DMSCacheLayer.update: a DMS cache keeps a different number of tokens per (batch, head) row, so it has no "
            "dense key/value tensor to return; DMS attention calls DMSCacheLayer.attend (Qwen3ForCausalLMDMS does)")

    def get_seq_length(self) -> int:
        return self.tokens_fed

    def get_mask_sizes(self, query_length, *args, **kwargs):
        if not isinstance(query_length, int):  # older transformers pass cache_position
            query_length = int(query_length.shape[-1])
        return self.tokens_fed + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self):
        if self.is_initialized:
            self.paged.reset()
        self.tokens_fed = 0

    def reorder_cache(self, beam_idx):
        if self.is_initialized:
            self.paged.select_rows(beam_idx)

    def batch_select_indices(self, indices):
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats):
        if self.is_initialized:
            index = torch.arange(self.paged.batch_size, device=self.paged.device).repeat_interleave(repeats)
            self.paged.select_rows(index)

    def crop(self, max_length):
        raise NotImplementedError(
            "DMSCacheLayer.crop: evicted tokens cannot be restored, so a DMS cache cannot be rolled back "
            "(assisted decoding needs that); generate without an assistant model")

    def compression_ratio(self) -> float:
        """Tokens seen / stored over this layer's rows (see `PagedLayerCache`)."""
        return self.paged.compression_ratio() if self.is_initialized else 1.0


class DMSCache(Cache):
    """Hugging Face cache of a DMS model: one `DMSCacheLayer` per decoder layer.

    Args:
        num_layers: decoder layers (`config.num_hidden_layers`).
        window_size: eviction delay w (`config.dms_window_size`, default 512).
        page_size: slots per page (`config.dms_paged_attention_block_size`, default 256).
        preallocate_for_tokens: reserve pages for this many tokens per row (default None).
        allow_growth: grow the page pools on demand (default True).
        max_tokens: tokens per row the page tables are sized for up front
            (default None: they grow; `from_config` passes the model's
            max_position_embeddings).
        process_group: under tensor parallelism, the process group whose
            ranks each hold a share of the KV heads (each rank's cache holds
            its own); compression figures and byte counts are then summed
            over the group, a collective call on every rank (default None:
            this process's cache alone; a tensor-parallel model's
            `get_cache()` passes its group).
        kv_cache_dtype: how the pages store keys and values (default
            "auto": the model's dtype; "fp8_e4m3" / "fp8" / "fp8_e5m2", see
            `PagedLayerCache`; `from_config` passes `dms_kv_cache_dtype`).
    """

    def __init__(self, num_layers, window_size=512, page_size=256, preallocate_for_tokens=None, allow_growth=True,
                 max_tokens=None, process_group=None, kv_cache_dtype="auto"):
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers: expected an int >= 1, got {num_layers!r}")
        layers = [DMSCacheLayer(window_size, page_size, preallocate_for_tokens, allow_growth, max_tokens,
                                kv_cache_dtype) for _ in range(num_layers)]
        super().__init__(layers=layers)
        self.process_group = process_group

    @classmethod
    def from_config(cls, config, preallocate_for_tokens=None, process_group=None, kv_cache_dtype=None):
        """The cache `config` (a DMS model config) asks for; `kv_cache_dtype`
        (default None: the config's `dms_kv_cache_dtype`) overrides its page
        format."""
        return cls(config.num_hidden_layers, window_size=getattr(config, "dms_window_size", 512),
                   page_size=getattr(config, "dms_paged_attention_block_size", 256),
                   preallocate_for_tokens=preallocate_for_tokens
                   if preallocate_for_tokens is not None else getattr(config, "dms_preallocate_for_tokens", None),
                   max_tokens=getattr(config, "max_position_embeddings", None), process_group=process_group,
                   kv_cache_dtype=kv_cache_dtype if kv_cache_dtype is not None
                   else getattr(config, "dms_kv_cache_dtype", "auto"))

    def _sum_over_group(self, values):
        """`values` (a list of numbers) summed over `process_group` (as they are without one)."""
        if self.process_group is None:
            return values
        used = [layer.paged.row_seen.device for layer in self.layers if layer.is_initialized]
        total = torch.tensor(values, dtype=torch.float64, device=used[0] if used else None)  # NCCL: on the GPU
        torch.distributed.all_reduce(total, group=self.process_group)
        return total.tolist()

    def reset(self):
        """Empties every layer (pages stay allocated); what it held is first
        added to `compression_tally`."""
        compression_tally.add(self)
        super().reset()

    def __del__(self):
        # A cache that generate made and dropped still counts in the tally.
        try:
            compression_tally.add(self)
        except Exception:  # interpreter shutdown or a half-built cache: nothing to record
            pass

    def compression_stats(self, local=False) -> dict:
        """Every compression figure of the cache from one host read:
        compression_ratio (all tokens seen / all tokens stored, over every
        row and layer: the KV memory saved), compression_ratios (the same per
        layer), mean_row_compression_ratio (each row's seen / stored averaged
        over rows and layers), tokens_seen / tokens_stored (per layer). A
        layer not used yet counts as 1.0 and 0 tokens. With a
        `process_group`, over every rank's heads (a collective call) unless
        `local` (default False)."""
        used = [layer.paged for layer in self.layers if layer.is_initialized]
        per_used = iter(_compression_stats(used))
        per_layer = [next(per_used) if layer.is_initialized else (1.0, 1.0, 0, 0, 0) for layer in self.layers]
        if self.process_group is not None and not local:
            flat = self._sum_over_group([x for row in per_layer for x in (row[2], row[3], row[1] * row[4], row[4])])
            per_layer = [(seen / stored if stored else 1.0, ratios / rows if rows else 1.0, int(seen), int(stored))
                         for seen, stored, ratios, rows in zip(*[iter(flat)] * 4)]
        seen = [row[2] for row in per_layer]
        stored = [row[3] for row in per_layer]
        live = [row[1] for row in per_layer if row[3]]
        return {"compression_ratio": sum(seen) / sum(stored) if sum(stored) else 1.0,
                "compression_ratios": [row[0] for row in per_layer],
                "mean_row_compression_ratio": sum(live) / len(live) if live else 1.0,
                "tokens_seen": seen, "tokens_stored": stored}

    def compression_ratios(self) -> list:
        """Tokens seen / tokens stored per layer, over its rows (1.0 for a
        layer not used yet)."""
        return self.compression_stats()["compression_ratios"]

    def compression_ratio(self) -> float:
        """All tokens seen / all tokens stored, over every row and layer: the
        KV memory saved (1.0 while empty)."""
        return self.compression_stats()["compression_ratio"]

    def mean_row_compression_ratio(self) -> float:
        """Each (layer, row)'s tokens seen / stored, averaged: rows that hold
        few tokens weigh as much as long ones, so it overstates the memory
        saved when rows differ; `compression_ratio` is the memory figure."""
        return self.compression_stats()["mean_row_compression_ratio"]

    def sequence_lengths(self):
        """[B] int32 tensor: the real tokens (padding excluded) each sequence
        has fed, on the cache's device; None while the cache is empty. New
        tokens take the positions after them."""
        layer = self.layers[0]
        if not layer.is_initialized or layer.tokens_fed == 0:
            return None
        lengths = layer.paged.tokens_seen()[:, 0]
        # Compiled, a copy taken here, before this step's appends advance the counts (see _snapshot_op).
        return torch.ops.dms.snapshot(lengths) if torch.compiler.is_compiling() else lengths

    def bytes_in_use(self) -> int:
        """Bytes of keys and values in pages that hold tokens, every layer (and with a `process_group`, every rank)."""
        return int(self._sum_over_group([sum(layer.paged.bytes_in_use() for layer in self.layers
                                             if layer.is_initialized)])[0])

    def bytes_reserved(self) -> int:
        """Bytes of every layer's page pool (and with a `process_group`, every rank's)."""
        return int(self._sum_over_group([sum(layer.paged.bytes_reserved() for layer in self.layers
                                             if layer.is_initialized)])[0])
