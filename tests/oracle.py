"""Float64 PyTorch reference for DMS (SPEC.md §1-§3, and the hard visibility rule used by §5).

Every C/CUDA kernel and cache path of the project is tested against these functions. They are
written to be obviously correct, not fast: dense T x T masks, no fusion, no in-place tricks.
Every function converts its tensor inputs to float64 and returns float64 (masks are bool).

Names: B batch, H key/value heads, G query heads per KV head (query head j belongs to KV head
j // G), T tokens, D head dim, w window (eviction delay).

Conventions:
- ``key_padding``: bool [B, T], **True marks a padding token**. A padding token is never visible
  as a key, and its output as a query is exactly 0.
- ``attention_train`` returns ``lse = -inf`` for padding queries (they have no visible key).
- Decisions ``alpha`` are 0/1 per token; the eviction flag of key i is ``e[i] = alpha[i+1]``.
"""

import math

import torch
import torch.nn.functional as F

__all__ = [
    "decision_logits_separate",
    "decision_logits_borrowed",
    "zero_borrowed",
    "per_layer",
    "gate",
    "gumbel_difference_noise",
    "eviction_flags",
    "visibility_mask",
    "soft_scores",
    "attention_train",
    "attention_hard",
    "attention_with_decisions",
]


# --------------------------------------------------------------------------------------------
# §1 Decision logits
# --------------------------------------------------------------------------------------------

def decision_logits_separate(x, norm_weight, proj_weight, proj_bias=None, *,
                             scale=100.0, offset=5.0, eps=1e-6):
    """Separate-adapter decision logits.

    x: [B, T, hidden], the decoder layer's input *before* its input RMSNorm.
    norm_weight: [hidden] (dms_proj_alpha_norm.weight); proj_weight: [H, hidden]
    (dms_proj_alpha.weight); proj_bias: [H] or None.
    RMSNorm (Qwen3 semantics): x / sqrt(mean(x^2, -1) + eps) * norm_weight.
    Returns z = scale * (proj_weight @ RMSNorm(x) + proj_bias) - offset as [B, H, T].
    """
    x = x.double()
    norm_weight = norm_weight.double()
    proj_weight = proj_weight.double()
    variance = x.pow(2).mean(dim=-1, keepdim=True)
    x_norm = x / torch.sqrt(variance + eps) * norm_weight
    raw = x_norm @ proj_weight.T  # [B, T, H]
    if proj_bias is not None:
        raw = raw + proj_bias.double()
    z = scale * raw - offset
    return z.transpose(1, 2).contiguous()  # [B, H, T]


def decision_logits_borrowed(q, num_kv_heads, *, scale=100.0, offset=5.0):
    """Borrowed-neuron (DMC) decision logits.

    q: [B, H*G, T, D], queries after q-norm and before RoPE; num_kv_heads = H.
    z[b, h, t] = scale * q[b, h*G, t, D-1] - offset, as [B, H, T].
    q_zeroed: zero_borrowed(q) (the borrowed component is not part of the attention query).
    Returns (z, q_zeroed). RoPE moves component D/2-1 into D-1, so the rotated query must be
    passed through zero_borrowed again (SPEC §1: "both before and after RoPE").
    """
    q = q.double()
    n_q_heads, head_dim = q.shape[1], q.shape[3]
    if n_q_heads % num_kv_heads != 0:
        raise ValueError(f"query heads {n_q_heads} not a multiple of num_kv_heads {num_kv_heads}")
    group = n_q_heads // num_kv_heads
    first_heads = torch.arange(num_kv_heads) * group
    z = scale * q[:, first_heads, :, head_dim - 1] - offset  # [B, H, T]
    return z, zero_borrowed(q, num_kv_heads)


def zero_borrowed(q, num_kv_heads):
    """Copy of q [B, H*G, T, D] with q[:, h*G, :, D-1] = 0 for every KV head h."""
    q = q.double().clone()
    group = q.shape[1] // num_kv_heads
    q[:, torch.arange(num_kv_heads) * group, :, q.shape[3] - 1] = 0.0
    return q


def per_layer(values):
    """dms_alpha_per = "layer": head 0's values for all heads. values: [B, H, T] -> [B, H, T].

    At inference it applies to z (equivalently to the decisions z > 0); in training to the
    noised logits y after the gate (noise is drawn per head first, then head 0 is taken)."""
    values = values.double()
    return values[:, :1, :].expand_as(values).clone()


# --------------------------------------------------------------------------------------------
# §2 Gating
# --------------------------------------------------------------------------------------------

