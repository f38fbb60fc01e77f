"""Documents of the offline lm-eval task `dms_passkey`: a five-digit pass key
hidden at a chosen depth in generated filler text, one prompt per (context
length, sample), sized in tokens with the evaluated model's tokenizer. Nothing
is downloaded; the same arguments give the same documents.

lm-eval calls `passkey_dataset(**metadata)` (the task's `custom_dataset`) with
the parsed `--model_args` and `--metadata`; the keys it reads are:

    max_seq_lengths  prompt lengths in tokens (default [256, 512, 1024])
    num_samples      prompts per length, depths spread evenly from start to end (default 20)
    passkey_seed     seed of the keys and the filler (default 0)
    tokenizer        tokenizer name or path (default: `pretrained` from --model_args)
"""

import random
import re

__all__ = ["DECLARED_LENGTHS", "DEFAULT_LENGTHS", "DEFAULT_SAMPLES", "GEN_PREFIX", "aggregate", "build_docs",
           "passkey_dataset", "process_results", "score", "task_tokenizer_and_lengths"]

DEFAULT_LENGTHS = (256, 512, 1024)
# Lengths whose exact_match_<length> metric dms_passkey.yaml declares (with
# `aggregate`); keep the two lists equal.
DECLARED_LENGTHS = tuple(2**i for i in range(7, 18))  # 128 ... 131072
DEFAULT_SAMPLES = 20
# Continued by the model; the task's gen_prefix (with a chat template it opens the assistant turn).
GEN_PREFIX = "The pass key is"

_HEADER = "Find the pass key hidden in this text and remember it.\n\n"
_QUESTION = "\n\nWhat is the pass key?"
_NEEDLE = " The pass key is {key}. Remember {key}."

# Filler: short sentences drawn from these halves, so the haystack varies and
# carries no digits that could be mistaken for the key.
_SUBJECTS = ["The old bridge", "A small boat", "The village baker", "Every window", "The northern road",
             "A grey cat", "The library clock", "Our neighbour", "The morning train", "A tall pine",
             "The market square", "The river", "A paper kite", "The lighthouse", "Each lantern", "The orchard"]
_PREDICATES = ["stays quiet after dusk.", "leans toward the hills.", "waits for the first frost.",
               "hums a tune nobody remembers.", "smells of rain and bread.", "looks different in autumn.",
               "gathers dust in the attic.", "turns gold at sunset.", "was painted blue last spring.",
               "points toward the sea.", "drifts slowly past the mill.", "never seems to hurry.",
               "hides behind the fog.", "sits beside the stone wall.", "shines under the lamps.",
               "carries the sound of bells."]


def _token_counter(tokenizer):
    def count(text):
        return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    return count


def _check_lengths(lengths):
    if isinstance(lengths, int):
        lengths = [lengths]
    if not isinstance(lengths, (list, tuple)) or not lengths or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in lengths):
        raise ValueError(f"max_seq_lengths: expected a list of positive token counts, got {lengths!r}")
    return [int(n) for n in lengths]


def _doc(length, index, num_samples, seed, count, sentence_tokens, lengths):
    rng = random.Random(f"dms_passkey/{seed}/{length}/{index}")
    key = str(rng.randint(10000, 99999))
    needle = _NEEDLE.format(key=key)
    fixed = count(_HEADER + needle + _QUESTION + " " + GEN_PREFIX)
    budget = length - fixed
    sentences = []
    used = misses = 0
    while misses < 16:  # near the end, draw more sentences for one short enough to fill the gap
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_PREDICATES)}"
        if s not in sentence_tokens:
            sentence_tokens[s] = count(" " + s)
        if used + sentence_tokens[s] > budget:
            misses += 1
            continue
        sentences.append(s)
        used += sentence_tokens[s]
    if not sentences:
        raise ValueError(f"max_seq_lengths: {length} tokens is too short for a passkey prompt "
                         f"(the question alone takes {fixed}); use lengths of at least {fixed + 16}")
    depth = index / (num_samples - 1) if num_samples > 1 else 0.5
    while True:  # token counts of pieces add up only roughly: trim until the whole fits
        at = round(depth * len(sentences))
        text = " ".join(sentences[:at]) + needle + (" " if at < len(sentences) else "") + " ".join(sentences[at:])
        prompt = _HEADER + text.strip() + _QUESTION
        if count(prompt + " " + GEN_PREFIX) <= length or len(sentences) == 1:
            break
        sentences.pop()
    return {"input": prompt, "passkey": key, "max_length": length, "depth": round(depth, 4),
            "sample": index, "lengths": list(lengths)}


