"""Training-free baselines on the paged DMS cache (dms.eval.baselines): the
logits at every step of a prefill → decode run equal the float64 oracle given
the same decisions and window (dense masks), StreamingLLM stores exactly its
sinks plus its window, content-blind eviction flags tokens at its rate, and
dms.eval.quality measures accuracy and budget through generate."""

import copy

import pytest
import torch

from dms.eval.baselines import ContentBlind, StreamingLLM, eviction_policy
from dms.eval.quality import evaluate_recall, matched_baselines
from dms.eval.recall import make_examples
from dms.tiny import tiny_model, tiny_tokenizer

from .test_qwen3_oracle import TINY, _model, oracle_logits


class _Recorder:
    """Wraps a policy and keeps what it returned, per layer, in call order."""

    def __init__(self, policy, layers):
        self.policy, self.calls = policy, [[] for _ in range(layers)]

    def __call__(self, layer_idx, z, tokens_fed):
        decisions = self.policy(layer_idx, z, tokens_fed)
        self.calls[layer_idx].append(decisions)
        return decisions


@pytest.mark.parametrize("policy, window", [(StreamingLLM(sinks=3), 7), (ContentBlind(0.6, seed=4), 5)],
                         ids=["streaming", "content-blind"])
def test_every_step_equals_the_oracle_with_the_same_decisions(policy, window):
    m = _model(dms_separate_alpha=True).eval()
    ids = torch.randint(0, TINY["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(2))
    recorder = _Recorder(policy, TINY["num_hidden_layers"])
    steps = [(0, 15)] + [(t, t + 1) for t in range(15, 25)] + [(25, 33)] + [(t, t + 1) for t in range(33, 40)]
    with torch.no_grad(), eviction_policy(m, recorder, window_size=window):
        cache = m.get_cache()
        got = torch.cat([m(ids[:, t0:t1], cache=cache).logits for t0, t1 in steps], 1)
    decisions = [torch.cat(calls, -1) for calls in recorder.calls]
    expected = oracle_logits(copy.deepcopy(m).double(), ids, decisions=decisions, window=window).float()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert m.config.dms_window_size == 5 and all(a.self_attn.decision_policy is None for a in m.model.layers)
    stored = cache.layers[0].paged.tokens_stored()
    if isinstance(policy, StreamingLLM):
        assert stored.tolist() == [[3 + window + 1] * 2]  # sinks + window + the newest token
    else:
        rate = float(torch.cat([d.flatten() for d in decisions]).float().mean())
        assert abs(rate - 0.6) < 0.1 and int(stored.max()) < 40


def test_bad_policy_arguments_are_named():
    with pytest.raises(ValueError, match="^rate: expected a probability"):
        ContentBlind(1.5)
    with pytest.raises(ValueError, match="^sinks: expected an int >= 0"):
        StreamingLLM(-1)
    m = _model(dms_separate_alpha=True)
    with pytest.raises(ValueError, match=r"^window_size: expected an int larger than the page size \(2\)"):
        with eviction_policy(m, StreamingLLM(), window_size=2):
            pass


def test_evaluate_recall_reports_accuracy_and_budget():
    model, tok = tiny_model(seed=0).eval(), tiny_tokenizer()
    examples = make_examples(3, 300, seed=9)
    result = evaluate_recall(model, tok, examples)
    assert 0 <= result["accuracy"] <= 1 and len(result["answers"]) == 3
    assert result["compression_ratio"] == pytest.approx(result["seen_per_row"] / result["stored_per_row"])
    assert result["seen_per_row"] == pytest.approx(sum(e.prompt_tokens - 1 for e in examples) / 3)
    # One prefill per prompt: the answers are those of a plain generate over the whole prompt.
    from dms.models.qwen3.modeling_qwen3_dms import cache_kwargs

    ids = torch.tensor([tok(examples[0].prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        alone = model.generate(ids, max_new_tokens=len(examples[0].completion) + 1, do_sample=False,
                               pad_token_id=tok.pad_token_id, **cache_kwargs(model.get_cache()))
    assert result["answers"][0] == tok.decode(alone[0, ids.shape[1]:], skip_special_tokens=True)
    assert result["compression_ratio"] > 1.2  # the tiny model's random adapters evict
    baselines = matched_baselines(result, window=model.config.dms_window_size, sinks=4)
    policy, window = baselines["StreamingLLM"]
    streaming = evaluate_recall(model, tok, examples, policy=policy, window_size=window)
    assert abs(streaming["stored_per_row"] - result["stored_per_row"]) < 0.15 * result["stored_per_row"]
    policy, window = baselines["content-blind"]
    blind = evaluate_recall(model, tok, examples, policy=policy, window_size=window)
    assert abs(blind["evicted_fraction"] - result["evicted_fraction"]) < 0.05
    for name in ("TOVA", "H2O"):  # a fixed budget: every row holds it once the prompt is longer
        policy, window = baselines[name]
        scored = evaluate_recall(model, tok, examples, policy=policy, window_size=window)
        assert scored["stored_per_row"] == policy.budget


def test_quality_bench_runs_end_to_end(tmp_path, monkeypatch, capsys):
    """bench/quality.py on the tiny model (as base and as a 'DMS model'):
    vanilla, the DMS row and both matched baselines, table and plot written."""
    import os
    import sys

    from dms.tiny import save_tiny

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.syspath_prepend(os.path.join(root, "bench"))
    import quality

    base = save_tiny(str(tmp_path / "base"), seed=0, evicting=False)
    dms = save_tiny(str(tmp_path / "dms"), seed=0, evicting=True)
    out = tmp_path / "q.md"
    assert quality.main(["--base", base, "--models", f"tiny-2x={dms}", "--lengths", "300", "--count", "2",
                         "--out", str(out)]) == 0
    table = out.read_text()
    for method in ("vanilla", "DMS tiny-2x", "content-blind at tiny-2x", "StreamingLLM at tiny-2x", "TOVA at tiny-2x",
                   "H2O at tiny-2x"):
        assert f"| {method} " in table
    assert (tmp_path / "q.png").stat().st_size > 1000 and "machine:" in table
    vanilla = next(line for line in table.splitlines() if "| vanilla " in line)
    assert "| 1.00x " in vanilla  # a model without trained adapters keeps every token
    other = tmp_path / "r.md"
    assert quality.main(["--base", base, "--models", f"more-4x={dms}", "--lengths", "300", "--count", "2",
                         "--out", str(other)]) == 0
    joined = tmp_path / "joined.md"
    assert quality.main(["--merge", f"{out},{other}", "--out", str(joined)]) == 0
    rows = [line for line in joined.read_text().splitlines() if line.startswith("| 300 ")]
    assert len(rows) == 11 and sum("| vanilla " in r for r in rows) == 1
    assert rows[1].startswith("| 300    | DMS tiny-2x ") and any("| H2O at more-4x " in r for r in rows)
    assert (tmp_path / "joined.png").stat().st_size > 1000
    del sys.modules["quality"]