def gate(z, noise=None, tau=0.1):
    """Gumbel-sigmoid gate with a straight-through hard decision.

    z, noise: [B, H, T] (noise None means 0, i.e. the inference gate).
    Returns (y, p, a, a_ste), all [B, H, T]:
      y = (z + noise) / tau            noised logit
      p = sigmoid(y)                   soft gate
      a = 1[y > 0]                     hard decision (= 1[p > 0.5] except where sigmoid rounds
                                       a tiny positive y to exactly 0.5)
      a_ste = a + (p - p.detach())     forward value exactly a, gradient of p
    """
    z = z.double()
    if noise is None:
        noise = torch.zeros_like(z)
    y = (z + noise.double()) / tau
    p = torch.sigmoid(y)
    a = (y > 0).double()
    a_ste = a + (p - p.detach())  # bracketed so the forward value is exactly a
    return y, p, a, a_ste


def gumbel_difference_noise(shape, generator=None):
    """Logistic noise n = g1 - g2, g1 and g2 standard Gumbel (-log(-log(U)), U ~ uniform(0, 1)).

    Returns a float64 tensor of the given shape.
    """
    tiny = torch.finfo(torch.float64).tiny

    def gumbel():
        u = torch.rand(shape, generator=generator, dtype=torch.float64).clamp_min(tiny)
        return -torch.log(-torch.log(u))

    g1 = gumbel()
    g2 = gumbel()
    return g1 - g2


# --------------------------------------------------------------------------------------------
# §3 Delayed eviction
# --------------------------------------------------------------------------------------------

def eviction_flags(alpha):
    """alpha: [B, H, T] 0/1 decisions -> e: [B, H, T] with e[i] = alpha[i+1], e[T-1] = 0."""
    alpha = alpha.double()
    e = torch.zeros_like(alpha)
    e[..., :-1] = alpha[..., 1:]
    return e


def _positions(T, device=None):
    """(j, i) index grids, [T, 1] and [1, T]: j is the query position, i the key position."""
    pos = torch.arange(T, device=device)
    return pos[:, None], pos[None, :]


def visibility_mask(evict_flags, window, key_padding=None):
    """Hard DMS visibility.

    evict_flags: [B, H, T] (e, 0/1); window: w >= 0; key_padding: [B, T] bool, True = padding.
    Returns bool [B, H, T, T] indexed (query j, key i): visible iff
        i <= j  and  (e[i] == 0  or  j - i <= w)  and  key i is not padding.
    """
    if window < 0:
        raise ValueError("window must be >= 0")
    e = evict_flags.double()
    B, H, T = e.shape
    j, i = _positions(T, e.device)
    causal = i <= j  # [T, T]
    in_window = (j - i) <= window  # [T, T]
    kept = (e == 0)[:, :, None, :]  # [B, H, 1, T], indexed by key i
    mask = causal & (kept | in_window)
    if key_padding is not None:
        mask = mask & ~key_padding.bool()[:, None, None, :]
    return mask


def _group_size(q, k):
    n_q_heads, n_kv_heads = q.shape[1], k.shape[1]
    if n_q_heads % n_kv_heads != 0:
        raise ValueError(f"query heads {n_q_heads} not a multiple of KV heads {n_kv_heads}")
    return n_q_heads // n_kv_heads


def _raw_scores(q, k, scale):
    """scale * q . k with k expanded to query heads: [B, H*G, T, T] (query j, key i)."""
    G = _group_size(q, k)
    k_exp = k.repeat_interleave(G, dim=1)
    return scale * torch.einsum("bqjd,bqid->bqji", q, k_exp)


def soft_scores(q, k, y, window, scale):
    """Training-time (soft) DMS attention scores, before padding masks.

    q: [B, H*G, T, D]; k: [B, H, T, D]; y: [B, H, T] noised gate logits; window: w >= 0.
    Returns s: [B, H*G, T, T] (query j, key i):
        scale*q.k                              if i <= j and j - i <= w
        scale*q.k + logsigmoid(-y[qh//G, i+1]) if j - i > w   (then i+1 <= j < T)
        -inf                                   if i > j
    """
    if window < 0:
        raise ValueError("window must be >= 0")
    q, k, y = q.double(), k.double(), y.double()
    G = _group_size(q, k)
    T = q.shape[2]
    s = _raw_scores(q, k, scale)
    # log(1 - p[i+1]) for key i; the last key has no successor and is never outside the window.
    log_keep = F.logsigmoid(-y[..., 1:])  # [B, H, T-1]
    log_keep = torch.cat([log_keep, torch.zeros_like(y[..., :1])], dim=-1)  # [B, H, T]
    log_keep = log_keep.repeat_interleave(G, dim=1)[:, :, None, :]  # [B, H*G, 1, T]
    j, i = _positions(T, q.device)
    s = torch.where((j - i) > window, s + log_keep, s)
    s = torch.where(i <= j, s, torch.full_like(s, -math.inf))
    return s


