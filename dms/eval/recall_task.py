"""Documents of the offline lm-eval task `dms_recall`: the generated
long-context recall prompts of `dms.eval.recall` (multi-key needles,
variable tracking, associative recall), sized in tokens with the evaluated
model's tokenizer. It is the lm-eval face of the quality study: the shipped
recall models answer it. Nothing is downloaded; the same arguments give the
same documents.

lm-eval calls `recall_dataset(**metadata)` (the task's `custom_dataset`)
with the parsed `--model_args` and `--metadata`; the keys it reads are:

    max_seq_lengths  prompt lengths in tokens (default [1024, 2048])
    num_samples      prompts per length, the tasks taking turns (default 30)
    recall_seed      seed of the prompts (default 1000003, the quality study's held-out seed)
    tokenizer        tokenizer name or path (default: `pretrained` from --model_args)
"""

from dms.eval.passkey import DECLARED_LENGTHS, _check_lengths, task_tokenizer_and_lengths
from dms.eval.recall import TASKS, make_examples, score

__all__ = ["DEFAULT_LENGTHS", "DEFAULT_SAMPLES", "DEFAULT_SEED", "build_docs", "process_results", "recall_dataset"]

DEFAULT_LENGTHS = (1024, 2048)
DEFAULT_SAMPLES = 30
DEFAULT_SEED = 1_000_003  # bench/quality.py's held-out seed: no training step of the study draws from it


def build_docs(tokenizer, lengths=DEFAULT_LENGTHS, num_samples=DEFAULT_SAMPLES, seed=DEFAULT_SEED):
    """The task's documents, interleaved by length (prompt 0 at every length,
    then prompt 1, ...) so that `--limit k` still covers every length.

    Returns a list of dicts: input (the prompt; it ends right before the
    answer's space), answer (digits), task (niah, vt or mqar), max_length,
    sample, lengths (all lengths of the run, for the per-length metrics)."""
    lengths = _check_lengths(list(lengths) if isinstance(lengths, tuple) else lengths)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples: expected an int >= 1, got {num_samples!r}")
    per_length = {n: make_examples(num_samples, n, seed=seed, tokenizer=tokenizer) for n in lengths}
    return [{"input": per_length[n][i].prompt, "answer": per_length[n][i].answer, "task": per_length[n][i].task,
             "max_length": n, "sample": i, "lengths": list(lengths)}
            for i in range(num_samples) for n in lengths]


def recall_dataset(**metadata):
    """The task's `custom_dataset`: {"test": datasets.Dataset} built from
    `metadata` (see the module docstring for the keys read)."""
    import datasets

    tokenizer, lengths = task_tokenizer_and_lengths(metadata, "dms_recall", DEFAULT_LENGTHS)
    docs = build_docs(tokenizer, lengths, metadata.get("num_samples", DEFAULT_SAMPLES),
                      metadata.get("recall_seed", DEFAULT_SEED))
    return {"test": datasets.Dataset.from_list(docs)}


class _Example:
    def __init__(self, answer):
        self.answer = answer


def process_results(doc, results):
    """exact_match over every prompt (the generation starts with the answer
    as a whole number, `dms.eval.recall.score`), exact_match_<task> for the
    prompt's task, and exact_match_<length> for each length of the run (-1,
    ignored by the aggregation, where the prompt is not of that length or
    task)."""
    value = float(score(_Example(doc["answer"]), results[0]))
    out = {"exact_match": value}
    for task in TASKS:
        out[f"exact_match_{task}"] = value if task == doc["task"] else -1.0
    for n in doc["lengths"]:
        if n == doc["max_length"]:
            out[f"exact_match_{n}"] = value
        elif n in DECLARED_LENGTHS:
            out[f"exact_match_{n}"] = -1.0
    return out
