"""The one DMS attention, decoder layer, model body and causal LM that every
family uses (SPEC §1–§5); `dms.models.<family>` configures them.

DMS changes two things in a rotary decoder: attention (decision logits,
delayed eviction, the paged cache) and, for the separate decision source, one
adapter per layer. Everything else stays the family's transformers code. So
each class here is a mixin placed in front of the family's own class, e.g.

    class LlamaAttentionDMS(DMSAttention, LlamaAttention):
        apply_rotary = staticmethod(apply_rotary_pos_emb)   # the family's RoPE
        norm_class = LlamaRMSNorm                           # for the adapter

The family's class builds the projections (with its biases), the q/k norms
where it has them, the MLP or MoE block, the norms and the rotary embedding
(with its scaling: Llama 3's "llama3" RoPE, YaRN, ...); the mixin adds the
adapter and replaces `forward`. What differs between families is read from
the modules the family built: `q_norm`/`k_norm` present or not, the bias of
each projection, `head_dim`, `scaling`.

In training mode attention is the fused soft-gate kernel (`dms.ops.attn_train`)
over the whole batch; in eval mode every forward goes through a `DMSCache`
(prefill, chunked prefill, decode and new turns alike), created on the fly
when none is given.

Shapes: B batch, T tokens, H KV heads, G query heads per KV head, D head dim.
"""

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:  # wrappers that leave weights loaded from a checkpoint alone (transformers >= 5)
    from transformers import initialization as _init
except ImportError:  # pragma: no cover - older transformers
    _init = nn.init

from dms import ops
from dms.cache import DMSCache, DMSCacheLayer

__all__ = [
    "CausalLMOutputDMS",
    "DMSAttention",
    "DMSDecoderLayer",
    "DMSForCausalLM",
    "DMSModel",
    "DMSPreTrainedMixin",
    "cache_kwargs",
    "register_family",
    "with_dms_body",
]


def _output(cls, cache, **fields):
    """An output dataclass with the cache under the name this transformers
    version uses (`cache` from 5.2x, `past_key_values` before)."""
    name = "cache" if "cache" in cls.__dataclass_fields__ else "past_key_values"
    return cls(**fields, **{name: cache})


def cache_kwargs(cache):
    """{name: cache} for forward/generate under the name this transformers
    version uses (`cache`, or `past_key_values` before the 5.2x rename)."""
    name = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    return {name: cache}


def _cache_of(output):
    return getattr(output, "cache", None) if "cache" in type(output).__dataclass_fields__ else output.past_key_values


