"""Every family DMS supports besides Qwen3 (Llama, Qwen2, Mistral,
Qwen3-MoE), on tiny random configs built here: with eviction off (fresh
adapters) the model is transformers' own class of that family; with eviction
on, every turn pattern (prefill, chunked prefill, decode, new turn, left-padded
batch, beam search) and the training forward and adapter gradients equal the
float64 oracle of test_qwen3_oracle; save_pretrained → AutoModelForCausalLM
with trust_remote_code in a fresh process gives the same logits;
AutoModelForCausalLMDMS picks the family from model_type."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import dms
from dms import (
    AutoModelForCausalLMDMS,
    LlamaConfigDMS,
    LlamaForCausalLMDMS,
    MistralConfigDMS,
    MistralForCausalLMDMS,
    Qwen2ConfigDMS,
    Qwen2ForCausalLMDMS,
    Qwen3ForCausalLMDMS,
    Qwen3MoeConfigDMS,
    Qwen3MoeForCausalLMDMS,
    ops,
)

from .test_qwen3_model import _beam_search_by_hand
from .test_qwen3_oracle import oracle_logits

TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=8,
            num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=512)

# family: (DMS config, DMS model, transformers config, transformers model, what makes the tiny
# config exercise the family: biases and Llama 3's RoPE scaling, Qwen2's q/k/v biases, Mistral
# without its window, Qwen3-MoE with a sparse and a dense layer)
FAMILIES = {
    "llama": (LlamaConfigDMS, LlamaForCausalLMDMS, LlamaConfig, LlamaForCausalLM,
              dict(attention_bias=True, rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                             low_freq_factor=1.0, high_freq_factor=4.0,
                                                             original_max_position_embeddings=64))),
    "qwen2": (Qwen2ConfigDMS, Qwen2ForCausalLMDMS, Qwen2Config, Qwen2ForCausalLM, {}),
    "mistral": (MistralConfigDMS, MistralForCausalLMDMS, MistralConfig, MistralForCausalLM, dict(sliding_window=None)),
    "qwen3_moe": (Qwen3MoeConfigDMS, Qwen3MoeForCausalLMDMS, Qwen3MoeConfig, Qwen3MoeForCausalLM,
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                       mlp_only_layers=[1])),
}
NAMES = list(FAMILIES)
MODES = [dict(dms_separate_alpha=True), dict(dms_separate_alpha=True, dms_alpha_per="layer"),
         dict(dms_separate_alpha=False)]
MODE_IDS = ["separate-head", "separate-layer", "borrowed-head"]


def _fields(family):
    return {**TINY, **FAMILIES[family][4]}


def _model(family, seed=0, sizes=None, **dms_fields):
    """The tiny DMS model of `family` (`sizes` overrides its config fields)
    with random adapters (or borrowed neurons) that evict a real fraction of
    tokens (scale 1, offset 0)."""
    config_class, model_class = FAMILIES[family][:2]
    torch.manual_seed(seed)
    fields = {**dict(dms_window_size=5, dms_paged_attention_block_size=2, dms_alpha_scale=1.0,
                     dms_initial_alpha_offset=0.0), **dms_fields}
    m = model_class(config_class(**fields, **{**_fields(family), **(sizes or {})}))
    with torch.no_grad():
        for layer in m.model.layers:
            attn = layer.self_attn
            if m.config.dms_separate_alpha:
                torch.nn.init.normal_(attn.dms_proj_alpha.weight, std=0.5)
                torch.nn.init.normal_(attn.dms_proj_alpha_norm.weight, mean=1.0, std=0.2)
                if attn.dms_proj_alpha.bias is not None:
                    torch.nn.init.normal_(attn.dms_proj_alpha.bias, std=0.1)
            elif getattr(attn, "q_norm", None) is not None:  # the borrowed neuron after the q-norm
                torch.nn.init.normal_(attn.q_norm.weight, mean=1.0, std=0.5)
            else:  # no q-norm: the borrowed neuron is a q_proj output; make it a usable logit
                group = m.config.num_attention_heads // m.config.num_key_value_heads
                rows = [h * group * attn.head_dim + attn.head_dim - 1 for h in range(m.config.num_key_value_heads)]
                attn.q_proj.weight[rows] *= 20
    return m


def test_every_family_is_exported_and_registered():
    for family, (config_class, model_class, *_) in FAMILIES.items():
        assert config_class.model_type == f"{family}_dms" and config_class.base_model_type == family
        assert getattr(dms, model_class.__name__) is model_class
        assert dms.models.dms_class_for(family) is model_class
        assert dms.models.dms_class_for(f"{family}_dms") is model_class
        assert model_class.model_class.__name__ == model_class.__name__.replace("ForCausalLM", "Model")
    assert dms.models.dms_class_for("qwen3") is Qwen3ForCausalLMDMS


@pytest.mark.parametrize("family", NAMES + ["qwen3"])
def test_the_unsplittable_unit_is_the_dms_decoder_layer(family):
    """FSDP's auto-wrap and device_map find the layer class by the name in
    _no_split_modules: it must be the DMS layer the model contains."""
    from accelerate.utils.dataclasses import get_module_class_from_name

    if family == "qwen3":
        from dms import Qwen3ConfigDMS

        m = Qwen3ForCausalLMDMS(Qwen3ConfigDMS(dms_window_size=4, dms_paged_attention_block_size=2, **TINY))
    else:
        m = _model(family)
    for model in (m, m.model):
        found = {get_module_class_from_name(model, name) for name in model._no_split_modules} - {None}
        assert found == {type(m.model.layers[0])}, model._no_split_modules


@pytest.mark.parametrize("family", NAMES)
def test_eviction_off_is_transformers_own_class(family):
    """Fresh adapters keep every token: the same logits and greedy tokens as
    transformers' class of the family with the same weights."""
    config_class, model_class, hf_config, hf_model, extra = FAMILIES[family]
    torch.manual_seed(0)
    m = model_class(config_class(dms_separate_alpha=True, dms_window_size=4, dms_paged_attention_block_size=2,
                                 **_fields(family))).eval()
    m.reset_dms_adapters()
    ref = hf_model(hf_config(**_fields(family))).eval()
    result = ref.load_state_dict(m.state_dict(), strict=False)
    assert not result.missing_keys
    adapters = 2 * TINY["num_hidden_layers"] + (TINY["num_hidden_layers"] if m.config.dms_separate_alpha and getattr(
        m.config, "attention_bias", False) else 0)
    assert all("dms_proj_alpha" in k for k in result.unexpected_keys) and len(result.unexpected_keys) == adapters
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
        ours = m.generate(ids[:, :10], max_new_tokens=8, do_sample=False)
        theirs = ref.generate(ids[:, :10], max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dms_fields", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("family", NAMES)
def test_every_step_of_a_multi_turn_run_equals_the_oracle(family, dms_fields):
    """Chunked prefill, decode, a new turn after decode, decode again: every
    step's logits are the float64 oracle's over the whole sequence."""
    m = _model(family, dms_chunked_prefill=4, **dms_fields).eval()
    ids = torch.randint(0, 128, (2, 36))
    expected = oracle_logits(copy.deepcopy(m).double(), ids).float()
    steps = [(0, 11)] + [(t, t + 1) for t in range(11, 20)] + [(20, 29)] + [(t, t + 1) for t in range(29, 36)]
    with torch.no_grad():
        cache = m.get_cache()
        for t0, t1 in steps:
            got = m(ids[:, t0:t1], cache=cache).logits
            torch.testing.assert_close(got, expected[:, t0:t1], rtol=1e-4, atol=1e-4,
                                       msg=lambda text: f"tokens {t0}:{t1}: {text}")
        whole = m(ids, use_cache=False).logits  # one prefill without a cache: the same
    torch.testing.assert_close(whole, expected, rtol=1e-4, atol=1e-4)
    assert cache.compression_ratio() > 1.2  # the run really evicted


@pytest.mark.parametrize("family", NAMES)
def test_left_padded_batch_equals_the_oracle_per_row(family):
    """A batch whose second row is left-padded and has padding at the start
    of its second turn: each row's logits are the oracle's over its real
    tokens alone, whole or turn by turn."""
    m = _model(family, dms_separate_alpha=True).eval()
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
    assert cache.sequence_lengths().tolist() == mask.sum(1).tolist()


@pytest.mark.parametrize("family", NAMES)
def test_beam_search_matches_a_search_over_single_row_forwards(family):
    m = _model(family, dms_separate_alpha=True).eval()
    m.generation_config.eos_token_id = None  # every beam runs the full length
    ids = torch.randint(1, 128, (2, 9))
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0,
                         length_penalty=0.0, output_scores=True, return_dict_in_generate=True)
    for row in range(2):
        score, best = _beam_search_by_hand(m, ids[row], beams=3, steps=4)
        assert torch.equal(out.sequences[row], best)
        assert float(out.sequences_scores[row]) == pytest.approx(score, rel=1e-4)


