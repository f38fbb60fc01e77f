"""What a user loading a checkpoint or calling the model by hand gets
(SPEC §1, §5, §7): the published hub layout loads without its own code and
computes the borrowed-neuron rule at every step; a plain Qwen3 checkpoint
keeps every token; positions follow Hugging Face's mask convention (the mask
covers cached + new tokens) and each row's real tokens, with or without a
mask; "layer" decisions agree across heads in training; a reset cache takes
any batch size. Expected logits come from the float64 whole-model oracle of
test_qwen3_oracle over each row's real tokens alone."""

import copy
import json
import sys
import warnings

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from dms import Qwen3ForCausalLMDMS, ops

from . import oracle
from .test_qwen3_oracle import TINY, _model, oracle_logits

# config.json of nvidia/Qwen3-8B-DMS-8x, less the Qwen3 sizes: its own code
# files in auto_map, and only these four DMS fields (no adapter weights).
HUB_FIELDS = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
              "auto_map": {"AutoConfig": "configuration_qwen3_dms.Qwen3Config",
                           "AutoModelForCausalLM": "modeling_qwen3_dms.Qwen3ForCausalLM"},
              "dms_alpha_scale": 100.0, "dms_initial_alpha_offset": 5.0, "dms_window_size": 260, "dms_cr": 8}


def _hub_layout(path):
    """A directory laid out like the hub checkpoint: plain Qwen3 weights whose
    q-norms make the borrowed component a usable logit, its config.json, and
    its two code files, which raise if anything imports them."""
    torch.manual_seed(5)
    plain = Qwen3ForCausalLM(Qwen3Config(**TINY))
    with torch.no_grad():
        for layer in plain.model.layers:
            torch.nn.init.normal_(layer.self_attn.q_norm.weight, mean=1.0, std=0.5)
    plain.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("dms_")}
    (path / "config.json").write_text(json.dumps({**config, **HUB_FIELDS}))
    for name in ("configuration_qwen3_dms.py", "modeling_qwen3_dms.py"):
        (path / name).write_text(f"raise RuntimeError('{name} of the checkpoint was imported')\n")


def test_hub_checkpoint_layout_loads_without_its_code_and_equals_the_oracle(tmp_path):
    _hub_layout(tmp_path)
    modules = set(sys.modules)
    m, info = Qwen3ForCausalLMDMS.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(name.endswith("qwen3_dms") and name.startswith("transformers_modules")
                   for name in set(sys.modules) - modules)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    c = m.config
    assert c.dms_separate_alpha is False and c.dms_window_size == 260 and c.dms_alpha_scale == 100.0
    assert not any("dms_proj_alpha" in name for name in m.state_dict())
    m.eval()
    ids = torch.randint(0, TINY["vocab_size"], (1, 330), generator=torch.Generator().manual_seed(0))
    expected = oracle_logits(copy.deepcopy(m).double(), ids).float()
    cache = m.get_cache()
    with torch.no_grad():
        got = [m(ids[:, :300], cache=cache).logits]
        got += [m(ids[:, t:t + 1], cache=cache).logits for t in range(300, 330)]
    for i, (t0, t1) in enumerate([(0, 300)] + [(t, t + 1) for t in range(300, 330)]):
        torch.testing.assert_close(got[i], expected[:, t0:t1], rtol=1e-4, atol=1e-4,
                                   msg=lambda text: f"tokens {t0}:{t1}: {text}")
    assert cache.compression_ratio() > 1.05  # keys older than the window were evicted