@dataclass
class CausalLMOutputDMS(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus what DMS reports.

    evicted_fraction: [B] mean hard decision over layers, heads and non-padding tokens.
    compression_loss: SPEC §6 loss for the `dms_target` given (training).
    compression_ratio (read on access): all tokens seen / all tokens stored
        by the cache, over every layer and row: the KV memory saved (eval with
        a cache; None without one).
    compression_ratios (read on access): the same per layer.

    The two ratios are read from the cache when first asked for (one host
    read; a device sync on CUDA), not by every forward: a decode step needs
    none. Read them before the cache takes more tokens.
    """

    evicted_fraction: torch.Tensor | None = None
    compression_loss: torch.Tensor | None = None

    def _dms_stats(self):
        stats = self.__dict__.get("_dms_stats_cached")
        if stats is None:
            cache = _cache_of(self)
            stats = cache.compression_stats() if isinstance(cache, DMSCache) else {}
            self.__dict__["_dms_stats_cached"] = stats
        return stats

    @property
    def compression_ratio(self):
        return self._dms_stats().get("compression_ratio")

    @property
    def compression_ratios(self):
        return self._dms_stats().get("compression_ratios")


_warned_no_grad = [False]


def _init_dms_weights(module):
    """A fresh adapter keeps everything: W = 0 (b = 0) gives every logit -offset."""
    if getattr(module, "_dms_adapter", False):
        _init.zeros_(module.weight)
        if module.bias is not None:
            _init.zeros_(module.bias)


class DMSPreTrainedMixin:
    """What every DMS model class adds to its transformers base: fresh
    adapters that keep everything (the family sets `config_class`)."""

    # A plain checkpoint has no adapters: they start fresh (keep
    # everything), which is no reason for a "missing weights" report.
    _keys_to_ignore_on_load_missing = [r"\.dms_proj_alpha(_norm)?\.(weight|bias)$"]

    def _init_weights(self, module):
        super()._init_weights(module)
        _init_dms_weights(module)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' from_pretrained; when it split the model by
        tp_plan, every DMS attention learns its share of the KV heads here,
        and a split that does not divide them is refused."""
        model = super().from_pretrained(*args, **kwargs)
        loaded = model[0] if isinstance(model, tuple) else model  # output_loading_info=True: (model, info)
        if (getattr(loaded, "_tp_size", None) or 1) > 1:
            for module in loaded.modules():
                if isinstance(module, DMSAttention):
                    module._set_tensor_parallel(module.k_proj.weight.device_mesh)
        return model


class DMSAttention:
    """A family's attention whose keys are evicted by learned, delayed
    decisions (SPEC §1–§5). Goes in front of the family's attention class,
    which provides q/k/v/o projections (biases as the family has them),
    `q_norm`/`k_norm` where the family has them, `head_dim`, `scaling`,
    `num_key_value_groups` and `layer_idx`.

    Class attributes the family sets:
        apply_rotary: the family's `apply_rotary_pos_emb(q, k, cos, sin)`.
        norm_class: the family's RMSNorm, for the adapter's input norm.

    `decision_policy` (default None) replaces the learned decisions in eval
    mode: called as policy(layer_idx, z [B, H, T], tokens_fed) -> bool
    [B, H, T], with tokens_fed the positions the cache had seen before these
    T tokens; a policy with an `after_attend(layer_idx, paged, q, scale,
    key_padding)` method is called after each attention call (score-based
    eviction). The training-free baselines of `dms.eval.baselines` set it so
    that they run on the same paged cache, freeing memory as DMS does. A
    policy's decisions reach the cache as they are (SPEC §3's rule, whatever
    `dms_decision_target` says)."""

    decision_policy = None
    apply_rotary = None
    norm_class = None

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        if config.dms_separate_alpha:
            self.dms_proj_alpha_norm = self.norm_class(config.hidden_size, eps=config.rms_norm_eps)
            # SPEC §1: bias iff attention_bias (Qwen2, whose q/k/v always carry a bias, has no such
            # field: its adapter has none, as no reference checkpoint of it exists to follow).
            self.dms_proj_alpha = nn.Linear(config.hidden_size, config.num_key_value_heads,
                                            bias=bool(getattr(config, "attention_bias", False)))
            self.dms_proj_alpha._dms_adapter = True  # zero-initialised: see _init_dms_weights

    def reset_dms_adapter(self):
        """A fresh adapter: W = 0 (and b = 0), so every logit is -offset: keep everything."""
        if self.config.dms_separate_alpha:
            nn.init.zeros_(self.dms_proj_alpha.weight)
            if self.dms_proj_alpha.bias is not None:
                nn.init.zeros_(self.dms_proj_alpha.bias)
            nn.init.ones_(self.dms_proj_alpha_norm.weight)

    def _tensor_parallel(self):
        """(rank, size, group) of the tensor-parallel group this attention's
        heads are split over (transformers' tp_plan: q/k/v column-wise, so
        rank r holds KV heads r*H/size ... (r+1)*H/size - 1 and their query
        groups), or None on one process. Set by `from_pretrained` when
        transformers split the model (FSDP's sharded weights are not a
        split of the heads, so the weights alone cannot tell)."""
        return self.__dict__.get("_dms_tp")

    def _set_tensor_parallel(self, mesh):
        """Records the split over `mesh` (the "tp" mesh); refuses one that does not divide the KV heads."""
        if mesh.ndim > 1:
            mesh = mesh["tp"]
        size, heads = mesh.size(), self.config.num_key_value_heads
        if size == 1:
            return
        if heads % size:
            raise ValueError(f"tp_plan: {size} tensor-parallel ranks do not divide the model's {heads} KV heads; DMS "
                             "splits the cache by KV head, so use a tensor-parallel size that divides "
                             f"{heads} (tp_size, or the number of processes torchrun starts)")
        self.__dict__["_dms_tp"] = (mesh.get_local_rank(), size, mesh.get_group())

    def local_kv_heads(self):
        """The KV heads this process computes: all of the config's, or its
        share under tensor parallelism."""
        tp = self._tensor_parallel()
        return self.config.num_key_value_heads // (tp[1] if tp else 1)

    def _decision_logits(self, layer_input, q):
        """z [B, H, T] (SPEC §1) and the queries to use (the borrowed neuron is
        zeroed in them). layer_input: [B, T, hidden] before the input norm;
        q: [B, H*G, T, D] after the q-norm (if the family has one), before
        RoPE. In "layer" mode every head still has its own z here:
        `_per_layer` picks head 0 after the gate, so training noise is drawn
        per head first (the reference's order)."""
        c = self.config
        tp = self._tensor_parallel()
        if c.dms_separate_alpha:
            # The adapter is replicated under tensor parallelism (H outputs: nothing to split): every
            # rank computes all heads' logits and keeps its own, with head 0's for dms_alpha_per="layer".
            raw = self.dms_proj_alpha(self.dms_proj_alpha_norm(layer_input)).transpose(1, 2)
            if tp is not None:
                heads = raw.shape[1] // tp[1]
                own = raw[:, tp[0] * heads:(tp[0] + 1) * heads]
                raw = torch.cat([raw[:, :1], own[:, 1:]], dim=1) if c.dms_alpha_per == "layer" else own
        else:
            raw = q[:, :: self.num_key_value_groups, :, -1]
            q = self._zero_borrowed(q.clone())
            if tp is not None and c.dms_alpha_per == "layer":
                # Head 0's query (the decision of every head) is on the group's first rank only.
                head0 = raw[:, :1].contiguous()
                torch.distributed.broadcast(head0, group=tp[2], group_src=0)
                raw = torch.cat([head0, raw[:, 1:]], dim=1)
        z = c.dms_alpha_scale * raw.float() - c.dms_initial_alpha_offset
        return z.contiguous(), q

    def _zero_borrowed(self, q):
        """q [B, H*G, T, D] with the borrowed component (the last one of the
        first query head of each group) set to 0, in place. Done before RoPE
        and again after it: RoPE moves component D/2-1 into D-1, and the
        published checkpoints were trained with it zero in the rotated query too."""
        q[:, :: self.num_key_value_groups, :, -1] = 0
        return q

    def _per_layer(self, *per_head):
        """dms_alpha_per = "layer": head 0's values [B, 1, T] for all H heads."""
        if self.config.dms_alpha_per != "layer":
            return per_head
        return tuple(t[:, :1].expand_as(t) for t in per_head)

    def forward(self, hidden_states, position_embeddings, layer_input, key_padding=None, cache_layer=None,
                dms_noise_counters=None):
        """hidden_states: [B, T, hidden] after the input norm; layer_input:
        the same before it (the adapter's input). Returns (output [B, T,
        hidden], decisions [B, H, T])."""
        B, T, _ = hidden_states.shape
        shape = (B, T, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        q_norm, k_norm = getattr(self, "q_norm", None), getattr(self, "k_norm", None)
        if q_norm is not None:
            q = q_norm(q)
        if k_norm is not None:
            k = k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        z, q = self._decision_logits(layer_input, q)
        cos, sin = position_embeddings
        q, k = self.apply_rotary(q, k, cos, sin)
        if not self.config.dms_separate_alpha and self.config.dms_zero_borrowed_after_rope:
            q = self._zero_borrowed(q)  # apply_rotary_pos_emb returned a new tensor
        # One dtype for q, k, v: under autocast the projections give its dtype but a q/k norm with
        # float32 weights gives float32 (transformers' SDPA path casts the same way).
        device_type = q.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else v.dtype
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        disabled = self.config.dms_disable_eviction
        if self.training and cache_layer is None:
            if self._tensor_parallel() is not None:
                raise ValueError("model.train(): a tensor-parallel (tp_plan) DMS model runs inference only; train "
                                 "a retrofit with FSDP or DDP through accelerate (models.train) and load the "
                                 "result with tp_plan for inference")
            if disabled:
                y, decisions = None, torch.zeros_like(z)
            else:
                counters = dms_noise_counters or {}
                noise = ops.logistic_noise_like(z.detach(), seed=counters.get("seed", 0) + self.layer_idx,
                                                process_index=counters.get("process_index", 0),
                                                accum_step=counters.get("accum_step", 0),
                                                global_step=counters.get("global_step", 0))
                y, _, decisions = ops.gate(z, noise, self.config.dms_tau)
                y, decisions = self._per_layer(y, decisions)
                if self.config.dms_decision_target == "current":
                    # The kernel penalises key i by y[i+1] (SPEC §3); here key i's own decision
                    # decides, so y moves one position later (position 0 flags no key).
                    y = torch.cat([torch.zeros_like(y[..., :1]), y[..., :-1]], dim=-1)
                y = y.contiguous()
            o = ops.attn_train(q, k.contiguous(), v.contiguous(), y, key_padding,
                               window=self.config.dms_window_size, scale=self.scaling)
        else:
            decisions = torch.zeros_like(z, dtype=torch.bool) if disabled else self._per_layer(z > 0)[0]
            if q.requires_grad and not _warned_no_grad[0]:
                _warned_no_grad[0] = True
                warnings.warn("DMS model: in eval mode attention goes through the DMS cache, which has "
                              "no backward; gradients stop at attention. Use model.train() to train, or "
                              "torch.no_grad() for inference.", stacklevel=2)
            q, k, v = q.detach(), k.detach(), v.detach()
            if cache_layer is None:  # no cache asked for: a private one, dropped after the call
                cache_layer = DMSCacheLayer(self.config.dms_window_size, self.config.dms_paged_attention_block_size,
                                            kv_cache_dtype=self.config.dms_kv_cache_dtype)
            flags = decisions
            if self.decision_policy is not None:  # a training-free baseline (dms.eval.baselines)
                decisions = flags = self.decision_policy(self.layer_idx, z, cache_layer.tokens_fed)
            elif self.config.dms_decision_target == "current":
                flags = _decisions_of_previous_tokens(decisions, key_padding, cache_layer)
            o = cache_layer.attend(q.contiguous(), k.contiguous(), v.contiguous(), flags, key_padding,
                                   self.scaling)
            after = getattr(self.decision_policy, "after_attend", None)
            if after is not None:  # score-based baselines evict after attention (dms.eval.baselines)
                after(self.layer_idx, cache_layer.paged, q, self.scaling, key_padding)
        o = o.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(o), decisions


def _decisions_of_previous_tokens(decisions, key_padding, cache_layer):
    """dms_decision_target = "current" on the cache, whose rule is SPEC's (the
    decision given with token t flags the row's previous token): decisions
    [B, H, T] bool, each flagging its own token, become [B, H, T] where each
    real token carries the decision of the row's previous real token (the
    previous call's last one for the first; nothing before a row's first
    token). The last real token's decision is kept on `cache_layer` for the
    next call, with the position count it is valid for."""
    B, H, T = decisions.shape
    state = cache_layer.__dict__.get("_dms_previous_decisions")
    if cache_layer.tokens_fed == 0 or state is None:
        previous = decisions.new_zeros(B, H)
    else:
        fed, previous = state
        if fed != cache_layer.tokens_fed or tuple(previous.shape) != (B, H):
            raise ValueError("cache: with dms_decision_target='current' every token's decision is applied when "
                             "the row's next token arrives, but this cache was last fed by another model or "
                             "reordered since; reset it or make a new one with model.get_cache()")
    if key_padding is None:
        shifted = torch.cat([previous.unsqueeze(-1), decisions[..., :-1]], dim=-1)
        last = decisions[..., -1]
    else:
        positions = torch.arange(T, device=decisions.device).expand(B, T)
        last_real = torch.where(key_padding, -1, positions).cummax(dim=-1).values  # [B, T], -1: none yet
        before = torch.cat([last_real.new_full((B, 1), -1), last_real[:, :-1]], dim=-1)
        gathered = decisions.gather(2, before.clamp_min(0).unsqueeze(1).expand(B, H, T))
        shifted = torch.where((before >= 0).unsqueeze(1), gathered, previous.unsqueeze(-1))
        final = last_real[:, -1]
        last = decisions.gather(2, final.clamp_min(0).view(B, 1, 1).expand(B, H, 1)).squeeze(-1)
        last = torch.where((final >= 0).unsqueeze(1), last, previous)
    cache_layer._dms_previous_decisions = (cache_layer.tokens_fed + T, last)
    return shifted.contiguous()


class DMSDecoderLayer:
    """A family's decoder layer with DMS attention (`attention_class`, set by
    the family) that hands its input (before the input norm) to the adapter.
    The family's layer builds the norms and the MLP or MoE block."""

    attention_class = None

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.self_attn = self.attention_class(config, layer_idx)

    def forward(self, hidden_states, position_embeddings, key_padding=None, cache_layer=None,
                dms_noise_counters=None):
        """Returns (hidden_states, decisions [B, H, T])."""
        residual = hidden_states
        attn, decisions = self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                                         layer_input=hidden_states, key_padding=key_padding,
                                         cache_layer=cache_layer, dms_noise_counters=dms_noise_counters)
        hidden_states = residual + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states)), decisions


