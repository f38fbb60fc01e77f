"""The community checkpoint layout of FastDMS (shisa-ai/Llama-3.2-1B-DMS-8x):
plain LlamaForCausalLM weights, DMS settings in config.json and in a
dms_metadata.json beside them. Its rule differs from SPEC.md in two ways,
which two config switches express (ARCHITECTURE.md, "The FastDMS layout"):
a decision flags its own token (dms_decision_target="current"), and the
borrowed component is zeroed before RoPE only
(dms_zero_borrowed_after_rope=False). A directory of that layout loads with
both switches set and computes, at every step of a multi-turn run, the rule
of FastDMS's live mask: key i is visible to query j iff its own decision is 0
or j - i <= window (the float64 oracle with evict flags = decisions)."""

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dms import AutoModelForCausalLMDMS, LlamaConfigDMS, LlamaForCausalLMDMS, ops

from . import oracle
from .test_qwen3_oracle import oracle_logits

TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=8,
            num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=512)
METADATA = {"config": {"window_size": 6, "alpha_scale": 100.0, "alpha_offset": 5.0, "target_cr": 8,
                       "compression_mode": "dms"}}


def _layout(path, config_fields=None, metadata=METADATA):
    """A plain tiny Llama whose borrowed query components straddle the
    threshold offset / scale = 0.05, saved with DMS fields in config.json
    and a dms_metadata.json, as the community checkpoint is."""
    torch.manual_seed(2)
    plain = LlamaForCausalLM(LlamaConfig(**TINY))
    group = TINY["num_attention_heads"] // TINY["num_key_value_heads"]
    rows = [h * group * TINY["head_dim"] + TINY["head_dim"] - 1 for h in range(TINY["num_key_value_heads"])]
    with torch.no_grad():
        for layer in plain.model.layers:
            layer.self_attn.q_proj.weight[rows] *= 40
            layer.self_attn.q_proj.weight[rows, 0] += 0.08  # shift the logits around the threshold
    plain.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    fields = {"dms_window_size": 6, "dms_alpha_scale": 100.0, "dms_initial_alpha_offset": 5.0, "dms_cr": 8}
    (path / "config.json").write_text(json.dumps({**config, **(config_fields if config_fields is not None
                                                                 else fields)}))
    if metadata is not None:
        (path / "dms_metadata.json").write_text(json.dumps(metadata))
    return path


def test_the_layout_loads_with_its_conventions(tmp_path):
    _layout(tmp_path)
    m, info = LlamaForCausalLMDMS.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    c = m.config
    assert (c.dms_separate_alpha, c.dms_decision_target, c.dms_zero_borrowed_after_rope) == (False, "current", False)
    assert (c.dms_window_size, c.dms_paged_attention_block_size, c.dms_alpha_scale, c.dms_initial_alpha_offset,
            c.dms_cr) == (6, 4, 100.0, 5.0, 8)
    assert type(AutoModelForCausalLMDMS.from_pretrained(tmp_path)) is LlamaForCausalLMDMS


def test_metadata_wins_over_config_json_and_arguments_win_over_both(tmp_path):
    _layout(tmp_path, {"dms_window_size": 300, "dms_alpha_scale": 1.0})
    c = LlamaConfigDMS.from_pretrained(tmp_path)
    assert c.dms_window_size == 6 and c.dms_alpha_scale == 100.0  # FastDMS reads dms_metadata.json first
    c = LlamaConfigDMS.from_pretrained(tmp_path, dms_decision_target="previous", dms_window_size=9)
    assert c.dms_decision_target == "previous" and c.dms_window_size == 9
    explicit = tmp_path / "explicit"
    explicit.mkdir()
    _layout(explicit, {"dms_window_size": 6, "dms_decision_target": "previous"})
    c = LlamaConfigDMS.from_pretrained(explicit)  # config.json's own choice stands
    assert c.dms_decision_target == "previous" and c.dms_zero_borrowed_after_rope is False


def test_without_metadata_a_dms_config_keeps_spec_rules(tmp_path):
    _layout(tmp_path, metadata=None, config_fields={"dms_window_size": 6, "dms_paged_attention_block_size": 4,
                                                    "dms_cr": 8})
    c = LlamaConfigDMS.from_pretrained(tmp_path)
    assert (c.dms_separate_alpha, c.dms_decision_target, c.dms_zero_borrowed_after_rope) == (False, "previous", True)


def test_bad_metadata_is_refused_by_name(tmp_path):
    _layout(tmp_path, metadata=[6])
    with pytest.raises(ValueError, match="^dms_metadata.json: expected a JSON object"):
        LlamaConfigDMS.from_pretrained(tmp_path)
    (tmp_path / "dms_metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match="^dms_metadata.json: not valid JSON"):
        LlamaConfigDMS.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="^dms_decision_target: expected 'previous' or 'current'"):
        LlamaConfigDMS(dms_decision_target="next", dms_window_size=8, dms_paged_attention_block_size=4, **TINY)