def test_plain_qwen3_checkpoint_keeps_every_token_unless_asked(tmp_path):
    torch.manual_seed(1)
    plain = Qwen3ForCausalLM(Qwen3Config(**TINY)).eval()
    with torch.no_grad():  # a borrowed neuron that would evict about half of the tokens
        for layer in plain.model.layers:
            torch.nn.init.normal_(layer.self_attn.q_norm.weight, mean=1.0, std=0.5)
    plain.save_pretrained(tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 40))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on the default path
        m = Qwen3ForCausalLMDMS.from_pretrained(tmp_path, dms_window_size=5, dms_paged_attention_block_size=2)
    assert m.config.dms_separate_alpha is True
    assert all(float(layer.self_attn.dms_proj_alpha.weight.detach().abs().max()) == 0 for layer in m.model.layers)
    with torch.no_grad():
        out = m.eval()(ids)
        torch.testing.assert_close(out.logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    assert out.compression_ratio == 1.0 and float(out.evicted_fraction.max()) == 0.0

    with pytest.warns(UserWarning, match="dms_separate_alpha=False on a checkpoint without DMS fields.*retrofitted"):
        borrowed = Qwen3ForCausalLMDMS.from_pretrained(tmp_path, dms_separate_alpha=False, dms_window_size=5,
                                                       dms_paged_attention_block_size=2)
    with torch.no_grad():
        out = borrowed.eval()(ids)
    assert borrowed.config.dms_separate_alpha is False and out.compression_ratio > 1.2


# ---- positions: Hugging Face's mask convention ---------------------------------------------

B, L = 2, 36
TURNS = [(0, 12)] + [(t, t + 1) for t in range(12, 20)] + [(20, 29)] + [(t, t + 1) for t in range(29, 36)]


def _padded_batch():
    """ids, mask [2, 36]: row 0 all real; row 1 left-padded by 5 and with 3
    padding tokens at the start of its second turn (positions 20-22), as in a
    batch of chats whose turns differ in length."""
    ids = torch.randint(1, TINY["vocab_size"], (B, L), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :5] = 0
    mask[1, 20:23] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _expected_rows(m, ids, mask):
    """Per row, the oracle's logits at its real positions."""
    m64 = copy.deepcopy(m).double()
    return [oracle_logits(m64, ids[b][mask[b] == 1][None])[0].float() for b in range(B)]


def _at_real_positions(logits, mask):
    return [logits[b][mask[b] == 1] for b in range(B)]


@pytest.mark.parametrize("masks", ["always", "only-when-padded"])
@pytest.mark.parametrize("dms", [dict(dms_separate_alpha=True), dict(dms_separate_alpha=False)],
                         ids=["separate", "borrowed"])
def test_manual_turns_equal_one_prefill_and_the_oracle(masks, dms):
    """Hand-written prefill → decode → new turn → decode, each call with the
    mask of cached + new tokens, or with none where the new tokens hold no
    padding: each row's logits are those of its real tokens alone."""
    m = _model(**dms).eval()
    ids, mask = _padded_batch()
    expected = _expected_rows(m, ids, mask)
    with torch.no_grad():
        whole = m(ids, attention_mask=mask).logits
        cache = m.get_cache()
        pieces = []
        for t0, t1 in TURNS:
            padded = bool((mask[:, t0:t1] == 0).any())
            kwargs = dict(attention_mask=mask[:, :t1]) if masks == "always" or padded else {}
            pieces.append(m(ids[:, t0:t1], cache=cache, **kwargs).logits)
    turns = torch.cat(pieces, 1)
    for b, (got_whole, got_turns) in enumerate(zip(_at_real_positions(whole, mask), _at_real_positions(turns, mask))):
        torch.testing.assert_close(got_whole, expected[b], rtol=1e-4, atol=1e-4, msg=lambda t: f"row {b}: {t}")
        torch.testing.assert_close(got_turns, expected[b], rtol=1e-4, atol=1e-4, msg=lambda t: f"row {b}: {t}")
    assert cache.get_seq_length() == L and cache.compression_ratio() > 1.2
    assert cache.sequence_lengths().tolist() == mask.sum(1).tolist()


def test_generate_continues_each_row_from_its_real_tokens():
    """generate after a hand-made left-padded prefill on the same cache, and a
    second turn through generate: the tokens of each row alone."""
    m = _model(dms_separate_alpha=True).eval()
    ids, mask = _padded_batch()
    ids, mask = ids[:, :20], mask[:, :20]  # left padding only
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        together = m.generate(ids, attention_mask=mask, **kwargs)[:, 20:]
        alone = [m.generate(ids[b][mask[b] == 1][None], **kwargs)[0, -5:] for b in range(B)]
    assert torch.equal(together, torch.stack(alone))


def test_a_mask_of_the_new_tokens_only_is_refused():
    m = _model(dms_separate_alpha=True).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 12))
    cache = m.get_cache()
    with torch.no_grad():
        m(ids[:, :10], cache=cache, attention_mask=torch.ones(2, 10, dtype=torch.long))
        before = cache.get_seq_length()
        with pytest.raises(ValueError, match=r"^attention_mask: expected \[batch, cached \+ new tokens\] = \[2, 11\] "
                                             r"\(Hugging Face's convention.*got \(2, 1\)"):
            m(ids[:, 10:11], cache=cache, attention_mask=torch.ones(2, 1, dtype=torch.long))
    assert cache.get_seq_length() == before


def test_a_reset_cache_takes_any_batch_size():
    m = _model(dms_separate_alpha=True).eval()
    ids = torch.randint(0, TINY["vocab_size"], (3, 20))
    cache = m.get_cache()
    with torch.no_grad():
        m(ids[:2], cache=cache)
        cache.reset()
        got = m(ids, cache=cache).logits
        cache.reset()
        one = m(ids[:1], cache=cache).logits
        expected = m(ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one, expected[:1], rtol=1e-5, atol=1e-5)
    assert cache.layers[0].paged.batch_size == 1


def test_layer_mode_training_decisions_agree_across_heads():
    """Training with dms_alpha_per="layer": noise is drawn per head, then head
    0's noised logit decides for every head (the reference's order)."""
    m = _model(dms_separate_alpha=True, dms_alpha_per="layer").train()
    ids = torch.randint(0, TINY["vocab_size"], (2, 30))
    counters = dict(seed=3, process_index=0, accum_step=0, global_step=5)
    with torch.no_grad():
        decisions = m.model(ids, use_cache=False, dms_noise_counters=counters).dms_decisions  # [layers, B, H, T]
    assert torch.equal(decisions, decisions[:, :, :1].expand_as(decisions))
    # Head 0's own decision: its logit plus its own noise.
    x = m.model.embed_tokens(ids)
    attn = m.model.layers[0].self_attn
    z = oracle.decision_logits_separate(x, attn.dms_proj_alpha_norm.weight, attn.dms_proj_alpha.weight,
                                        scale=m.config.dms_alpha_scale, offset=m.config.dms_initial_alpha_offset,
                                        eps=m.config.rms_norm_eps)
    noise = ops.logistic_noise(torch.empty(z.shape), seed=3, process_index=0, accum_step=0, global_step=5)
    a = oracle.gate(z, noise.double(), m.config.dms_tau)[2]
    assert torch.equal(decisions[0].double(), oracle.per_layer(a))
    assert 0 < float(a[:, 1:].ne(a[:, :1]).double().mean())  # heads would disagree without the rule