def _positions(start, new_mask, T, device):
    """RoPE positions [B or 1, T] of T new tokens: each row continues from
    `start` [B] (its real tokens so far, padding excluded; None: 0) and counts
    only the new tokens that `new_mask` [B, T] (1 = token, 0 = padding; None:
    all real) marks. A padding position gets its row's previous position (its
    output is 0 and it is never stored)."""
    if new_mask is None:
        steps = torch.arange(T, device=device).unsqueeze(0)
    else:
        steps = new_mask.long().cumsum(-1) - 1
    if start is not None:
        steps = steps + start.to(device=device, dtype=torch.long).unsqueeze(1)
    return steps.clamp_min(0)


@contextlib.contextmanager
def _without_layers(config):
    """`config` seen as a model of no layers, for the duration."""
    has_types = hasattr(config, "layer_types")
    saved = config.num_hidden_layers, getattr(config, "layer_types", None)
    config.num_hidden_layers = 0
    if has_types:
        config.layer_types = []
    try:
        yield
    finally:
        config.num_hidden_layers = saved[0]
        if has_types:
            config.layer_types = saved[1]


def _check_no_sliding_window(config):
    """Raises ValueError if `config` asks for sliding-window attention, which
    DMS attention does not compute: it attends to every key its learned
    decisions keep, however old."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:  # Qwen2, Qwen3: only "sliding_attention" layers use the window
        sliding = "sliding_attention" in layer_types
    else:  # Mistral, Qwen3-MoE: every layer uses sliding_window when it is set
        sliding = getattr(config, "sliding_window", None) is not None
    if sliding:
        fix = ("layer_types=['full_attention'] * num_hidden_layers" if layer_types is not None
               else "sliding_window=None")
        raise ValueError(f"sliding_window: expected full attention in every layer, got sliding_window="
                         f"{getattr(config, 'sliding_window', None)!r}"
                         + (f" with layer_types {sorted(set(layer_types))}" if layer_types is not None else "")
                         + ": DMS attention is causal attention over the keys its decisions keep, with no window "
                         f"of its own. Pass {fix} to from_pretrained to run such a model with full attention, which "
                         "equals it on sequences up to its window")


class DMSModel:
    """A family's decoder stack with DMS attention (`decoder_layer_class`, set
    by the family). The family's model builds the embeddings, the final norm
    and the rotary embedding; this forward runs the layers with a DMSCache
    (eval) or the fused training attention."""

    decoder_layer_class = None

    def __init__(self, config):
        _check_no_sliding_window(config)
        # The family's model would build a stack of plain layers only for us to
        # replace them (twice the parameters at the peak): let it build none.
        with _without_layers(config):
            super().__init__(config)
        self.layers = nn.ModuleList(self.decoder_layer_class(config, i) for i in range(config.num_hidden_layers))
        self.post_init()

    def tensor_parallel_group(self):
        """The process group the KV heads are split over (tp_plan), or None."""
        tp = self.layers[0].self_attn._tensor_parallel() if len(self.layers) else None
        return tp[2] if tp else None

    def _check_cache(self, cache, batch_size):
        """Raises ValueError unless `cache` was made for this model (layers,
        window, KV heads, head dim) and holds `batch_size` sequences."""
        c = self.config
        if len(cache.layers) != c.num_hidden_layers:
            raise ValueError(f"cache: expected a DMSCache for {c.num_hidden_layers} layers (model.get_cache()), got "
                             f"one for {len(cache.layers)}")
        head_dim = self.layers[0].self_attn.head_dim if len(self.layers) else None
        heads = self.layers[0].self_attn.local_kv_heads() if len(self.layers) else None
        for layer in cache.layers:
            if layer.window_size != c.dms_window_size:
                raise ValueError(f"cache: its window is {layer.window_size} tokens, the model's dms_window_size is "
                                 f"{c.dms_window_size}; make the cache with model.get_cache()")
            if layer.is_initialized and layer.tokens_fed:  # an empty (new or reset) cache takes any shape
                p = layer.paged
                if (p.num_kv_heads, p.head_dim) != (heads, head_dim):
                    raise ValueError(f"cache: holds {p.num_kv_heads} KV heads of dim {p.head_dim}, the model has "
                                     f"{heads} of dim {head_dim}: a cache from another model")
                if p.batch_size != batch_size:
                    raise ValueError(f"cache: holds {p.batch_size} sequences, the input has {batch_size} (reset it, "
                                     "or reorder it with cache.reorder_cache)")

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, dms_noise_counters=None, past_key_values=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids, inputs_embeds: give exactly one")
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions: not available from a DMS model: its attention runs in fused kernels "
                             "over a paged cache whose rows hold different tokens, so no [B, heads, T, T] weights "
                             "exist; use dms.viz for what each head keeps")
        output_hidden_states = kwargs.get("output_hidden_states")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        cache = cache if cache is not None else past_key_values
        use_cache = (not self.training) if use_cache is None else use_cache
        if cache is not None and not isinstance(cache, DMSCache):
            # An empty cache of another kind would be replaced by a private one, and whoever keeps
            # it would lose the conversation at the next turn: refuse it, empty or not.
            raise TypeError(f"cache: expected a DMSCache (use model.get_cache()) or None, got "
                            f"{type(cache).__name__}: a DMS model keeps a different number of tokens per "
                            "(sequence, KV head) row, which only its own paged cache can hold")
        if use_cache and cache is None:
            cache = DMSCache.from_config(self.config, process_group=self.tensor_parallel_group())
        B, T = inputs_embeds.shape[:2]
        if use_cache:
            self._check_cache(cache, B)
        past = cache.get_seq_length() if use_cache else 0
        if past + T > self.config.max_position_embeddings:
            raise ValueError(f"input_ids: {past} cached + {T} new positions exceed the model's "
                             f"max_position_embeddings ({self.config.max_position_embeddings})")
        key_padding = new_mask = None
        if attention_mask is not None:
            shape = tuple(attention_mask.shape)
            if shape != (B, past + T):
                raise ValueError(f"attention_mask: expected [batch, cached + new tokens] = [{B}, {past + T}] "
                                 "(Hugging Face's convention: with a filled cache the mask covers the cached "
                                 f"positions too; 1 = token, 0 = padding), got {shape}")
            new_mask = attention_mask[:, past:]
            key_padding = new_mask == 0
            if not torch.compiler.is_compiling() and not bool(key_padding.any()):
                key_padding = None  # eager only: a host read that torch.compile would break the graph at
        if position_ids is None:
            position_ids = _positions(cache.sequence_lengths() if use_cache and past else None,
                                      new_mask, T, inputs_embeds.device)
        chunk = self.config.dms_chunked_prefill if use_cache else None
        starts = list(range(0, T, chunk)) if chunk and T > chunk else [0]
        bounds = list(zip(starts, starts[1:] + [T]))
        outs, decisions, states = [], [], []  # per chunk: output, per-layer decisions [B, H, t], layer inputs
        for t0, t1 in (bounds if len(bounds) < 4 else tqdm(bounds, desc="prefill", unit="chunk", leave=False)):
            hidden = inputs_embeds[:, t0:t1]
            position_embeddings = self.rotary_emb(hidden, position_ids[:, t0:t1])
            pad = None if key_padding is None else key_padding[:, t0:t1]
            chunk_decisions, chunk_states = [], []
            for i, layer in enumerate(self.layers):
                if output_hidden_states:
                    chunk_states.append(hidden)
                hidden, d = layer(hidden, position_embeddings, key_padding=pad,
                                  cache_layer=cache.layers[i] if use_cache else None,
                                  dms_noise_counters=dms_noise_counters)
                chunk_decisions.append(d)
            outs.append(hidden)
            decisions.append(chunk_decisions)
            states.append(chunk_states)
        hidden_states = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        # [layers, B, H, T]: each layer's decisions over the whole input
        stacked = torch.stack([torch.cat([c[i] for c in decisions], dim=2) if len(decisions) > 1
                               else decisions[0][i] for i in range(len(self.layers))])
        last = self.norm(hidden_states)
        all_states = None
        if output_hidden_states:  # transformers' layout: the embeddings, each layer's input after that, the output
            all_states = tuple(torch.cat([c[i] for c in states], dim=1) for i in range(len(self.layers))) + (last,)
        out = _output(BaseModelOutputWithPast, cache if use_cache else None, last_hidden_state=last,
                      hidden_states=all_states)
        out.dms_decisions = stacked
        out.dms_key_padding = key_padding
        return out


def _remote_code(model):
    """{file name: text} of the two thin code files save_pretrained writes
    next to the weights, and the `auto_map` that points at them: re-exports
    of the installed dms package, so `trust_remote_code=True` loads (lm-eval,
    the notebook) use the one copy of each class that dms has."""
    config_cls, body_cls, lm_cls = type(model.config), type(model.model), type(model)
    config_file, model_file = config_cls.__module__.rsplit(".", 1)[1], lm_cls.__module__.rsplit(".", 1)[1]
    files = {
        f"{config_file}.py": (
            '"""Loads the DMS config class from the installed dms package\n'
            '(pip install dms-kv; the import name is dms)."""\n'
            f"from {config_cls.__module__} import {config_cls.__name__}\n\n"
            f'__all__ = ["{config_cls.__name__}"]\n'),
        f"{model_file}.py": (
            '"""Loads the DMS model classes from the installed dms package\n'
            '(pip install dms-kv; the import name is dms)."""\n'
            f"from {lm_cls.__module__} import {lm_cls.__name__}, {body_cls.__name__}\n\n"
            f'__all__ = ["{lm_cls.__name__}", "{body_cls.__name__}"]\n'),
    }
    auto_map = {"AutoConfig": f"{config_file}.{config_cls.__name__}",
                "AutoModel": f"{model_file}.{body_cls.__name__}",
                "AutoModelForCausalLM": f"{model_file}.{lm_cls.__name__}"}
    return files, auto_map