def build_docs(tokenizer, lengths=DEFAULT_LENGTHS, num_samples=DEFAULT_SAMPLES, seed=0):
    """The task's documents, interleaved by length (sample 0 at every length,
    then sample 1, ...) so that `--limit k` still covers every length.

    Args:
        tokenizer: a Hugging Face tokenizer: prompts are sized with it.
        lengths: prompt lengths in tokens (default 256, 512, 1024); each
            prompt, with the answer prefix, fits in its length.
        num_samples: prompts per length (default 20).
        seed: seed of the keys and filler (default 0).

    Returns a list of dicts: input (prompt), passkey (five digits),
    max_length, depth (0 = key at the start, 1 = at the end), sample, lengths
    (all lengths of the run, for the per-length metrics)."""
    lengths = _check_lengths(list(lengths) if isinstance(lengths, tuple) else lengths)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples: expected an int >= 1, got {num_samples!r}")
    from tqdm.auto import tqdm

    count = _token_counter(tokenizer)
    sentence_tokens = {}
    jobs = [(n, i) for i in range(num_samples) for n in lengths]
    return [_doc(n, i, num_samples, seed, count, sentence_tokens, lengths)
            for n, i in tqdm(jobs, desc="dms_passkey documents", disable=len(jobs) < 200)]


def passkey_dataset(**metadata):
    """The task's `custom_dataset`: {"test": datasets.Dataset} built from
    `metadata` (see the module docstring for the keys read; others are ignored)."""
    import datasets

    tokenizer, lengths = task_tokenizer_and_lengths(metadata, "dms_passkey", DEFAULT_LENGTHS)
    docs = build_docs(tokenizer, lengths,
                      metadata.get("num_samples", DEFAULT_SAMPLES), metadata.get("passkey_seed", 0))
    return {"test": datasets.Dataset.from_list(docs)}


def task_tokenizer_and_lengths(metadata, task, default_lengths):
    """(tokenizer, prompt lengths) of an offline task whose prompts are
    sized in tokens: the tokenizer named by `tokenizer` or lm-eval's
    `pretrained`, and `max_seq_lengths` (default `default_lengths`), checked
    against the model's max_position_embeddings (lm-eval would truncate
    longer prompts and still report them under the long name)."""
    from transformers import AutoTokenizer

    name = metadata.get("tokenizer") or metadata.get("pretrained")
    if not isinstance(name, str) or not name:
        raise ValueError(f"tokenizer: {task} sizes its prompts in tokens and needs a tokenizer: pass "
                         "--model_args pretrained=PATH (lm-eval's hf model does) or --metadata "
                         "'{\"tokenizer\": \"NAME_OR_PATH\"}'")
    remote = bool(metadata.get("trust_remote_code", False))
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=remote)
    lengths = _check_lengths(metadata.get("max_seq_lengths", default_lengths))
    limit = _max_positions(metadata.get("pretrained"), remote)
    too_long = [n for n in lengths if limit is not None and n > limit]
    if too_long:
        raise ValueError(f"max_seq_lengths: {too_long} exceed the model's max_position_embeddings ({limit}); "
                         f"pass lengths up to {limit}, e.g. --metadata '{{\"max_seq_lengths\": [{limit}]}}'")
    return tokenizer, lengths


def _max_positions(pretrained, trust_remote_code):
    """The model's max_position_embeddings, or None when it cannot be read
    (no model path, or a config without it)."""
    if not isinstance(pretrained, str) or not pretrained:
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def score(prediction, passkey):
    """1.0 if the first number in `prediction` is exactly `passkey`, else 0.0."""
    found = re.search(r"\d+", prediction)
    return 1.0 if found is not None and found.group() == passkey else 0.0


def process_results(doc, results):
    """exact_match over every prompt, and exact_match_<length> for each
    length of the run: the score on this prompt's length, -1 (ignored by
    `aggregate`) on the others. A length the YAML does not declare is
    reported only by its own prompts (lm-eval then averages it itself)."""
    value = score(results[0], doc["passkey"])
    out = {"exact_match": value}
    for n in doc["lengths"]:
        if n == doc["max_length"]:
            out[f"exact_match_{n}"] = value
        elif n in DECLARED_LENGTHS:
            out[f"exact_match_{n}"] = -1.0
    return out


def aggregate(values):
    """Mean of the values that are not -1; -1 if there are none (no prompt
    of that length was evaluated, e.g. under --limit)."""
    kept = [v for v in values if v != -1]
    return sum(kept) / len(kept) if kept else -1.0