@pytest.mark.parametrize("dms_fields", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("family", NAMES)
def test_training_forward_and_decision_gradients_equal_the_oracle(family, dms_fields):
    m = _model(family, **dms_fields).train()
    ids = torch.randint(0, 128, (2, 24))
    counters = dict(seed=7, process_index=0, accum_step=1, global_step=3)
    out = m(ids, labels=ids, dms_noise_counters=counters)
    shape = (2, TINY["num_key_value_heads"], 24)
    noise = [ops.logistic_noise(torch.empty(shape), seed=7 + i, process_index=0, accum_step=1, global_step=3)
             for i in range(TINY["num_hidden_layers"])]
    ref = copy.deepcopy(m).double()
    expected = oracle_logits(ref, ids, noise)
    torch.testing.assert_close(out.logits, expected.float(), rtol=1e-4, atol=1e-4)
    out.loss.backward()
    loss64 = torch.nn.functional.cross_entropy(expected[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    loss64.backward()
    # What decides: the adapter, or the borrowed neuron's source (the q-norm, else the query projection).
    if dms_fields["dms_separate_alpha"]:
        trainable = "dms_proj_alpha"
    else:
        trainable = "q_norm" if getattr(m.model.layers[0].self_attn, "q_norm", None) is not None else "q_proj"
    ours = [p.grad for name, p in m.named_parameters() if trainable in name]
    theirs = [p.grad for name, p in ref.named_parameters() if trainable in name]
    assert ours and len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert float(b.abs().max()) > 0
        torch.testing.assert_close(a.double(), b, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("family", NAMES)
def test_save_then_trust_remote_code_load_in_a_fresh_process(family, tmp_path):
    m = _model(family, dms_separate_alpha=True).eval()
    save = tmp_path / "model"
    m.save_pretrained(save)
    cfg = json.loads((save / "config.json").read_text())
    assert cfg["model_type"] == f"{family}_dms"
    cls = type(m).__name__
    assert cfg["auto_map"]["AutoModelForCausalLM"] == f"modeling_{family}_dms.{cls}"
    assert (save / f"modeling_{family}_dms.py").exists() and (save / f"configuration_{family}_dms.py").exists()
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        want = m(ids).logits
    torch.save({"ids": ids, "want": want}, tmp_path / "io.pt")
    code = f"""
import torch
from transformers import AutoModelForCausalLM
io = torch.load({str(tmp_path / 'io.pt')!r})
m = AutoModelForCausalLM.from_pretrained({str(save)!r}, trust_remote_code=True).eval()
assert type(m).__name__ == {cls!r} and type(m).__module__.startswith("dms.models."), type(m)
with torch.no_grad():
    torch.testing.assert_close(m(io["ids"]).logits, io["want"], rtol=0, atol=0)
print("remote ok")
"""
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0 and "remote ok" in run.stdout, run.stderr[-3000:]
    back = AutoModelForCausalLM.from_pretrained(save).eval()  # dms imported here: no remote code needed
    assert type(back) is type(m)


@pytest.mark.parametrize("family", NAMES)
def test_auto_model_loads_plain_and_dms_checkpoints(family, tmp_path):
    """A plain checkpoint of the family gets fresh adapters that keep every
    token (its logits unchanged); a DMS directory loads as trained."""
    _, model_class, hf_config, hf_model, _ = FAMILIES[family]
    torch.manual_seed(3)
    plain = hf_model(hf_config(**_fields(family))).eval()
    plain.save_pretrained(tmp_path / "plain")
    m = AutoModelForCausalLMDMS.from_pretrained(tmp_path / "plain", dms_window_size=4,
                                                dms_paged_attention_block_size=2).eval()
    assert type(m) is model_class and m.config.dms_separate_alpha is True and m.config.dms_window_size == 4
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        out = m(ids)
        torch.testing.assert_close(out.logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    assert out.compression_ratio == 1.0

    trained = _model(family, dms_separate_alpha=True).eval()
    trained.save_pretrained(tmp_path / "dms")
    back = AutoModelForCausalLMDMS.from_pretrained(tmp_path / "dms").eval()
    assert type(back) is model_class
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, trained(ids).logits, rtol=0, atol=0)

    fresh = AutoModelForCausalLMDMS.from_config(hf_config(**_fields(family)), dms_window_size=8,
                                             dms_paged_attention_block_size=4)
    assert type(fresh) is model_class and fresh.config.dms_separate_alpha is True
    assert fresh.config.dms_window_size == 8


def test_unsupported_model_types_are_refused_with_the_supported_list(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"model_type: expected one of .*llama.*qwen3_moe.*got 'gpt2'"):
        AutoModelForCausalLMDMS.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="from_pretrained"):
        AutoModelForCausalLMDMS()


@pytest.mark.parametrize("family", NAMES)
@pytest.mark.parametrize("override, field", [(dict(dms_window_size=2), "dms_window_size"),
                                             (dict(dms_alpha_per="token"), "dms_alpha_per"),
                                             (dict(dms_tau=0.0), "dms_tau")])
def test_invalid_dms_fields_name_the_field(family, override, field):
    config_class = FAMILIES[family][0]
    fields = dict(dms_window_size=4, dms_paged_attention_block_size=2, **_fields(family))
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        config_class(**{**fields, **override})


def test_sliding_window_models_are_refused_unless_the_window_is_dropped(tmp_path):
    """DMS attention has no sliding window of its own: Mistral-7B-v0.1's
    4096-token window is refused, by name, until it is set to None."""
    fields = {**TINY, "sliding_window": 4096}
    with pytest.raises(ValueError, match=r"^sliding_window: expected full attention.*4096.*sliding_window=None"):
        MistralForCausalLMDMS(MistralConfigDMS(**fields))
    MistralForCausalLM(MistralConfig(**fields)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="^sliding_window"):
        AutoModelForCausalLMDMS.from_pretrained(tmp_path)
    m = AutoModelForCausalLMDMS.from_pretrained(tmp_path, sliding_window=None)
    assert type(m) is MistralForCausalLMDMS and m.config.sliding_window is None
    with pytest.raises(ValueError, match=r"layer_types.*sliding_attention.*full_attention"):
        Qwen2ForCausalLMDMS(Qwen2ConfigDMS(**TINY, use_sliding_window=True, sliding_window=16, max_window_layers=0))


def test_moe_router_logits_are_refused():
    m = _model("qwen3_moe", dms_separate_alpha=True).eval()
    with pytest.raises(ValueError, match="^output_router_logits"):
        m(torch.randint(0, 128, (1, 4)), output_router_logits=True)


@pytest.mark.parametrize("head", ["SequenceClassification", "TokenClassification", "QuestionAnswering"])
@pytest.mark.parametrize("family", NAMES)
def test_task_heads_with_fresh_adapters_match_transformers(family, head):
    import importlib

    import transformers

    config_class, model_class, hf_config = FAMILIES[family][:3]
    prefix = model_class.__name__[:-len("ForCausalLMDMS")]
    ours_cls = getattr(importlib.import_module(f"dms.models.{family}"), f"{prefix}For{head}DMS")
    theirs_cls = getattr(transformers, f"{prefix}For{head}")
    torch.manual_seed(0)
    extra = dict(num_labels=3, pad_token_id=0)
    ours = ours_cls(config_class(dms_window_size=4, dms_paged_attention_block_size=2, dms_separate_alpha=True,
                                 **extra, **_fields(family))).eval()
    assert type(getattr(ours, ours.base_model_prefix)) is model_class.model_class
    theirs = theirs_cls(hf_config(**extra, **_fields(family))).eval()
    theirs.load_state_dict(ours.state_dict(), strict=False)
    ids = torch.randint(1, 128, (2, 12))
    with torch.no_grad():
        a, b = ours(ids), theirs(ids)
    key = "start_logits" if head == "QuestionAnswering" else "logits"
    torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=1e-5, atol=1e-5)


# The same on a GPU (skipped without one; scripts/gpu_check.sh runs the cuda marker): the CUDA
# engine gives every family what the CPU engine gives.

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", NAMES)
def test_cuda_model_matches_cpu_through_every_turn(family, dtype):
    m = _model(family, dms_separate_alpha=True).eval()
    ids = torch.randint(0, 128, (2, 40))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)

    def turns(model, device):
        x = ids.to(device)
        with torch.no_grad():
            cache = model.get_cache()
            pieces = [model(x[:, :12], cache=cache).logits]
            pieces += [model(x[:, t:t + 1], cache=cache).logits for t in range(12, 25)]
            pieces.append(model(x[:, 25:33], cache=cache).logits)
            pieces += [model(x[:, t:t + 1], cache=cache).logits for t in range(33, 40)]
        return torch.cat(pieces, 1).float().cpu(), cache.compression_ratios()

    cpu_logits, cpu_ratios = turns(m.to(dtype), "cpu")
    gpu_logits, gpu_ratios = turns(m.to("cuda"), "cuda")
    torch.testing.assert_close(gpu_logits, cpu_logits, **tol)
    if dtype == torch.float32:
        assert gpu_ratios == pytest.approx(cpu_ratios)


@pytest.mark.cuda
@pytest.mark.parametrize("dms_fields", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("family", NAMES)
def test_cuda_training_step_matches_cpu(family, dms_fields):
    ids = torch.randint(0, 128, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :4] = 0
    grads = []
    trainable = "dms_proj_alpha" if dms_fields["dms_separate_alpha"] else "q_"
    for device in ("cpu", "cuda"):
        m = _model(family, **dms_fields).train().to(device)
        out = m(ids.to(device), attention_mask=mask.to(device), labels=ids.to(device),
                dms_noise_counters={"global_step": 3}, dms_target=0.5)
        (out.loss + out.compression_loss).backward()
        grads.append(torch.cat([p.grad.flatten().cpu() for name, p in m.named_parameters()
                                if trainable in name and p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("family, dms_fields", [(name, {}) for name in ("llama", "qwen2", "mistral")]
                         + [("llama", dict(dms_decision_target="current"))], ids=["llama", "qwen2", "mistral",
                                                                                  "llama-current"])
def test_a_training_step_is_one_graph(family, dms_fields):
    """torch.compile traces every family's training step whole, as it does
    Qwen3's (tests/test_compile.py). Qwen3-MoE is left out: transformers'
    own expert loop depends on the routing (it graph-breaks without DMS too)."""
    torch._dynamo.reset()
    m = _model(family, dms_separate_alpha=True, **dms_fields).train()
    ids = torch.randint(0, 128, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :3] = 0

    def step(ids, mask):
        out = m(input_ids=ids, attention_mask=mask, labels=ids, dms_target=0.5, dms_noise_counters={"seed": 1})
        return out.loss + out.compression_loss

    explained = torch._dynamo.explain(step)(ids, mask)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_a_family_class_refuses_another_familys_checkpoint(tmp_path):
    _model("llama", dms_separate_alpha=True).save_pretrained(tmp_path / "llama")
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(tmp_path / "plain")
    for path, found in ((tmp_path / "llama", "llama_dms"), (tmp_path / "plain", "llama")):
        with pytest.raises(ValueError, match=f"^model_type: Qwen3ConfigDMS reads 'qwen3' and 'qwen3_dms' "
                                             f"checkpoints, this one is '{found}'.*AutoModelForCausalLMDMS"):
            Qwen3ForCausalLMDMS.from_pretrained(path)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_lm_eval_and_viz_run_on_a_saved_family_directory(family, tmp_path):
    """The evaluation path of the README (scripts/evaluate.sh: lm-eval's hf
    model with trust_remote_code, the offline dms_recall task, the
    compression tally) and dms.viz's report, on another family than Qwen3."""
    from dms.models.modeling_dms import cache_kwargs
    from dms.tiny import tiny_tokenizer
    from dms.viz import compression_report

    tok = tiny_tokenizer()
    model = _model(family, sizes=dict(vocab_size=-(-len(tok) // 64) * 64, max_position_embeddings=1024),
                   dms_separate_alpha=True, dms_window_size=16, dms_paged_attention_block_size=8).eval()
    path = str(tmp_path / family)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    ids = torch.tensor([tok("The code of vup is 41. " * 12, add_special_tokens=False)["input_ids"]])
    cache = model.get_cache()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id, **cache_kwargs(cache))
    report = compression_report(cache)
    assert f"{model.config.num_hidden_layers} layers" in report and cache.compression_ratio() > 1.2
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MAX_SEQ_LENGTHS="300", BATCH_SIZE="2", CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable,
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    env.pop("DEVICE", None)
    run = subprocess.run(["bash", os.path.join(root, "scripts", "evaluate.sh"), path, "dms_recall", "--limit", "2"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    import glob

    [results_path] = glob.glob(os.path.join(path, "eval_results", "*", "results_*.json"))
    with open(results_path) as f:
        results = json.load(f)
    assert 0.0 <= results["results"]["dms_recall"]["exact_match,none"] <= 1.0
    assert results["dms_compression"]["compression_ratio"] > 1.2  # the family's DMS caches held the prompts


@pytest.mark.parametrize("family", NAMES)
def test_bf16_autocast_trains_and_decodes(family):
    """Under torch.autocast (the trainer's `bf16: true`) the projections give
    bfloat16 while a q/k norm with float32 weights gives float32: attention
    gets one dtype, the training step's adapter gradients follow the float32
    ones, and eval-mode generate runs on a bfloat16 cache."""
    m = _model(family, dms_separate_alpha=True)
    ids = torch.randint(0, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(6))
    grads = {}
    for autocast in (False, True):
        m.zero_grad()
        m.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = m(ids, labels=ids).loss
        loss.backward()
        grads[autocast] = torch.cat([p.grad.flatten() for n, p in m.named_parameters() if "dms_proj_alpha" in n])
    assert torch.isfinite(grads[True]).all() and grads[True].abs().sum() > 0
    assert torch.nn.functional.cosine_similarity(grads[True], grads[False], dim=0) > 0.95
    m.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = m.get_cache()
        m.generate(ids[:1], max_new_tokens=3, do_sample=False, **dms.models.modeling_dms.cache_kwargs(cache))
    assert cache.layers[0].paged.dtype == torch.bfloat16
