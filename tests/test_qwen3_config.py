"""`Qwen3ConfigDMS`: SPEC defaults, round trips through save_pretrained, a
config.json written by the reference implementation, and invalid values
rejected with the field named."""

import json

import pytest

from dms.models.qwen3 import Qwen3ConfigDMS

TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=128)


def test_spec_defaults():
    c = Qwen3ConfigDMS(**TINY)
    assert (c.dms_window_size, c.dms_paged_attention_block_size) == (512, 256)
    assert (c.dms_alpha_scale, c.dms_initial_alpha_offset, c.dms_tau) == (100.0, 5.0, 0.1)
    assert c.dms_alpha_per == "head" and c.dms_separate_alpha is False and c.dms_disable_eviction is False
    assert c.dms_chunked_prefill is None and c.dms_preallocate_for_tokens == 4096
    assert c.num_key_value_heads == 2  # the Qwen3 fields pass through


def test_round_trip(tmp_path):
    c = Qwen3ConfigDMS(dms_window_size=16, dms_paged_attention_block_size=4, dms_separate_alpha=True,
                       dms_alpha_per="layer", dms_chunked_prefill=32, **TINY)
    c.save_pretrained(tmp_path)
    back = Qwen3ConfigDMS.from_pretrained(tmp_path)
    for key in ("dms_window_size", "dms_paged_attention_block_size", "dms_separate_alpha", "dms_alpha_per",
                "dms_chunked_prefill", "hidden_size"):
        assert getattr(back, key) == getattr(c, key), key


def test_reference_config_json_loads(tmp_path):
    """The fields SPEC §7 lists, as the reference writes them."""
    ref = {**TINY, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLMDMS"], "dms_alpha_scale": 100.0,
           "dms_initial_alpha_offset": 5.0, "dms_window_size": 512, "dms_paged_attention_block_size": 256,
           "dms_cr": 8, "dms_disable_eviction": False, "dms_separate_alpha": True, "dms_alpha_per": "head",
           "dms_tau": 0.1, "dms_compile_limit": 72, "dms_manual_inference_mode": False,
           "dms_chunked_prefill": None, "dms_preallocate_for_tokens": 4096}
    (tmp_path / "config.json").write_text(json.dumps(ref))
    c = Qwen3ConfigDMS.from_pretrained(tmp_path)
    assert c.dms_separate_alpha is True and c.dms_cr == 8 and c.dms_compile_limit == 72


@pytest.mark.parametrize("override, field", [
    (dict(dms_window_size=256), "dms_window_size"),
    (dict(dms_window_size=100, dms_paged_attention_block_size=128), "dms_window_size"),
    (dict(dms_paged_attention_block_size=0), "dms_paged_attention_block_size"),
    (dict(dms_paged_attention_block_size=-4), "dms_paged_attention_block_size"),
    (dict(dms_alpha_per="token"), "dms_alpha_per"),
    (dict(dms_tau=0.0), "dms_tau"),
    (dict(dms_tau=float("nan")), "dms_tau"),
    (dict(dms_alpha_scale=float("inf")), "dms_alpha_scale"),
    (dict(dms_chunked_prefill=0), "dms_chunked_prefill"),
    (dict(dms_preallocate_for_tokens=-1), "dms_preallocate_for_tokens"),
    (dict(dms_separate_alpha="yes"), "dms_separate_alpha"),
    (dict(dms_cr=0.5), "dms_cr"),
    (dict(dms_compile_limit=0), "dms_compile_limit"),
    (dict(dms_kv_cache_dtype="fp8_e4m3fn"), "dms_kv_cache_dtype"),
    (dict(dms_kv_cache_dtype=None), "dms_kv_cache_dtype"),
])
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        Qwen3ConfigDMS(**{**TINY, **override})


@pytest.mark.parametrize("overrides, message", [
    (dict(dms_window_size=0), r"^dms_window_size: expected an int larger than dms_paged_attention_block_size \(4\)"),
    (dict(dms_window_size=3), r"^dms_window_size: expected an int larger than"),
    (dict(dms_alpha_per="token"), r"^dms_alpha_per: expected 'head' or 'layer', got 'token'"),
    (dict(dms_chunked_prefill=-1), r"^dms_chunked_prefill: expected None or an int >= 1, got -1"),
    (dict(dms_windowsize=64), r"^dms_windowsize: not a DMS field; did you mean dms_window_size\?"),
    (dict(dms_tau="0.1"), r"^dms_tau: expected a finite temperature > 0"),
    (dict(dms_kv_cache_dtype="int8"), r"^dms_kv_cache_dtype: expected one of 'auto', 'fp8', 'fp8_e4m3', 'fp8_e5m2', "
                                      r"got 'int8'"),
])
def test_overrides_given_to_from_pretrained_are_validated(tmp_path, overrides, message):
    """The path of lm-eval's --model_args and ARCHITECTURE.md's
    from_pretrained(path, **overrides): checked like the constructor's."""
    from dms import Qwen3ForCausalLMDMS

    Qwen3ConfigDMS(dms_window_size=16, dms_paged_attention_block_size=4, **TINY).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        Qwen3ConfigDMS.from_pretrained(tmp_path, **overrides)
    with pytest.raises(ValueError, match=message):
        Qwen3ForCausalLMDMS.from_pretrained(tmp_path, **overrides)
    assert Qwen3ConfigDMS.from_pretrained(tmp_path, dms_window_size=32).dms_window_size == 32