def test_every_step_of_a_multi_turn_run_follows_the_fastdms_rule(tmp_path):
    _layout(tmp_path)
    m = AutoModelForCausalLMDMS.from_pretrained(tmp_path, dms_chunked_prefill=5).eval()
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    expected = oracle_logits(copy.deepcopy(m).double(), ids).float()
    steps = [(0, 13)] + [(t, t + 1) for t in range(13, 22)] + [(22, 31)] + [(t, t + 1) for t in range(31, 40)]
    with torch.no_grad():
        cache = m.get_cache()
        for t0, t1 in steps:
            got = m(ids[:, t0:t1], cache=cache).logits
            torch.testing.assert_close(got, expected[:, t0:t1], rtol=1e-4, atol=1e-4,
                                       msg=lambda text: f"tokens {t0}:{t1}: {text}")
    assert cache.compression_ratio() > 1.2
    # The two conventions matter here: the SPEC rules on the same weights give other logits.
    spec = copy.deepcopy(m).double()
    spec.config.dms_decision_target, spec.config.dms_zero_borrowed_after_rope = "previous", True
    assert (oracle_logits(spec, ids).float() - expected).abs().max() > 1e-2


def test_own_decisions_by_hand():
    """The rule itself, on one layer's decisions: FastDMS's live mask (key i
    live for the query at position j iff not evicted or j - i <= w) is the
    oracle's visibility with evict flags = the decisions themselves."""
    alpha = torch.tensor([[[1, 0, 1, 1, 0, 0, 1, 0]]], dtype=torch.float64)
    mask = oracle.visibility_mask(alpha, window=2)[0, 0]
    for j in range(8):
        for i in range(8):
            assert bool(mask[j, i]) == (i <= j and (alpha[0, 0, i] == 0 or j - i <= 2))


def test_left_padded_batch_follows_the_rule_per_row(tmp_path):
    _layout(tmp_path)
    m = AutoModelForCausalLMDMS.from_pretrained(tmp_path).eval()
    ids = torch.randint(1, 128, (2, 30), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :5] = 0
    mask[1, 18:21] = 0
    ids = ids.masked_fill(mask == 0, 0)
    m64 = copy.deepcopy(m).double()
    expected = [oracle_logits(m64, ids[b][mask[b] == 1][None])[0].float() for b in range(2)]
    turns = [(0, 12)] + [(t, t + 1) for t in range(12, 18)] + [(18, 25)] + [(t, t + 1) for t in range(25, 30)]
    with torch.no_grad():
        whole = m(ids, attention_mask=mask).logits
        cache = m.get_cache()
        pieces = torch.cat([m(ids[:, t0:t1], cache=cache, attention_mask=mask[:, :t1]).logits for t0, t1 in turns], 1)
    for b in range(2):
        real = mask[b] == 1
        torch.testing.assert_close(whole[b][real], expected[b], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(pieces[b][real], expected[b], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("separate", [True, False], ids=["separate", "borrowed"])
def test_training_with_own_decisions_equals_the_oracle(separate):
    torch.manual_seed(0)
    config = LlamaConfigDMS(dms_window_size=5, dms_paged_attention_block_size=2, dms_alpha_scale=1.0,
                            dms_initial_alpha_offset=0.0, dms_separate_alpha=separate, dms_decision_target="current",
                            dms_zero_borrowed_after_rope=separate, **TINY)
    m = LlamaForCausalLMDMS(config).train()
    with torch.no_grad():
        for layer in m.model.layers:
            if separate:
                torch.nn.init.normal_(layer.self_attn.dms_proj_alpha.weight, std=0.5)
    ids = torch.randint(0, 128, (2, 24))
    out = m(ids, labels=ids, dms_noise_counters=dict(seed=3))
    noise = [ops.logistic_noise(torch.empty(2, 2, 24), seed=3 + i, process_index=0, accum_step=0, global_step=0)
             for i in range(2)]
    ref = copy.deepcopy(m).double()
    expected = oracle_logits(ref, ids, noise)
    torch.testing.assert_close(out.logits, expected.float(), rtol=1e-4, atol=1e-4)
    out.loss.backward()
    torch.nn.functional.cross_entropy(expected[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1)).backward()
    trainable = "dms_proj_alpha" if separate else "q_proj"
    pairs = [(a.grad, b.grad) for (name, a), (_, b) in zip(m.named_parameters(), ref.named_parameters())
             if trainable in name]
    assert pairs
    for a, b in pairs:
        assert float(b.abs().max()) > 0
        torch.testing.assert_close(a.double(), b, rtol=2e-3, atol=1e-6)


def test_beam_search_is_refused_and_greedy_generation_runs(tmp_path):
    _layout(tmp_path)
    m = AutoModelForCausalLMDMS.from_pretrained(tmp_path).eval()
    ids = torch.randint(1, 128, (1, 8))
    with pytest.raises(ValueError, match="beam search.*dms_decision_target='current'"):
        m.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        full = m(out[:, :-1], use_cache=False).logits
    assert torch.equal(full[0, 7:].argmax(-1), out[0, 8:])  # each generated token is the uncached argmax
