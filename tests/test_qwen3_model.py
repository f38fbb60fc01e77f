"""`Qwen3ForCausalLMDMS` on a tiny random Qwen3: with fresh adapters it is
transformers' Qwen3 exactly; with evictions, decoding through the cache gives
the logits of one forward over the whole sequence; generate works with left
padding; training mode trains the adapters."""

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from dms import Qwen3ConfigDMS, Qwen3ForCausalLMDMS

TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=512)


def _model(seed=0, **dms):
    torch.manual_seed(seed)
    cfg = Qwen3ConfigDMS(**{"dms_window_size": 4, "dms_paged_attention_block_size": 2, **dms, **TINY})
    return Qwen3ForCausalLMDMS(cfg).eval()


def _evicting(**dms):
    """Random adapters that evict a real fraction of tokens (offset 0, scale 1);
    a fresh model's adapters are zero and keep everything."""
    m = _model(dms_separate_alpha=True, dms_initial_alpha_offset=0.0, dms_alpha_scale=1.0, **dms)
    with torch.no_grad():
        for layer in m.model.layers:
            torch.nn.init.normal_(layer.self_attn.dms_proj_alpha.weight, std=0.5)
    return m


def test_fresh_adapters_are_plain_qwen3():
    m = _model(dms_separate_alpha=True)
    m.reset_dms_adapters()
    ref = Qwen3ForCausalLM(Qwen3Config(**TINY)).eval()
    result = ref.load_state_dict(m.state_dict(), strict=False)
    assert not result.missing_keys
    assert all("dms_proj_alpha" in k for k in result.unexpected_keys) and len(result.unexpected_keys) == 4
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
        ours = m.generate(ids[:, :10], max_new_tokens=8, do_sample=False)
        theirs = ref.generate(ids[:, :10], max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dms", [dict(), dict(dms_alpha_per="layer")])
def test_cached_turns_equal_one_forward(dms):
    """Prefill, decode steps, then a new turn (prefill after decode): the same
    logits as one uncached forward over everything, while evicting."""
    m = _evicting(**dms)
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        full = m(ids, use_cache=False).logits
        cache = m.get_cache()
        pieces = [m(ids[:, :12], cache=cache).logits]
        pieces += [m(ids[:, t:t + 1], cache=cache).logits for t in range(12, 25)]
        pieces.append(m(ids[:, 25:33], cache=cache).logits)  # the next turn
        pieces += [m(ids[:, t:t + 1], cache=cache).logits for t in range(33, 40)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-5)
    ratios = cache.compression_ratios()
    assert len(ratios) == 2 and min(ratios) > 1.2
    assert cache.get_seq_length() == 40


def test_chunked_prefill_equals_one_prefill():
    m = _evicting()
    ids = torch.randint(0, 128, (2, 50))
    with torch.no_grad():
        whole = m(ids)
        m.config.dms_chunked_prefill = 8
        chunked = m(ids)
    torch.testing.assert_close(chunked.logits, whole.logits, rtol=1e-4, atol=1e-5)
    assert chunked.compression_ratios == pytest.approx(whole.compression_ratios)
    assert chunked.compression_ratio > 1.0


def test_borrowed_neuron_decisions():
    m = _model(dms_separate_alpha=False, dms_alpha_scale=1.0, dms_initial_alpha_offset=0.0)
    assert not any("dms_proj_alpha" in k for k in m.state_dict())
    ids = torch.randint(0, 128, (1, 30))
    with torch.no_grad():
        full = m(ids, use_cache=False).logits
        cache = m.get_cache()
        inc = torch.cat([m(ids[:, :10], cache=cache).logits] +
                        [m(ids[:, t:t + 1], cache=cache).logits for t in range(10, 30)], 1)
    torch.testing.assert_close(inc, full, rtol=1e-4, atol=1e-5)
    assert cache.compression_ratio() > 1.0


def test_left_padded_batch_generates_like_single_rows():
    m = _evicting()
    a = torch.randint(1, 128, (1, 12))
    b = torch.randint(1, 128, (1, 7))
    batch = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    batch[1, 5:], mask[1, 5:] = b[0], 1
    with torch.no_grad():
        together = m.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        alone_a = m.generate(a, max_new_tokens=6, do_sample=False, pad_token_id=0)
        alone_b = m.generate(b, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(together[0, 12:], alone_a[0, 12:])
    assert torch.equal(together[1, 12:], alone_b[0, 7:])


def test_training_mode_trains_the_adapters():
    m = _model(dms_separate_alpha=True).train()
    ids = torch.randint(0, 128, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :4] = 0
    out = m(ids, attention_mask=mask, labels=ids, dms_noise_counters={"global_step": 3}, dms_target=0.5)
    assert out.loss.isfinite() and _cache_is_none(out)
    assert out.evicted_fraction.shape == (2,) and out.compression_loss.requires_grad
    (out.loss + out.compression_loss).backward()
    grad = m.model.layers[0].self_attn.dms_proj_alpha.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def _cache_is_none(out):
    return getattr(out, "cache", None) is None and getattr(out, "past_key_values", None) is None


def test_save_and_load(tmp_path):
    m = _evicting()
    m.save_pretrained(tmp_path)
    back = Qwen3ForCausalLMDMS.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, m(ids).logits)
    assert back.config.dms_window_size == 4 and back.config.dms_separate_alpha is True


def test_trust_remote_code_load_in_a_fresh_process(tmp_path):
    """What lm-eval and the notebook do: AutoModelForCausalLM with
    trust_remote_code=True, from another working directory, gets dms's own
    class and the same logits."""
    import json
    import subprocess
    import sys

    m = _evicting()
    save = tmp_path / "model"
    m.save_pretrained(save)
    cfg = json.loads((save / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen3_dms.Qwen3ForCausalLMDMS"
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        want = m(ids).logits
    torch.save({"ids": ids, "want": want}, tmp_path / "io.pt")
    assert cfg["model_type"] == "qwen3_dms"  # never read as a dense "qwen3" (that would drop the adapters)
    code = f"""
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, pipeline
try:  # without dms and without remote code: refused, never a dense Qwen3
    AutoModelForCausalLM.from_pretrained({str(save)!r})
    raise SystemExit("loaded as a dense model")
except ValueError as e:
    assert "trust_remote_code=True" in str(e), e
import dms  # after transformers: the Auto classes learn the type, no remote code needed
io = torch.load({str(tmp_path / 'io.pt')!r})
for kwargs in ({{}}, {{"trust_remote_code": True}}):
    m = AutoModelForCausalLM.from_pretrained({str(save)!r}, **kwargs).eval()
    assert type(m) is dms.Qwen3ForCausalLMDMS, type(m)
    with torch.no_grad():
        torch.testing.assert_close(m(io["ids"]).logits, io["want"])
assert type(AutoModelForSequenceClassification.from_pretrained({str(save)!r})).__name__ == \
    "Qwen3ForSequenceClassificationDMS"
print("remote ok")
"""
    env = {k: v for k, v in __import__("os").environ.items()}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0 and "remote ok" in run.stdout, run.stderr[-3000:]


def _beam_search_by_hand(m, prompt, beams, steps):
    """Beam search where every candidate is scored by one uncached forward
    of its whole sequence (no cache reordering anywhere)."""
    live = [(0.0, prompt)]
    for _ in range(steps):
        candidates = []
        for score, seq in live:
            with torch.no_grad():
                logp = torch.log_softmax(m(seq[None], use_cache=False).logits[0, -1].double(), -1)
            top = torch.topk(logp, beams)
            candidates += [(score + float(lp), torch.cat([seq, tok.view(1)])) for lp, tok in zip(*top)]
        live = sorted(candidates, key=lambda c: -c[0])[:beams]
    return live[0]


def test_beam_search_matches_a_search_over_single_row_forwards():
    m = _evicting()
    m.generation_config.eos_token_id = None  # every beam runs the full length
    ids = torch.randint(1, 128, (2, 9))
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0,
                         length_penalty=0.0, output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 14)
    for row in range(2):
        score, best = _beam_search_by_hand(m, ids[row], beams=3, steps=5)
        assert torch.equal(out.sequences[row], best)
        assert float(out.sequences_scores[row]) == pytest.approx(score, rel=1e-4)


def test_multiple_sequences_per_prompt():
    m = _evicting()
    ids = torch.randint(1, 128, (2, 9))
    with torch.no_grad():
        samples = m.generate(ids, max_new_tokens=5, do_sample=True, num_return_sequences=2, pad_token_id=0)
        # top_k=1 sampling is greedy: each copy of a prompt must decode alone.
        greedy = m.generate(ids, max_new_tokens=5, do_sample=True, top_k=1, num_return_sequences=2, pad_token_id=0)
    assert samples.shape == (4, 14)
    assert torch.equal(samples[::2, :9], ids) and torch.equal(samples[1::2, :9], ids)
    alone = [m.generate(ids[r:r + 1], max_new_tokens=5, do_sample=False, pad_token_id=0) for r in range(2)]
    assert torch.equal(greedy, torch.cat([alone[0], alone[0], alone[1], alone[1]]))


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 128, (2, 16))
    grads = []
    for checkpointing in (False, True):
        m = _model(dms_separate_alpha=True).train()
        if checkpointing:
            m.gradient_checkpointing_enable()
        out = m(ids, labels=ids, dms_target=0.3)
        (out.loss + out.compression_loss).backward()
        grads.append(m.model.layers[1].self_attn.dms_proj_alpha.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("name", ["SequenceClassification", "TokenClassification", "QuestionAnswering"])
def test_task_heads_with_fresh_adapters_match_transformers(name):
    import transformers

    from dms.models import qwen3

    ours_cls = getattr(qwen3, f"Qwen3For{name}DMS")
    theirs_cls = getattr(transformers, f"Qwen3For{name}")
    torch.manual_seed(0)
    extra = dict(num_labels=3, pad_token_id=0)
    ours = ours_cls(Qwen3ConfigDMS(dms_window_size=4, dms_paged_attention_block_size=2, dms_separate_alpha=True,
                                   **extra, **TINY)).eval()
    assert type(getattr(ours, ours.base_model_prefix)).__name__ == "Qwen3ModelDMS"
    theirs = theirs_cls(Qwen3Config(**extra, **TINY)).eval()
    theirs.load_state_dict(ours.state_dict(), strict=False)
    ids = torch.randint(1, 128, (2, 12))
    with torch.no_grad():
        a, b = ours(ids), theirs(ids)
    key = "start_logits" if name == "QuestionAnswering" else "logits"
    torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=1e-5, atol=1e-5)


def _tiny_tokenizer():
    """A word-level tokenizer made in-process (no hub): ids 0..127 as words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w1", pad_token="w0")


def test_streamer_receives_the_generated_tokens():
    from transformers import TextIteratorStreamer

    m = _evicting()
    tok = _tiny_tokenizer()
    ids = tok("w5 w9 w17 w3 w44 w8", return_tensors="pt").input_ids
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=6, do_sample=False, streamer=streamer, pad_token_id=0)
    streamed = "".join(streamer).split()
    assert streamed == tok.decode(out[0, ids.shape[1]:]).split()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_reduced_precision_model_keeps_its_dtype(dtype):
    m = _evicting().to(dtype)
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        out = m(ids)
        cache = m.get_cache()
        inc = torch.cat([m(ids[:, :16], cache=cache).logits] + [m(ids[:, t:t + 1], cache=cache).logits
                                                                for t in range(16, 24)], 1)
    assert out.logits.dtype == dtype and inc.dtype == dtype
    assert cache.layers[0].paged.k_pages.dtype == dtype  # no silent upcast of the cache
    # (Not compared with float32: with these random adapters logits sit near 0,
    # and rounding may flip a decision, which changes what a query sees.)
    torch.testing.assert_close(inc.float(), out.logits.float(), rtol=5e-2, atol=5e-2)


def test_direct_construction_builds_each_layer_once(monkeypatch):
    # A plain Qwen3 body or layer stack built and then replaced would double
    # the peak memory of constructing a large model.
    import transformers.models.qwen3.modeling_qwen3 as hf

    calls = {"layer": 0, "body": 0}
    layer_init, body_init = hf.Qwen3DecoderLayer.__init__, hf.Qwen3Model.__init__

    def count_layer(self, *args, **kwargs):
        calls["layer"] += 1
        layer_init(self, *args, **kwargs)

    def count_body(self, *args, **kwargs):
        calls["body"] += 1
        body_init(self, *args, **kwargs)

    monkeypatch.setattr(hf.Qwen3DecoderLayer, "__init__", count_layer)
    monkeypatch.setattr(hf.Qwen3Model, "__init__", count_body)
    config = Qwen3ConfigDMS(dms_window_size=4, dms_paged_attention_block_size=2, **TINY)
    model = Qwen3ForCausalLMDMS(config)
    assert calls == {"layer": config.num_hidden_layers, "body": 1}
    assert len(model.model.layers) == config.num_hidden_layers == len(config.layer_types)
    assert all(type(layer).__name__ == "Qwen3DecoderLayerDMS" for layer in model.model.layers)


# The whole model on a GPU (skipped without one; scripts/gpu_check.sh runs
# them): the CUDA engine gives what the CPU engine gives.

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_model_matches_cpu_through_every_turn(dtype):
    m = _evicting()
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
    with torch.no_grad():
        full = m(ids.cuda(), use_cache=False).logits.float().cpu()
    torch.testing.assert_close(gpu_logits, full, **tol)


@pytest.mark.cuda
def test_cuda_generate_with_left_padding_matches_cpu():
    m = _evicting()
    batch = torch.randint(1, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    batch[1, :5], mask[1, :5] = 0, 0
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        on_cpu = m.generate(batch, attention_mask=mask, **kwargs)
        m.cuda()
        on_gpu = m.generate(batch.cuda(), attention_mask=mask.cuda(), **kwargs)
    assert torch.equal(on_gpu.cpu(), on_cpu)


@pytest.mark.cuda
def test_cuda_training_step_matches_cpu():
    ids = torch.randint(0, 128, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :4] = 0
    grads = []
    for device in ("cpu", "cuda"):
        m = _model(dms_separate_alpha=True).train().to(device)
        out = m(ids.to(device), attention_mask=mask.to(device), labels=ids.to(device),
                dms_noise_counters={"global_step": 3}, dms_target=0.5)
        (out.loss + out.compression_loss).backward()
        grads.append(torch.cat([layer.self_attn.dms_proj_alpha.weight.grad.flatten().cpu()
                                for layer in m.model.layers]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-5)


def test_bad_inputs_get_clear_errors_and_leave_the_cache_alone():
    from transformers import DynamicCache

    m = _evicting()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        with pytest.raises(TypeError, match="^cache: expected a DMSCache"):
            m(ids, cache=object())
        filled = DynamicCache()
        filled.update(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16), 0)
        for other in (filled, DynamicCache()):  # an empty one too: it would be silently replaced
            with pytest.raises(TypeError, match=r"^cache: expected a DMSCache \(use model.get_cache\(\)\) or None, "
                                                r"got DynamicCache"):
                m(ids, cache=other)

        cache = m.get_cache()
        m(ids, cache=cache)
        before = cache.get_seq_length(), [layer.paged.tokens_stored().clone() for layer in cache.layers]
        with pytest.raises(ValueError, match="^cache: holds 2 sequences, the input has 3"):
            m(torch.randint(0, 128, (3, 1)), cache=cache)
        with pytest.raises(ValueError, match=r"^attention_mask: expected \[batch, cached \+ new tokens\] = \[2, 11\]"):
            m(ids[:, :1], cache=cache, attention_mask=torch.ones(2, 7, dtype=torch.long))
        with pytest.raises(ValueError, match=r"^attention_mask: .* got \(3, 11\)"):
            m(ids[:, :1], cache=cache, attention_mask=torch.ones(3, 11, dtype=torch.long))
        with pytest.raises(ValueError, match=r"^input_ids: 10 cached \+ 503 new positions exceed the model's "
                                             r"max_position_embeddings \(512\)"):
            m(torch.randint(0, 128, (2, 503)), cache=cache)
        assert cache.get_seq_length() == before[0]
        assert all(torch.equal(layer.paged.tokens_stored(), stored) for layer, stored in zip(cache.layers, before[1]))
        m(ids[:, :1], cache=cache, attention_mask=torch.ones(2, 11, dtype=torch.long))  # still usable

        other = _model(dms_separate_alpha=True, dms_window_size=6, dms_paged_attention_block_size=2)
        with pytest.raises(ValueError, match="^cache: its window is 6 tokens, the model's dms_window_size is 4"):
            m(ids, cache=other.get_cache())
        deeper = Qwen3ConfigDMS(**{**TINY, "num_hidden_layers": 3, "dms_window_size": 4,
                                   "dms_paged_attention_block_size": 2})
        with pytest.raises(ValueError, match="^cache: expected a DMSCache for 2 layers .*got one for 3"):
            m(ids, cache=Qwen3ForCausalLMDMS(deeper).get_cache())
        wider = Qwen3ForCausalLMDMS(Qwen3ConfigDMS(**{**TINY, "head_dim": 32, "dms_window_size": 4,
                                                      "dms_paged_attention_block_size": 2})).eval()
        foreign = wider.get_cache()
        wider(ids, cache=foreign)
        with pytest.raises(ValueError, match="^cache: holds 2 KV heads of dim 32, the model has 2 of dim 16"):
            m(ids, cache=foreign)
    with pytest.raises(ValueError, match="^input_ids: 0 cached \\+ 513 new positions"):
        m(torch.randint(0, 128, (1, 513)), use_cache=False)


def test_reference_format_directory_loads_with_its_adapters(tmp_path):
    """A directory as the reference writes it (SPEC §7): its config.json fields
    and one safetensors file of Qwen3 weights plus, per layer,
    dms_proj_alpha.weight [H, hidden] and dms_proj_alpha_norm.weight [hidden]."""
    import json

    from safetensors.torch import save_file

    torch.manual_seed(3)
    weights = Qwen3ForCausalLM(Qwen3Config(**TINY)).state_dict()
    H, hidden = TINY["num_key_value_heads"], TINY["hidden_size"]
    for n in range(TINY["num_hidden_layers"]):
        weights[f"model.layers.{n}.self_attn.dms_proj_alpha.weight"] = torch.randn(H, hidden) * 0.05
        weights[f"model.layers.{n}.self_attn.dms_proj_alpha_norm.weight"] = 1 + 0.1 * torch.randn(hidden)
    weights.pop("lm_head.weight", None)  # tied, as in the small Qwen3 checkpoints
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    config = {**TINY, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLMDMS"], "tie_word_embeddings": True,
              "dms_alpha_scale": 100.0, "dms_initial_alpha_offset": 5.0, "dms_window_size": 6,
              "dms_paged_attention_block_size": 2, "dms_cr": 8, "dms_disable_eviction": False,
              "dms_separate_alpha": True, "dms_alpha_per": "head", "dms_tau": 0.1, "dms_compile_limit": 72,
              "dms_manual_inference_mode": False, "dms_chunked_prefill": None, "dms_preallocate_for_tokens": 4096}
    (tmp_path / "config.json").write_text(json.dumps(config))

    m, info = Qwen3ForCausalLMDMS.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    state = m.state_dict()
    for name, tensor in weights.items():
        assert torch.equal(state[name], tensor), name
    ids = torch.randint(0, 128, (1, 30))
    with torch.no_grad():
        out = m.eval()(ids)
    assert out.compression_ratio > 1.0  # trained-looking adapters evict (scale 100, offset 5)


def test_rows_stop_at_their_own_eos():
    m = _evicting()
    ids = torch.randint(1, 128, (2, 10))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        free = [m.generate(ids[r:r + 1], eos_token_id=None, **kwargs)[0, 10:] for r in range(2)]
        eos = int(free[0][2])  # row 0 stops after its third token
        together = m.generate(ids, eos_token_id=eos, **kwargs)[:, 10:]
    for r in range(2):
        hits = (free[r] == eos).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else 8
        assert torch.equal(together[r, :stop], free[r][:stop])
        assert bool((together[r, stop:] == 0).all())


def test_hidden_states_are_returned_like_transformers_and_attentions_refused():
    m = _model(dms_separate_alpha=True)
    m.reset_dms_adapters()  # fresh adapters: the model is transformers' Qwen3
    ref = Qwen3ForCausalLM(Qwen3Config(**TINY)).eval()
    ref.load_state_dict(m.state_dict(), strict=False)
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        theirs = ref(ids, output_hidden_states=True).hidden_states
        ours = m(ids, output_hidden_states=True).hidden_states
        m.config.dms_chunked_prefill = 7
        chunked = m(ids, output_hidden_states=True).hidden_states
        m.config.dms_chunked_prefill = None
        assert m(ids).hidden_states is None
        gen = m.generate(ids[:, :10], max_new_tokens=3, do_sample=False, output_hidden_states=True,
                         return_dict_in_generate=True)
        with pytest.raises(ValueError, match="^output_attentions: not available from a DMS model"):
            m(ids, output_attentions=True)
    assert len(ours) == len(theirs) == TINY["num_hidden_layers"] + 1
    for a, b, c in zip(ours, theirs, chunked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-5)
    assert len(gen.hidden_states) == 3 and gen.hidden_states[0][0].shape == (2, 10, TINY["hidden_size"])
    assert gen.hidden_states[1][-1].shape == (2, 1, TINY["hidden_size"])


def test_generate_refuses_caches_and_modes_a_dms_cache_cannot_serve():
    from transformers import DynamicCache

    from dms.models.qwen3.modeling_qwen3_dms import cache_kwargs

    m = _evicting()
    ids = torch.randint(1, 128, (1, 12))
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for impl in ("static", "offloaded"):
            with pytest.raises(ValueError, match=f"^cache_implementation='{impl}': a DMS model generates with its own"):
                m.generate(ids, cache_implementation=impl, **kwargs)
        with pytest.raises(ValueError, match="^generate: assisted generation .* is not available with a DMS model"):
            m.generate(ids, prompt_lookup_num_tokens=3, **kwargs)
        with pytest.raises(TypeError, match=r"expected a DMSCache \(use model.get_cache\(\)\), got DynamicCache"):
            m.generate(ids, **cache_kwargs(DynamicCache()), **kwargs)
        cache = m.get_cache()
        out = m.generate(ids, **cache_kwargs(cache), **kwargs)  # the user's DMSCache is the one filled
    assert out.shape[1] == 15 and cache.get_seq_length() == 14
