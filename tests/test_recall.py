"""dms.eval.recall: every generated prompt holds what its question needs (a
rule-based reader finds the answer in the text), prompts fill their length,
facts sit at spread-out depths, and the same arguments give the same texts."""

import statistics

import pytest

from dms.eval.recall import (TASKS, RecallExample, make_drills, make_examples, make_text, recall_tokenizer, score,
                             solve, write_jsonl)
from dms.tiny import tiny_tokenizer


@pytest.mark.parametrize("context_tokens", [200, 300, 1024, 2048])
def test_every_answer_can_be_read_from_its_prompt(context_tokens):
    examples = make_examples(60, context_tokens, seed=3)
    assert [e.task for e in examples] == [TASKS[i % 3] for i in range(60)]
    for e in examples:
        assert e.answer.isdigit() and solve(e.prompt) == e.answer, e
        assert e.prompt_tokens == len(e.prompt.encode()) <= context_tokens
        assert e.prompt_tokens > context_tokens - 80  # filled to within one sentence
        assert e.prompt.endswith((" is", ":")) and e.answer not in e.prompt.rsplit("\n", 1)[-1]
        assert e.completion == " " + e.answer
        lines = e.prompt.split("\n")
        assert 1 <= len(lines) - 1 <= 4 and len(set(lines[1:])) == len(lines) - 1  # distinct questions
        for i in range(1, len(lines) - 1):  # the answered ones are answered right
            question, value = lines[i][:-1].rsplit(" ", 1)
            assert solve("\n".join(lines[:i] + [question])) == value


def test_same_arguments_same_texts_and_seeds_differ():
    a = make_examples(9, 512, seed=11)
    assert a == make_examples(9, 512, seed=11)
    b = make_examples(9, 512, seed=12)
    assert all(x.prompt != y.prompt for x, y in zip(a, b))
    assert make_text(3, 256, seed=1) == make_text(3, 256, seed=1) != make_text(3, 256, seed=2)


def test_asked_facts_sit_at_spread_out_depths():
    depths = []
    for e in make_examples(300, 1024, seed=5, tasks=("niah",)):
        key = e.prompt.rsplit("Q: The code of ", 1)[1].split(" ")[0]
        depths.append(e.prompt.index(f"The code of {key} is") / e.prompt.index("\n"))  # depth within the text
    assert min(depths) < 0.05 and max(depths) > 0.9
    assert 0.4 < statistics.median(depths) < 0.6


def test_variable_chains_are_in_order_and_need_every_hop():
    for e in make_examples(50, 600, seed=2, tasks=("vt",)):
        name = e.prompt.rsplit("Q: The value of ", 1)[1].split(" ")[0]
        hops = []
        while not name.isdigit():
            at = e.prompt.index(f"Let {name} = ")
            hops.append(at)
            name = e.prompt[at + len(f"Let {name} = "):].split(".")[0]
        assert len(hops) == 2 and hops == sorted(hops, reverse=True)  # assigned before being copied


def test_lengths_in_tokens_of_a_tokenizer():
    tok = tiny_tokenizer()  # byte-level: one token per UTF-8 byte
    for e in make_examples(6, 700, seed=0, tokenizer=tok):
        assert e.prompt_tokens == len(tok(e.prompt, add_special_tokens=False)["input_ids"]) <= 700
    for doc in make_text(4, 300, seed=0, tokenizer=tok):
        assert 220 < len(doc.encode()) <= 300


def test_score_takes_the_whole_number_only():
    e = RecallExample("niah", "…\nQ: The code of vupa is ", "4093", 0)
    assert score(e, "4093") and score(e, " 4093.\n") and score(e, "4093 is the code")
    assert not score(e, "40931") and not score(e, "409") and not score(e, "code 4093")