def _masked_softmax_attention(scores, v, key_padding, G):
    """Softmax over keys of scores [B, H*G, T, T] (masked entries already -inf), times v.

    Padding queries (key_padding[b, j] True) get o = 0 and lse = -inf. Their rows are replaced by
    finite zeros before the softmax so that no NaN appears in the forward or backward pass.
    Returns (o [B, H*G, T, D], lse [B, H*G, T]).
    """
    v_exp = v.repeat_interleave(G, dim=1)
    if key_padding is not None:
        pad = key_padding.bool()
        scores = torch.where(pad[:, None, None, :], torch.full_like(scores, -math.inf), scores)
        pad_query = pad[:, None, :, None]  # [B, 1, T, 1]
        scores = torch.where(pad_query, torch.zeros_like(scores), scores)
    lse = torch.logsumexp(scores, dim=-1)  # [B, H*G, T]
    probs = torch.softmax(scores, dim=-1)
    o = probs @ v_exp
    if key_padding is not None:
        o = torch.where(pad_query, torch.zeros_like(o), o)
        lse = torch.where(pad_query[..., 0], torch.full_like(lse, -math.inf), lse)
    return o, lse


def attention_train(q, k, v, y, window, scale=None, key_padding=None):
    """Training-time DMS attention (soft eviction penalty), differentiable in q, k, v, y.

    q: [B, H*G, T, D]; k, v: [B, H, T, D]; y: [B, H, T] noised gate logits; window: w;
    scale None -> 1/sqrt(D); key_padding: [B, T] bool, True = padding.
    Returns (o [B, H*G, T, D], lse [B, H*G, T]): softmax over keys of soft_scores with padding
    keys masked out, and the log-sum-exp of those masked scores per query row.
    Padding queries: o = 0, lse = -inf, and no gradient flows through them.
    """
    q, k, v, y = q.double(), k.double(), v.double(), y.double()
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    s = soft_scores(q, k, y, window, scale)
    return _masked_softmax_attention(s, v, key_padding, _group_size(q, k))


def attention_hard(q, k, v, evict_flags, window, scale=None, key_padding=None):
    """Inference-time DMS attention: softmax of scale*q.k over the keys visibility_mask allows.

    q: [B, H*G, T, D]; k, v: [B, H, T, D]; evict_flags: [B, H, T]; window: w;
    scale None -> 1/sqrt(D); key_padding: [B, T] bool, True = padding.
    Query head j uses KV head j // G. Padding queries give 0. Returns o: [B, H*G, T, D].
    """
    q, k, v = q.double(), k.double(), v.double()
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    G = _group_size(q, k)
    mask = visibility_mask(evict_flags, window, key_padding).repeat_interleave(G, dim=1)
    s = _raw_scores(q, k, scale)
    s = torch.where(mask, s, torch.full_like(s, -math.inf))
    o, _ = _masked_softmax_attention(s, v, key_padding, G)
    return o


def attention_with_decisions(q, k, v, alpha, window, scale=None, key_padding=None):
    """attention_hard with evict_flags = eviction_flags(alpha); alpha: [B, H, T] 0/1."""
    return attention_hard(q, k, v, eviction_flags(alpha), window, scale, key_padding)


FP8_FORMATS = {"fp8_e4m3": (torch.float8_e4m3fn, 448.0), "fp8": (torch.float8_e4m3fn, 448.0),
               "fp8_e5m2": (torch.float8_e5m2, 57344.0)}


def fp8_codes(x, kv_cache_dtype):
    """(codes [..., D] uint8, scales [...] float32) of rows x as FP8 cache
    pages store them (csrc/dms.h, dms_kv_format): per row, s = amax(|x|) /
    fmax in float32 (fmax: 448 for E4M3, 57344 for E5M2), codes = x / s in
    float32 rounded to nearest even by torch's float8 cast after clamping to
    +-fmax (saturation), 0 where s = 0."""
    fp8, fmax = FP8_FORMATS[kv_cache_dtype]
    x32 = x.float()
    s = x32.abs().amax(-1, keepdim=True) / fmax
    scaled = torch.where(s == 0, torch.zeros_like(x32), x32 / s)
    return scaled.clamp(-fmax, fmax).to(fp8).view(torch.uint8), s[..., 0]


def fp8_round(x, kv_cache_dtype):
    """What FP8 cache pages store of x [..., D], in float64: code * s (see
    fp8_codes)."""
    codes, s = fp8_codes(x, kv_cache_dtype)
    return codes.view(FP8_FORMATS[kv_cache_dtype][0]).double() * s.double()[..., None]