class DMSForCausalLM:
    """A family's causal LM with DMS: `from_pretrained` takes a plain or a DMS
    checkpoint of the family; `generate` keeps a compressed `DMSCache`. The
    family sets `model_class` (its `DMSModel`)."""

    model_class = None

    def __init__(self, config):
        # The family's causal LM __init__ would first build a plain body: set
        # up the same members around ours instead.
        PreTrainedModel.__init__(self, config)
        self.model = self.model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def reset_dms_adapters(self):
        """Every layer's adapter to its fresh state (keep everything)."""
        for layer in self.model.layers:
            layer.self_attn.reset_dms_adapter()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained, plus `auto_map` and the two thin code
        files that let `AutoModelForCausalLM.from_pretrained(dir,
        trust_remote_code=True)` load the model in any process where dms is
        installed."""
        files, auto_map = _remote_code(self)
        self.config.auto_map = auto_map
        super().save_pretrained(save_directory, *args, **kwargs)
        for name, text in files.items():
            with open(os.path.join(save_directory, name), "w") as f:
                f.write(text)

    def get_cache(self, preallocate_for_tokens=None, kv_cache_dtype=None):
        """An empty `DMSCache` for this model (under tensor parallelism, for
        this rank's KV heads, reporting figures summed over the ranks), its
        pages in `kv_cache_dtype` (default None: `config.dms_kv_cache_dtype`;
        "auto", "fp8_e4m3", "fp8", "fp8_e5m2")."""
        return DMSCache.from_config(self.config, preallocate_for_tokens,
                                    process_group=self.model.tensor_parallel_group(), kv_cache_dtype=kv_cache_dtype)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, *args, **kwargs):
        """generate's cache: the user's DMSCache, or a new one; other caches
        and the modes a DMS cache cannot serve are refused here, before
        anything runs, with the reason."""
        name = next(iter(cache_kwargs(None)))
        mode = getattr(generation_mode, "value", generation_mode)
        if mode == "assisted_generation":
            raise ValueError("generate: assisted generation (assistant_model, prompt_lookup_num_tokens) is not "
                             "available with a DMS model: it rolls the cache back after rejected draft tokens, "
                             "and evicted tokens cannot be restored; generate without them")
        if self.config.dms_decision_target == "current" and (
                (generation_config.num_beams or 1) > 1 or (generation_config.penalty_alpha or 0) > 0):
            raise ValueError("generate: beam search and contrastive search reorder the cache's rows, which a model "
                             "with dms_decision_target='current' cannot follow (each row's last decision waits "
                             "for its next token outside the cache); use greedy decoding or sampling")
        impl = generation_config.cache_implementation
        if impl not in (None, "dynamic"):
            raise ValueError(f"cache_implementation={impl!r}: a DMS model generates with its own paged DMSCache "
                             "(rows hold different numbers of tokens, which static, offloaded or quantized caches "
                             "cannot); leave cache_implementation unset or pass model.get_cache()")
        cache = model_kwargs.get(name)
        if cache is not None and not isinstance(cache, DMSCache):
            raise TypeError(f"{name}: expected a DMSCache (use model.get_cache()), got {type(cache).__name__}")
        if cache is None and generation_config.use_cache is not False:
            model_kwargs[name] = self.get_cache()
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, *args,
                                                     **kwargs)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, past_key_values=None, dms_noise_counters=None,
                dms_target=None, **kwargs):
        """As the family's causal LM forward, plus: `dms_noise_counters` (dict
        of seed, process_index, accum_step, global_step for the training
        noise; default all 0) and `dms_target` (the fraction of decisions to
        evict, 1 - 1/CR; with it the output carries the compression loss of
        SPEC §6). The output also carries the compression ratios of the cache
        and the evicted fraction per batch element."""
        if kwargs.pop("output_router_logits", None):
            raise ValueError("output_router_logits: not available from a DMS model: the MoE blocks run unchanged, "
                             "but the router load-balancing loss is not collected (DMS retrofits train the "
                             "adapters, with the experts and routers frozen)")
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, dms_noise_counters=dms_noise_counters,
                         output_hidden_states=kwargs.pop("output_hidden_states", None),
                         output_attentions=kwargs.pop("output_attentions", None))
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        # Mean decision per batch element over layers, heads and real tokens.
        decisions = out.dms_decisions.float()  # [layers, B, H, T]
        if out.dms_key_padding is not None:
            keep = (~out.dms_key_padding).float()[None, :, None, :]
            evicted = (decisions * keep).sum((0, 2, 3)) / (keep.sum((0, 2, 3)) * decisions.shape[0]
                                                            * decisions.shape[2]).clamp_min(1)
        else:
            evicted = decisions.mean((0, 2, 3))
        compression_loss = None
        if dms_target is not None:
            compression_loss = torch.clamp(float(dms_target) - evicted, min=0).mean()
        return _output(CausalLMOutputDMS, _cache_of(out), loss=loss, logits=logits, hidden_states=out.hidden_states,
                       evicted_fraction=evicted,
                       compression_loss=compression_loss)


def with_dms_body(head_class, config_class, module):
    """transformers' task head `head_class` over the family's DMS body
    (which the head builds through AutoModel), named `<head>DMS` in `module`."""

    class Head(DMSPreTrainedMixin, head_class):
        pass

    Head.config_class = config_class
    Head.__name__ = Head.__qualname__ = head_class.__name__ + "DMS"
    Head.__module__ = module
    Head.__doc__ = f"`{head_class.__name__}` with DMS attention."
    return Head


def _share_checkpoint_conversions(config_class):
    """Gives the DMS model type the checkpoint conversions transformers has
    for the plain one (Qwen3-MoE: checkpoints store each expert's
    gate/up/down projections apart, the model fuses them), which it applies
    to its own classes only."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # pragma: no cover - transformers without conversion mappings
        return
    mapping = get_checkpoint_conversion_mapping(config_class.base_model_type)
    if mapping is not None:
        register_checkpoint_conversion_mapping(config_class.model_type, mapping, overwrite=True)


def register_family(config_class, model_class, causal_lm_class, sequence_class=None, token_class=None,
                    qa_class=None):
    """Teaches transformers' Auto classes (and checkpoint conversions) the
    family's DMS model type, and names the family's DMS decoder layer as the
    unit that is never split (`_no_split_modules`: FSDP's auto-wrap and
    `device_map` look modules up by class name, and the family's own entry,
    e.g. "LlamaDecoderLayer", names a class no DMS model contains):
    AutoModelForCausalLM.from_pretrained(dir) then needs no remote code, and
    transformers' task heads, which build their body with AutoModel.from_config,
    get ours."""
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    _share_checkpoint_conversions(config_class)
    layer_name = model_class.decoder_layer_class.__name__
    for model in (model_class, causal_lm_class, sequence_class, token_class, qa_class):
        if model is not None:
            model._no_split_modules = [layer_name]
    for auto, model in ((AutoModel, model_class), (AutoModelForCausalLM, causal_lm_class),
                        (AutoModelForSequenceClassification, sequence_class),
                        (AutoModelForTokenClassification, token_class),
                        (AutoModelForQuestionAnswering, qa_class)):
        if model is not None:
            auto.register(config_class, model, exist_ok=True)