@pytest.mark.parametrize("kwargs, message", [
    (dict(count=-1, context_tokens=100), "^count: expected an int >= 0"),
    (dict(count=1, context_tokens=0), "^context_tokens: expected an int >= 1"),
    (dict(count=1, context_tokens=100, seed=1.5), "^seed: expected an int"),
    (dict(count=1, context_tokens=100, tasks=("ruler",)), "^tasks: expected names from"),
    (dict(count=1, context_tokens=40), "^context_tokens: 40 cannot hold a niah prompt"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_examples(**kwargs)


def test_written_jsonl_is_a_local_training_source(tmp_path):
    import json

    from dms.eval.recall import main
    from dms.training.data import DataConfig, build_dataset

    path = tmp_path / "recall.jsonl"
    assert main(["--write", str(path), "--count", "8", "--lengths", "300,400", "--text-fraction", "0.25",
                 "--tokenizer", "bytes"]) == 0
    rows = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    recall = [r for r in rows if "\nQ: " in r or "\nrecall " in r]
    assert len(rows) == 16 and len(recall) == 12
    for row in recall:  # prompt + completion + newline: the answer follows what solve() reads
        prompt, answer = row[:-1].rsplit(" ", 1)
        assert solve(prompt) == answer
    config = DataConfig.from_dict({"blend": f"local:{path}", "max_length": 256, "cache_dir": str(tmp_path / "cache")})
    dataset = build_dataset(config, tiny_tokenizer(), show_progress=False)
    assert len(dataset) >= sum(len(r) for r in rows) // 256


def test_written_jsonl_takes_a_share_of_drills(tmp_path):
    import json

    from dms.eval.recall import main

    path = tmp_path / "recall.jsonl"
    assert main(["--write", str(path), "--count", "8", "--lengths", "300", "--text-fraction", "0.25",
                 "--drill-fraction", "0.5", "--tokenizer", "bytes"]) == 0
    rows = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    drills = [d.text + "\n" for d in make_drills(4, 299, seed=0)]
    assert len(rows) == 8 and sorted(r for r in rows if r in drills) == sorted(drills)
    assert all(len(r.encode()) <= 300 for r in drills)
    for bad in (["--drill-fraction", "0.8"], ["--drill-fraction", "-0.1"]):
        with pytest.raises(SystemExit):
            main(["--write", str(path), "--tokenizer", "bytes", *bad])
    with pytest.raises(ValueError, match=r"^text_fraction, drill_fraction: expected shares"):
        write_jsonl(str(path), 4, [300], text_fraction=0.5, drill_fraction=0.6)


def test_facts_scale_sets_the_needles_and_pairs():
    few = make_examples(2, 600, seed=0, tasks=("niah", "mqar"), facts_scale=0.25)
    assert few[0].prompt.count("The code of ") == 1 + 1  # one needle, and the question
    assert few[1].prompt.count(":") == 2 + 1  # two pairs and the question: one pair is never asked
    assert all(solve(e.prompt) == e.answer for e in few)


@pytest.mark.parametrize("task,facts", [("niah", 4), ("vt", 4), ("mqar", 8)])
def test_a_fact_stays_unasked_unless_every_fact_is_asked(task, facts):
    def asked(e):
        return e.prompt.count("\n")

    for e in make_examples(20, 700, seed=6, tasks=(task,)):
        assert asked(e) == min(4, facts - 1) and solve(e.prompt) == e.answer
    every = make_examples(20, 700, seed=6, tasks=(task,), questions=None, facts_scale=2)
    assert all(asked(e) == 2 * facts and solve(e.prompt) == e.answer for e in every)
    assert all(asked(e) == 1 for e in make_examples(5, 700, seed=6, tasks=(task,), questions=1))
    with pytest.raises(ValueError, match="questions"):
        make_examples(1, 700, tasks=(task,), questions=0)


def test_the_word_tokenizer_makes_keys_and_answers_one_token_and_round_trips():
    tok = recall_tokenizer()
    examples = make_examples(45, 700, seed=4, tokenizer=tok) + make_examples(15, 400, seed=5, tokenizer=tok,
                                                                          facts_scale=0.25)
    for e in examples:
        full = tok(e.prompt + e.completion + "\n", add_special_tokens=False)["input_ids"]
        prompt = tok(e.prompt, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in full and tok.decode(full) == e.prompt + e.completion + "\n"
        assert full[:len(prompt)] == prompt and len(prompt) == e.prompt_tokens <= 700
        assert tok.convert_ids_to_tokens(full[len(prompt)]) == e.completion  # the answer is one token
        key = e.prompt.rsplit(" ", 2)[-2] if e.task != "mqar" else e.prompt.rsplit(" ", 1)[-1][:-1]
        assert len(tok(" " + key, add_special_tokens=False)["input_ids"]) == 1
    for doc in make_text(5, 500, seed=2, tokenizer=tok):
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == doc and 450 < len(ids) <= 500
    assert tok.convert_ids_to_tokens(tok("Hello 5000 ~", add_special_tokens=False)["input_ids"]) == \
        ["<unk>", "<unk>", "<unk>"]  # outside the vocabulary: unknown, never a wrong word
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"


@pytest.mark.parametrize("context_tokens", [120, 1024])
def test_every_drill_answer_can_be_read_from_the_text_before_it(context_tokens):
    tok = recall_tokenizer()
    drills = make_drills(12, context_tokens, seed=2, tokenizer=tok)
    assert drills == make_drills(12, context_tokens, seed=2, tokenizer=tok)
    assert all(a.text != b.text for a, b in zip(drills, make_drills(12, context_tokens, seed=3, tokenizer=tok)))
    kinds, copies, far = set(), 0, 0
    for d in drills:
        ids = tok(d.text, add_special_tokens=False)["input_ids"]
        assert context_tokens - 25 < len(ids) <= context_tokens and tok.unk_token_id not in ids
        assert len(d.answer_spans) == d.text.count("\n") >= 1  # one answer per question line
        for a, b in d.answer_spans:
            answer, before = d.text[a:b], d.text[:a]
            assert answer[0] == " " and answer[1:].isdigit() and d.text[b] == "."
            assert solve(before) == answer[1:]  # stated earlier in the drill, and given right
            line = before.rsplit("\n", 1)[-1]
            kinds.add(" ".join(line.split()[:3]) if line.startswith("Q:") else "recall")
            key = line.split()[-2] if line.endswith(" is") else line.split()[-1][:-1]
            if line.startswith("Q: The value of "):
                copies += not (" " + d.text).split(f" Let {key} = ", 1)[1].split(".")[0].isdigit()
            far += a + 1 - (" " + d.text).index(f" {key}") > len(d.text) // 3
    assert kinds == {"Q: The code", "Q: The value", "recall"}
    if context_tokens > 500:
        assert copies > 0 and far > 20  # questions through copies, and across a third of the text


@pytest.mark.parametrize("kwargs,message", [
    (dict(count=-1, context_tokens=100), "^count: expected an int >= 0"),
    (dict(count=1, context_tokens=100, filler=1.0), r"^filler: expected a number in \[0, 1\)"),
])
def test_bad_drill_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_drills(**kwargs)
