"""The whole `Qwen3ForCausalLMDMS` against a float64 model built from
tests/oracle.py: transformers' projections, norms and MLPs (`oracle_logits`
serves every family: q/k norms where the model has them, biases, MoE
blocks; tests/test_families.py uses it), with the
DMS parts (decision logits, gate, attention with delayed eviction) taken from
the oracle over the whole sequence with dense masks. Eval mode is checked at
every step of a prefill → decode → prefill → decode run; training mode with
its noise, and the adapter gradients of a loss through it."""

import copy

import pytest
import torch
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

from dms import Qwen3ConfigDMS, Qwen3ForCausalLMDMS, ops

from . import oracle

TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=8,
            num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=512)


def _model(**dms):
    torch.manual_seed(0)
    fields = dict(dms_window_size=5, dms_paged_attention_block_size=2, dms_alpha_scale=1.0,
                  dms_initial_alpha_offset=0.0, **dms, **TINY)
    m = Qwen3ForCausalLMDMS(Qwen3ConfigDMS(**fields))
    with torch.no_grad():
        for layer in m.model.layers:
            if fields.get("dms_separate_alpha"):
                torch.nn.init.normal_(layer.self_attn.dms_proj_alpha.weight, std=0.5)
                torch.nn.init.normal_(layer.self_attn.dms_proj_alpha_norm.weight, mean=1.0, std=0.2)
            else:  # the borrowed neuron: make its last query component carry a usable logit
                torch.nn.init.normal_(layer.self_attn.q_norm.weight, mean=1.0, std=0.5)
    return m


def oracle_logits(m, ids, noise=None, decisions=None, window=None):
    """Logits of the float64 DMS model `m` (any family: its transformers
    modules compute the projections, q/k norms if it has them, norms and MLP
    or MoE blocks) over the whole of `ids` [B, T]; `noise`
    (one [B, H, T] tensor per layer) switches to the training form;
    `decisions` (one [B, H, T] 0/1 tensor per layer) and `window` replace
    the model's own decisions and dms_window_size at inference."""
    c = m.config
    B, T = ids.shape
    x = m.model.embed_tokens(ids)
    cos, sin = m.model.rotary_emb(x, torch.arange(T)[None])
    for i, layer in enumerate(m.model.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        shape = (B, T, -1, attn.head_dim)
        q, k = attn.q_proj(h).view(shape), attn.k_proj(h).view(shape)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3, Qwen3-MoE; Llama, Qwen2, Mistral have none
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        if c.dms_separate_alpha:
            z = oracle.decision_logits_separate(x, attn.dms_proj_alpha_norm.weight, attn.dms_proj_alpha.weight,
                                                attn.dms_proj_alpha.bias, scale=c.dms_alpha_scale,
                                                offset=c.dms_initial_alpha_offset, eps=c.rms_norm_eps)
        else:
            z, q = oracle.decision_logits_borrowed(q, c.num_key_value_heads, scale=c.dms_alpha_scale,
                                                   offset=c.dms_initial_alpha_offset)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if not c.dms_separate_alpha and getattr(c, "dms_zero_borrowed_after_rope", True):
            q = oracle.zero_borrowed(q, c.num_key_value_heads)
        layer_wide = oracle.per_layer if c.dms_alpha_per == "layer" else (lambda values: values)
        # dms_decision_target "current" (the FastDMS layout): key i's own decision flags it.
        own = getattr(c, "dms_decision_target", "previous") == "current"
        if noise is None:
            alpha = layer_wide((z > 0).double()) if decisions is None else decisions[i].double()
            w = c.dms_window_size if window is None else window
            if own:
                o = oracle.attention_hard(q, k, v, alpha, w, attn.scaling)  # evict_flags e[i] = alpha[i]
            else:
                o = oracle.attention_with_decisions(q, k, v, alpha, w, attn.scaling)  # e[i] = alpha[i+1]
        else:
            y = layer_wide(oracle.gate(z, noise[i].double(), c.dms_tau)[0])
            if own:  # attention_train penalises key i with y[i+1]: hand it key i's own y there
                y = torch.cat([torch.zeros_like(y[..., :1]), y[..., :-1]], dim=-1)
            o, _ = oracle.attention_train(q, k, v, y, c.dms_window_size, attn.scaling)
        x = x + attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return m.lm_head(m.model.norm(x))


MODES = [dict(dms_separate_alpha=True), dict(dms_separate_alpha=True, dms_alpha_per="layer"),
         dict(dms_separate_alpha=False)]


@pytest.mark.parametrize("dms", MODES, ids=["separate-head", "separate-layer", "borrowed-head"])
def test_every_step_of_a_multi_turn_run_equals_the_oracle(dms):
    m = _model(**dms).eval()
    ids = torch.randint(0, 128, (2, 36))
    expected = oracle_logits(copy.deepcopy(m).double(), ids).float()
    with torch.no_grad():
        cache = m.get_cache()
        steps = [(0, 11)] + [(t, t + 1) for t in range(11, 20)] + [(20, 29)] + [(t, t + 1) for t in range(29, 36)]
        for t0, t1 in steps:
            got = m(ids[:, t0:t1], cache=cache).logits
            torch.testing.assert_close(got, expected[:, t0:t1], rtol=1e-4, atol=1e-4,
                                       msg=lambda text: f"tokens {t0}:{t1}: {text}")
    assert cache.compression_ratio() > 1.2  # the run really evicted


@pytest.mark.parametrize("dms", MODES, ids=["separate-head", "separate-layer", "borrowed-head"])
def test_training_forward_and_adapter_gradients_equal_the_oracle(dms):
    m = _model(**dms).train()
    ids = torch.randint(0, 128, (2, 24))
    counters = dict(seed=7, process_index=0, accum_step=1, global_step=3)
    out = m(ids, labels=ids, dms_noise_counters=counters)
    # The noise the model draws: Philox streams per layer (tested on their own in test_gate).
    shape = (2, TINY["num_key_value_heads"], 24)
    noise = [ops.logistic_noise(torch.empty(shape), seed=7 + i, process_index=0, accum_step=1, global_step=3)
             for i in range(TINY["num_hidden_layers"])]
    ref = copy.deepcopy(m).double()
    expected = oracle_logits(ref, ids, noise)
    torch.testing.assert_close(out.logits, expected.float(), rtol=1e-4, atol=1e-4)

    out.loss.backward()
    loss64 = torch.nn.functional.cross_entropy(expected[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss.double(), loss64, rtol=1e-5, atol=1e-6)
    loss64.backward()
    trainable = "dms_proj_alpha" if dms["dms_separate_alpha"] else "q_norm"
    ours = [p.grad for name, p in m.named_parameters() if trainable in name]
    theirs = [p.grad for name, p in ref.named_parameters() if trainable in name]
    assert ours and len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert float(b.abs().max()) > 0
        torch.testing.assert_close(a.double(), b, rtol=2e-3, atol=1e-6)
