"""dms.training.recall_base on a micro configuration: the batches are a pure
function of (seed, step) with answer tokens marked, a continued run equals an
uninterrupted one exactly, a checkpoint refuses other settings, and the
accuracy reads greedy answers correctly."""

import json
import types

import pytest
import torch

from dms.eval.recall import make_examples, recall_tokenizer, solve
from dms.training.recall_base import BaseConfig, batch_for_step, grow, main, recall_accuracy, train, widen_heads

MICRO = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
             intermediate_size=64, max_position_embeddings=512, lengths=(200, 300), tokens_per_step=600,
             eval_lengths=(200,), eval_examples=3, warmup_steps=2, induction_steps=0, ramp_steps=0,
             drill_fraction=0.0,
             qk_norm_init=1.5)  # not Qwen3's 1, so that the fill shows


def test_batches_are_a_function_of_the_step_and_mark_the_answers():
    config, tok = BaseConfig(**MICRO), recall_tokenizer()
    ids, labels, answers = batch_for_step(config, tok, 3)
    again = batch_for_step(config, tok, 3)
    assert all(torch.equal(a, b) for a, b in zip((ids, labels, answers), again))
    other = batch_for_step(config, tok, 4)[0]
    assert ids.shape != other.shape or not torch.equal(ids, other)
    assert ids.shape[0] in {config.tokens_per_step // n for n in config.lengths}
    for r in range(ids.shape[0]):
        marked = ids[r][answers[r]]
        if len(marked):  # a recall row: one token (a space and digits) per question, the last before eos
            text = tok.decode(ids[r])
            assert len(marked) == text.count("\n") and len(marked) > 1  # a line per question
            assert all(a[0] == " " and a[1:].isdigit() for a in (tok.decode([t]) for t in marked))
            for at in answers[r].nonzero().flatten().tolist():  # each marked answer is right
                assert solve(tok.decode(ids[r, :at])) == tok.decode(ids[r, at:at + 1]).strip()
            end = int(answers[r].nonzero().max()) + 1
            assert int(ids[r, end]) == tok.eos_token_id
        real = labels[r] != -100
        assert torch.equal(labels[r][real], ids[r][real]) and int(ids[r][real][-1]) == tok.eos_token_id


def test_task_mix_weighs_the_prompts_tasks():
    tok = recall_tokenizer()
    counts = {}
    for mix in (("vt",), ("niah", "mqar", "mqar")):
        config = BaseConfig(**{**MICRO, "text_fraction": 0.0, "task_mix": mix, "tokens_per_step": 3000})
        text = "".join(tok.decode(row) for row in batch_for_step(config, tok, 7)[0])
        counts[mix] = {task: text.count(mark) for task, mark in
                       (("niah", "Q: The code of"), ("vt", "Q: The value of"), ("mqar", "recall "))}
    assert counts[("vt",)]["vt"] > 0 and counts[("vt",)]["niah"] == counts[("vt",)]["mqar"] == 0
    assert counts[("niah", "mqar", "mqar")]["vt"] == 0 and counts[("niah", "mqar", "mqar")]["mqar"] > 0
    with pytest.raises(ValueError, match="tasks: expected names from"):
        batch_for_step(BaseConfig(**{**MICRO, "text_fraction": 0.0, "task_mix": ("x",)}), tok, 7)


def test_drill_rows_mark_every_answer_they_give():
    config, tok = BaseConfig(**{**MICRO, "drill_fraction": 1.0, "text_fraction": 0.0}), recall_tokenizer()
    ids, labels, answers = batch_for_step(config, tok, 5)
    for r in range(ids.shape[0]):
        text = tok.decode(ids[r])
        assert "\n" in text[:len(text) // 2]  # questions from the start, not only at the end
        marked = answers[r].nonzero().flatten().tolist()
        assert len(marked) == text.count("\n") > 3
        for at in marked:  # each marked token is the answer of the question line it ends
            assert solve(tok.decode(ids[r, :at])) == tok.decode(ids[r, at:at + 1]).strip()


def test_a_continued_run_equals_an_uninterrupted_one(tmp_path):
    config = BaseConfig(**MICRO, steps=4)
    whole = train(config, str(tmp_path / "whole"), eval_every=2, save_every=2, show_progress=False)
    norms = whole.model.layers[0].self_attn
    for w in (norms.q_norm.weight, norms.k_norm.weight):  # started at qk_norm_init, 4 Adam steps of <= lr
        torch.testing.assert_close(w, torch.full_like(w, config.qk_norm_init), atol=5 * config.learning_rate, rtol=0)
    part = BaseConfig(**MICRO, steps=2)
    train(part, str(tmp_path / "part"), eval_every=2, save_every=2, show_progress=False)
    with open(tmp_path / "part" / "training_log.jsonl", "a") as f:  # a step done after the checkpoint, then stopped
        f.write('{"step": 3, "loss": 99.0}\n')
    assert main(["--output", str(tmp_path / "part"), "--steps", "4", "--eval-every", "2", "--save-every", "2"]
                + [f"--set={k}={v}" for k, v in _cli(MICRO).items()]) == 0
    from transformers import Qwen3ForCausalLM

    resumed = Qwen3ForCausalLM.from_pretrained(str(tmp_path / "part"))
    # Same data and optimizer state; the tolerance only absorbs a thread-count
    # dependent summation order in torch's CPU kernels (a wrong step offset
    # or optimizer state moves the weights by orders of magnitude more).
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    log = (tmp_path / "part" / "training_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4] and '"loss": 99.0' not in log[2]
    assert '"accuracy_200"' in log[1] and '"accuracy_200"' in log[3]
    with pytest.raises(ValueError, match=r"^output: its checkpoint was trained with other settings \(hidden_size\)"):
        train(BaseConfig(**{**MICRO, "hidden_size": 64}, steps=6), str(tmp_path / "part"), show_progress=False)
    # A checkpoint older than the drill and copy-phase fields ran without drills, with the default drill
    # filler and without a copy phase.
    state_path = tmp_path / "part" / "checkpoint" / "trainer_state.pt"
    state = torch.load(state_path, weights_only=False)
    for key in ("drill_fraction", "drill_filler", "induction_steps"):
        del state["config"][key]
    torch.save(state, state_path)
    train(BaseConfig(**MICRO, steps=4), str(tmp_path / "part"), show_progress=False)
    with pytest.raises(ValueError, match=r"other settings \(drill_fraction\)"):
        train(BaseConfig(**{**MICRO, "drill_fraction": 0.5}, steps=4), str(tmp_path / "part"), show_progress=False)
    with pytest.raises(ValueError, match=r"other settings \(induction_steps\)"):
        train(BaseConfig(**{**MICRO, "induction_steps": 2}, steps=4), str(tmp_path / "part"), show_progress=False)


def _cli(fields):
    return {k: json.dumps(list(v) if isinstance(v, tuple) else v) for k, v in fields.items()}


def test_accuracy_reads_greedy_answers():
    tok = recall_tokenizer()
    examples = make_examples(5, 200, seed=0, tokenizer=tok)

    def oracle_model(shift):
        """Logits whose argmax at position i is the token at i + shift."""
        def call(input_ids):
            target = torch.roll(input_ids, -shift, dims=1)
            return types.SimpleNamespace(logits=torch.nn.functional.one_hot(target, len(tok)).float())
        return call

    assert recall_accuracy(oracle_model(1), tok, examples, batch_size=2) == 1.0
    assert recall_accuracy(oracle_model(2), tok, examples, batch_size=2) == 0.0


def test_the_curriculum_starts_short_with_few_facts():
    tok = recall_tokenizer()
    config = BaseConfig(**{**MICRO, "lengths": (600,), "tokens_per_step": 1200, "text_fraction": 0.0,
                           "ramp_steps": 100, "ramp_start": 0.25, "ramp_lengths": (300,), "induction_steps": 50})
    early, _, _ = batch_for_step(config, tok, 50)  # the ramp counts from the end of the copy phase
    late, _, _ = batch_for_step(config, tok, 150)
    assert early.shape[1] < 310 < late.shape[1]
    texts = [tok.decode(row) for row in early]
    assert all(t.count("The code of ") <= 2 for t in texts)  # one needle and its question
    assert any(t.count("The code of ") == 8 for t in (tok.decode(row) for row in late))  # 4 needles, 4 questions


def test_the_copy_phase_comes_first_then_the_recall_mix_from_its_start():
    tok = recall_tokenizer()
    config = BaseConfig(**{**MICRO, "induction_steps": 3, "induction_rows": 5, "induction_span": 8,
                                      "induction_vocab": 20})
    ids, labels, answers = batch_for_step(config, tok, 2)
    assert ids.shape == (5, 32) and torch.equal(answers, labels != -100)
    for r in range(5):
        marked = answers[r].nonzero().flatten()
        start = int(marked[0]) - 1  # the copy's first token: a content match cannot predict it
        assert len(marked) == 7 and torch.equal(marked, torch.arange(start + 1, start + 8))
        assert 8 <= start < 16 and torch.equal(ids[r, start:start + 8], ids[r, :8])
        assert torch.equal(labels[r, marked], ids[r, marked])
        assert all(tok.decode([t])[0] == " " for t in ids[r].tolist())  # words and numbers, no eos or newline
    assert len(set(ids.flatten().tolist())) <= 20
    ids = batch_for_step(config, tok, 3)[0]
    assert ids.shape[0] in {config.tokens_per_step // n for n in config.lengths}


def test_a_grown_model_starts_as_its_base_and_refuses_other_widths(tmp_path):
    from transformers import Qwen3ForCausalLM

    base_config = BaseConfig(**{**MICRO, "num_hidden_layers": 2}, steps=2)
    base = train(base_config, str(tmp_path / "base"), eval_every=2, save_every=2, show_progress=False)
    grown_config = BaseConfig(**{**MICRO, "num_hidden_layers": 3, "grow_from": str(tmp_path / "base")}, steps=1)
    torch.manual_seed(0)
    grown = Qwen3ForCausalLM(grown_config.model_config(recall_tokenizer()))
    fresh = {k: v.clone() for k, v in grown.state_dict().items()}
    grow(grown, base)
    ids = batch_for_step(base_config, recall_tokenizer(), 3)[0][:2]
    with torch.no_grad():
        torch.testing.assert_close(grown(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)
    # base layers 0 and 1 land at 0 and 1 * 3 // 2 = 1 ... layer 2 is new: fresh weights, outputs zeroed
    for name, value in grown.state_dict().items():
        if name.startswith("model.layers.2."):
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                assert not value.any(), name
            else:
                assert torch.equal(value, fresh[name]), name
    assert torch.equal(grown.model.layers[1].mlp.up_proj.weight, base.model.layers[1].mlp.up_proj.weight)
    assert not torch.equal(grown.model.layers[2].mlp.up_proj.weight, base.model.layers[1].mlp.up_proj.weight)
    # through train(): one step from the grown start
    train(grown_config, str(tmp_path / "grown"), eval_every=1, save_every=1, show_progress=False)
    assert Qwen3ForCausalLM.from_pretrained(str(tmp_path / "grown")).config.num_hidden_layers == 3
    with pytest.raises(ValueError, match=r"^grow_from: the base has 2 layers, more than num_hidden_layers = 1$"):
        grow(Qwen3ForCausalLM(BaseConfig(**MICRO).model_config(recall_tokenizer())), base)
    wide = Qwen3ForCausalLM(BaseConfig(**{**MICRO, "num_hidden_layers": 3, "intermediate_size": 96})
                            .model_config(recall_tokenizer()))
    with pytest.raises(ValueError, match=r"^grow_from: the base's model.layers.0.mlp.gate_proj.weight \(64, 32\) "
                                         r"does not fit this config \(\(96, 32\)\); only num_hidden_layers"):
        grow(wide, base)


def test_widened_heads_compute_what_the_base_computes_and_all_learn(tmp_path):
    """widen_heads (grow_from into a model with wider heads): base dimension
    pair i lands on pair f * i (RoPE's frequency there is the same), the
    new dimensions start at zero in the queries and small in the keys and
    values, the norms absorb the RMS and softmax-scale change. The widened
    model's logits are the base's (up to the keys' tiny RMS change; a wrong
    pair map or norm factor moves them by far more), and the first
    backward pass gives every new query and key row and output column a
    gradient (the values' new rows get theirs once the output columns
    move: they start at zero)."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    config = BaseConfig(**{**MICRO, "num_hidden_layers": 2})
    base = Qwen3ForCausalLM(config.model_config(recall_tokenizer())).eval()
    for name, param in base.named_parameters():  # norms off 1, so a factor on them shows
        if name.endswith("norm.weight"):
            param.data.uniform_(0.5, 1.5)
    ids = batch_for_step(config, recall_tokenizer(), 3)[0][:2]
    with torch.no_grad():
        want = base(input_ids=ids).logits
    for f in (2, 4):
        wide = widen_heads(base, 16 * f).eval()
        assert wide.config.head_dim == 16 * f and wide.model.layers[0].self_attn.q_proj.weight.shape == (32 * f, 32)
        with torch.no_grad():
            got = wide(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        assert (got - want).abs().max() > 0  # the keys' new dimensions are not zero ...
        wide.train()
        wide(input_ids=ids, labels=ids).loss.backward()
        attn = wide.model.layers[0].self_attn
        kept = torch.cat([torch.arange(8) * f, torch.arange(8) * f + 8 * f])  # base dims of head 0
        new_rows = torch.ones(16 * f, dtype=torch.bool)
        new_rows[kept] = False
        for proj in (attn.q_proj, attn.k_proj):  # ... and each new row learns
            assert (proj.weight.grad[:16 * f][new_rows].abs().sum(-1) > 0).all(), proj
        assert (attn.o_proj.weight.grad[:, :16 * f][:, new_rows].abs().sum(0) > 0).all()
    # through grow() and train(): a wider, deeper model from the base
    base.save_pretrained(tmp_path / "base")
    wider = BaseConfig(**{**MICRO, "num_hidden_layers": 3, "head_dim": 32, "grow_from": str(tmp_path / "base")},
                       steps=1)
    grown = Qwen3ForCausalLM(wider.model_config(recall_tokenizer())).eval()
    grow(grown, Qwen3ForCausalLM.from_pretrained(tmp_path / "base"))
    with torch.no_grad():
        torch.testing.assert_close(grown(input_ids=ids).logits, want, rtol=0, atol=1e-4)
    train(wider, str(tmp_path / "grown"), eval_every=1, save_every=1, show_progress=False)
    with pytest.raises(ValueError, match=r"^grow_from: head_dim = 24 is not a whole multiple of the base's 16$"):
        widen_heads(base, 24)
