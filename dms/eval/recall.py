"""Long-context recall tasks, generated: prompts whose answer sits far back in
the context, for training and evaluating a model that needs its KV cache
(RULER-style, offline, any length, fresh held-out examples from any seed).

Three tasks, each a filler text of generated sentences with facts hidden at
random depths and one question at the end:

- ``niah``  multi-key needle in a haystack: several ``The code of KEY is
  NNN.`` facts; questions ``Q: The code of KEY is`` ask them.
- ``vt``    variable tracking (RULER's VT): ``Let AB = 41.`` then
  ``Let CD = AB.`` later on, among other such chains; a question
  ``Q: The value of CD is`` needs both hops.
- ``mqar``  multi-query associative recall: ``KEY: NN.`` pairs spread
  through the text, then recalls ``recall KEY:``.

Each prompt ends with up to QUESTIONS questions, one per line, each about
another fact; all but the last are answered (``Q: The code of vup is 41.``),
the last one is the prompt's question (a model trained on these texts learns
from every answered line). At least one fact is never asked, so the last
question cannot be answered by elimination (the one value not yet named);
training sets may ask every fact (``questions=None``) for more signal per
token.

The text right before each answer repeats the text right before the value
in its fact (``code of KEY is``, ``KEY:``), the pattern an induction head
completes; variable tracking adds an indirection on top.

``make_examples(count, context_tokens, seed)`` returns that many
``RecallExample(task, prompt, answer, prompt_tokens)``; the prompt ends right
before the answer, a number that follows a space in the text
(``ex.completion`` is ``" " + ex.answer``). ``make_text`` returns plain filler
documents (language-model text whose perplexity means something: the
sentences come from a small fixed grammar). Lengths count the tokens of
``tokenizer`` (default: UTF-8 bytes, the tokens of the built-in tiny model's
byte-level tokenizer; ``recall_tokenizer()`` is the word-level tokenizer of
the quality study's models). The same arguments give the same texts on every
machine (Python's ``random`` seeded with strings, no hash salt).

    >>> from dms.eval.recall import make_examples
    >>> ex = make_examples(1, 512, seed=7, tasks=("niah",))[0]
    >>> ex.prompt[-26:], ex.answer          # doctest: +SKIP
    ('...\\nQ: The code of vup is', '409')

As a training set for a retrofit (`data.blend: local:PATH`), JSONL of text
rows (prompt + completion + newline, and filler documents):

    python -m dms.eval.recall --write outputs/recall_data/train.jsonl --count 4000 --lengths 1024,2048

(lengths in tokens of `--tokenizer`: words, the default, bytes, or a
tokenizer's folder).
"""

import argparse
import json
import os
import random
import sys
from dataclasses import dataclass

__all__ = ["TASKS", "RecallDrill", "RecallExample", "main", "make_drills", "make_examples", "make_text",
           "recall_tokenizer", "score", "solve", "write_jsonl"]

TASKS = ("niah", "vt", "mqar")
"""The task names, in the order `make_examples` cycles through them."""

NEEDLES = 4  # niah: facts per prompt
CHAINS = 4  # vt: variable chains per prompt
CHAIN_HOPS = 2  # vt: assignments per chain (a value, then a copy of it)
PAIRS = 8  # mqar: key -> value pairs per prompt
QUESTIONS = 4  # questions at the end of a prompt (at most one per fact), all answered but the last

_SUBJECTS = ("the old bridge", "a small boat", "the village baker", "every window", "the northern road",
             "a grey cat", "the library clock", "our neighbour", "the morning train", "a tall pine",
             "the market square", "the river", "a paper kite", "the lighthouse", "each lantern", "the orchard",
             "the young teacher", "a red fox", "the quiet farmer", "the harbour master")
_VERBS = ("watches", "passes", "follows", "remembers", "paints", "visits", "ignores", "greets", "leaves",
          "finds", "crosses", "keeps")
_OBJECTS = ("the stone wall", "a wooden gate", "the bakery", "the far hills", "a sleeping dog", "the bell tower",
            "the fishing nets", "a cold stream", "the empty station", "the summer fair", "a blue door",
            "the apple trees", "the mill", "a narrow lane")
_ENDINGS = ("after dusk", "before the rain", "in the morning", "every winter", "without a word", "at noon",
            "near the sea", "once a year", "in silence", "with great care")
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


@dataclass(frozen=True)
class RecallExample:
    """One prompt: `task` (one of TASKS), `prompt` (ends right before the
    answer), `answer` (digits), `prompt_tokens` (the prompt's length in the
    tokens it was sized with)."""

    task: str
    prompt: str
    answer: str
    prompt_tokens: int

    @property
    def completion(self):
        """The text that continues the prompt correctly: a space, then the
        answer (as the answer stands in the facts)."""
        return " " + self.answer


def _counter(tokenizer):
    if tokenizer is None:
        return lambda text: len(text.encode("utf-8"))
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _sentence(rng):
    """One filler sentence of the fixed grammar, with a leading space."""
    text = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    if rng.random() < 0.5:
        text += " " + rng.choice(_ENDINGS)
    return " " + text[0].upper() + text[1:] + "."


def _filler(rng, budget, length):
    """Filler sentences, drawn until the next one would take the text past
    `budget` tokens (as counted by `length`)."""
    sentences, text = [], ""
    while True:
        sentence = _sentence(rng)
        if length(text + sentence) > budget:
            return sentences
        sentences.append(sentence)
        text += sentence


def _word(rng, taken):
    """A new pronounceable 3-letter key (consonant-vowel-consonant)."""
    while True:
        word = rng.choice(_CONSONANTS) + rng.choice(_VOWELS) + rng.choice(_CONSONANTS)
        if word not in taken:
            taken.add(word)
            return word


def _variable(rng, taken):
    while True:
        name = rng.choice(_LETTERS) + rng.choice(_LETTERS)
        if name not in taken:
            taken.add(name)
            return name


def _facts(task, rng, scale=1.0, questions=QUESTIONS):
    """(facts in the order they must appear, question block, answer); the
    block asks `questions` facts (at most, and never every fact when there
    are two or more; None: every fact), each on its own line, all answered
    but the last. `scale` multiplies the number of needles, chains and pairs
    (at least 1, 1 and 2)."""
    taken = set()
    needles, chains, pairs = (max(1, round(NEEDLES * scale)), max(1, round(CHAINS * scale)),
                              max(2, round(PAIRS * scale)))
    if task == "niah":
        keys = [_word(rng, taken) for _ in range(needles)]
        values = [str(rng.randrange(10, 100)) for _ in keys]
        facts = [f" The code of {k} is {c}." for k, c in zip(keys, values)]
        rng.shuffle(facts)
        questions_of = [f"Q: The code of {k} is" for k in keys]
    elif task == "vt":
        values = [str(v) for v in rng.sample(range(10, 100), chains)]
        names = [[_variable(rng, taken) for _ in range(CHAIN_HOPS)] for _ in values]
        facts, pending = [], [0] * chains  # each chain's hops stay in order, chains interleave at random
        while any(p < CHAIN_HOPS for p in pending):
            c = rng.choice([i for i in range(chains) if pending[i] < CHAIN_HOPS])
            hop = pending[c]
            facts.append(f" Let {names[c][0]} = {values[c]}." if hop == 0 else f" Let {names[c][hop]} = {names[c][hop - 1]}.")
            pending[c] += 1
        questions_of = [f"Q: The value of {chain[-1]} is" for chain in names]
    elif task == "mqar":
        keys = [_word(rng, taken) for _ in range(pairs)]
        values = [str(rng.randrange(10, 100)) for _ in keys]
        facts = [f" {k}: {v}." for k, v in zip(keys, values)]
        rng.shuffle(facts)
        questions_of = [f"recall {k}:" for k in keys]
    else:
        raise ValueError(f"tasks: expected names from {TASKS}, got {task!r}")
    n = len(values)
    asked = n if questions is None else min(questions, max(1, n - 1))
    picked = rng.sample(range(n), asked)
    block = "".join(f"\n{questions_of[i]} {values[i]}." for i in picked[:-1]) + f"\n{questions_of[picked[-1]]}"
    return facts, block, values[picked[-1]]


def _check(count, context_tokens, seed):
    for name, value, low in (("count", count, 0), ("context_tokens", context_tokens, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed: expected an int, got {seed!r}")


def make_examples(count, context_tokens, seed=0, tasks=TASKS, tokenizer=None, facts_scale=1.0,
                  questions=QUESTIONS):
    """`count` RecallExamples whose prompts fill `context_tokens` tokens
    (at most; within one filler sentence of it), cycling through `tasks`.
    `facts_scale` (default 1) scales the needles (NEEDLES), chains (CHAINS)
    and pairs (PAIRS) per prompt, e.g. for a training curriculum that starts
    with fewer. `questions` (default QUESTIONS) is how many questions end a
    prompt at most, always leaving a fact unasked; None asks every fact (a
    training set's denser signal: the last one is then answerable by
    elimination).

    Facts sit at uniformly random depths among the filler sentences (in
    order within a variable chain). Raises ValueError when `context_tokens`
    cannot hold the facts and the question."""
    _check(count, context_tokens, seed)
    if questions is not None and (not isinstance(questions, int) or isinstance(questions, bool) or questions < 1):
        raise ValueError(f"questions: expected an int >= 1 or None (every fact), got {questions!r}")
    tasks = tuple(tasks)
    if not tasks or any(t not in TASKS for t in tasks):
        raise ValueError(f"tasks: expected names from {TASKS}, got {tasks!r}")
    length = _counter(tokenizer)
    examples = []
    for i in range(count):
        task = tasks[i % len(tasks)]
        rng = random.Random(f"dms.recall:{seed}:{context_tokens}:{i}:{task}")
        facts, question, answer = _facts(task, rng, facts_scale, questions)
        budget = context_tokens - length("".join(facts) + question)
        if budget < 0:
            raise ValueError(f"context_tokens: {context_tokens} cannot hold a {task} prompt's facts and question "
                             f"({context_tokens - budget} tokens)")
        filler = _filler(rng, budget, length)
        slots = sorted(rng.randrange(len(filler) + 1) for _ in facts)
        parts = list(filler)
        for fact, slot in reversed(list(zip(facts, slots))):
            parts.insert(slot, fact)  # last fact first, so facts sharing a slot keep their order
        prompt = "".join(parts).lstrip() + question
        examples.append(RecallExample(task, prompt, answer, length(prompt)))
    return examples


def make_text(count, context_tokens, seed=0, tokenizer=None):
    """`count` plain filler documents of at most `context_tokens` tokens each
    (within one sentence of it): the language-model part of a training mix."""
    _check(count, context_tokens, seed)
    length = _counter(tokenizer)
    docs = []
    for i in range(count):
        rng = random.Random(f"dms.recall.text:{seed}:{context_tokens}:{i}")
        docs.append("".join(_filler(rng, context_tokens, length)).lstrip())
    return docs


@dataclass(frozen=True)
class RecallDrill:
    """One training drill: `text`, and `answer_spans`, the character spans
    (start, end) of the answers its questions are given (each with its
    leading space), the tokens a training loss weighs as answers."""

    text: str
    answer_spans: tuple


def make_drills(count, context_tokens, seed=0, tokenizer=None, filler=0.25):
    """`count` recall drills of at most `context_tokens` tokens: the facts of
    all three tasks (needles, variable assignments and key-value pairs, in
    their prompts' wording) and answered questions about facts stated
    earlier, interleaved through the whole text, with a `filler` share of
    filler sentences between them. Where a prompt has a few retrievals in a
    long text, a drill has one every few tokens at every distance: the
    training signal that teaches a small model retrieval at all (the study's
    base model reached a fraction of the accuracy without them; issue 13).
    Questions start a line (``\nQ: The code of vup is 41.``,
    ``\nrecall vup: 41.``, ``\nQ: The value of CD is 41.``, the last one
    through a chain of ``Let`` copies)."""
    _check(count, context_tokens, seed)
    if not isinstance(filler, (int, float)) or isinstance(filler, bool) or not 0 <= filler < 1:
        raise ValueError(f"filler: expected a number in [0, 1), got {filler!r}")
    length = _counter(tokenizer)
    drills = []
    for i in range(count):
        rng = random.Random(f"dms.recall.drill:{seed}:{context_tokens}:{i}")
        taken, asked, chains = set(), [], []  # asked: (question, value); chains: [(last name, hops, value)]
        pieces, spans, used, at = [], [], 0, 0
        while True:
            roll = rng.random()
            span = None
            if roll < filler:
                piece = _sentence(rng)
            elif roll < filler + (1 - filler) / 2 or not asked:
                kind = rng.choice(TASKS)
                value = str(rng.randrange(10, 100))
                if kind == "niah":
                    key = _word(rng, taken)
                    piece, question = f" The code of {key} is {value}.", f"Q: The code of {key} is"
                elif kind == "mqar":
                    key = _word(rng, taken)
                    piece, question = f" {key}: {value}.", f"recall {key}:"
                else:
                    open_chains = [c for c in range(len(chains)) if chains[c][1] < CHAIN_HOPS]
                    name = _variable(rng, taken)
                    if open_chains and rng.random() < 0.5:
                        c = rng.choice(open_chains)
                        last, hops, value = chains[c]
                        piece = f" Let {name} = {last}."
                        chains[c] = (name, hops + 1, value)
                    else:
                        piece = f" Let {name} = {value}."
                        chains.append((name, 1, value))
                    question = f"Q: The value of {name} is"
                asked.append((question, value))
            else:
                question, value = rng.choice(asked)
                piece = f"\n{question} {value}."
                span = (at + len(piece) - len(value) - 2, at + len(piece) - 1)
            cost = length(piece)
            if used + cost > context_tokens:
                break
            pieces.append(piece)
            used += cost
            at += len(piece)
            if span:
                spans.append(span)
        text = "".join(pieces)
        strip = len(text) - len(text.lstrip())
        drills.append(RecallDrill(text[strip:], tuple((a - strip, b - strip) for a, b in spans)))
    return drills


def solve(prompt):
    """The answer of a prompt, read from its text by rules (no model): the
    check that every generated prompt holds what its question needs."""
    body = " " + prompt  # every fact then starts with a space
    question = prompt.rsplit("\n", 1)[-1]
    if question.startswith("Q: The code of ") and question.endswith(" is"):
        key = question[len("Q: The code of "):-len(" is")]
        marker = f" The code of {key} is "
        start = body.index(marker) + len(marker)
        return body[start:body.index(".", start)]
    if question.startswith("Q: The value of ") and question.endswith(" is"):
        name = question[len("Q: The value of "):-len(" is")]
        while True:
            marker = f" Let {name} = "
            start = body.index(marker) + len(marker)
            value = body[start:body.index(".", start)]
            if value.isdigit():
                return value
            name = value
    if question.startswith("recall ") and question.endswith(":"):
        key = question[len("recall "):-len(":")]
        marker = f" {key}: "
        start = body.index(marker) + len(marker)
        return body[start:body.index(".", start)]
    raise ValueError("prompt: not a recall prompt of dms.eval.recall")


_PIECES = r"\n| ?[A-Za-z]+| ?\d+| ?[^\sA-Za-z\d]| +"  # how recall_tokenizer splits text


def recall_tokenizer():
    """The word-level `PreTrainedTokenizerFast` of the quality study's models
    (made in-process, saved with them): one token per word of the filler
    grammar, key, variable name, number below 1000 and punctuation mark, with
    its leading space (``" vup"``, ``" 417"``, ``"."``, ``"\\n"``), so that a key
    is one token and an answer is one token; `<|endoftext|>` is eos and pad.
    Text outside that vocabulary becomes `<unk>`; decoding joins the pieces
    back into the text exactly."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {w for phrase in _SUBJECTS + _VERBS + _OBJECTS + _ENDINGS for w in phrase.split()}
    words |= {"Q", "The", "code", "of", "is", "value", "Let", "recall"}
    words |= {w[0].upper() + w[1:] for w in words}
    words |= {c + v + e for c in _CONSONANTS for v in _VOWELS for e in _CONSONANTS}  # niah / mqar keys
    words |= {a + b for a in _LETTERS for b in _LETTERS}  # vt variables
    words |= set(".:=,?!")
    pieces = ["<|endoftext|>", "<unk>", "\n", " "] + sorted(words | {" " + w for w in words})
    pieces += [f" {n}" for n in range(1000)]  # numbers follow a space in every text of this module
    tok = Tokenizer(models.WordLevel(vocab={p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECES), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<|endoftext|>", "<unk>"])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  unk_token="<unk>", clean_up_tokenization_spaces=False)
    out.model_max_length = 1 << 16
    return out


def score(example, generated):
    """Whether `generated` (the model's continuation) starts with the answer
    as a whole number (the next character is not a digit)."""
    text = generated.lstrip()
    return text.startswith(example.answer) and not text[len(example.answer):][:1].isdigit()


def write_jsonl(path, count, lengths, seed=0, text_fraction=0.25, tokenizer=None, drill_fraction=0.0):
    """Writes `count` documents per length as JSONL `{"text": ...}` rows to
    `path` (atomically): recall prompts followed by their completion and a
    newline, a `text_fraction` share of plain filler and a `drill_fraction`
    share of drills (`make_drills`: answered questions every few tokens, at
    every distance); returns `path`. Drills give a retrofit's distillation a
    signal on recall in most rows instead of a few answer tokens per
    prompt."""
    if not 0 <= text_fraction + drill_fraction <= 1 or min(text_fraction, drill_fraction) < 0:
        raise ValueError(f"text_fraction, drill_fraction: expected shares in [0, 1] that sum to at most 1, "
                         f"got {text_fraction!r}, {drill_fraction!r}")
    rows = []
    for length in lengths:
        n_text, n_drill = round(count * text_fraction), round(count * drill_fraction)
        rows += [ex.prompt + ex.completion + "\n"
                 for ex in make_examples(count - n_text - n_drill, length, seed, tokenizer=tokenizer)]
        rows += make_text(n_text, length, seed, tokenizer=tokenizer)
        rows += [d.text + "\n" for d in make_drills(n_drill, length - 1, seed, tokenizer=tokenizer)]
    random.Random(f"dms.recall.write:{seed}").shuffle(rows)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for text in rows:
            f.write(json.dumps({"text": text}) + "\n")
    os.replace(tmp, path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write generated recall documents as JSONL text rows.")
    parser.add_argument("--write", required=True, metavar="PATH", help="the JSONL file to write")
    parser.add_argument("--count", type=int, default=1000, help="documents per length (default 1000)")
    parser.add_argument("--lengths", default="1024", help="comma-separated lengths in tokens (default 1024)")
    parser.add_argument("--tokenizer", default="words",
                        help="what lengths count: words (recall_tokenizer, the study's models; default), bytes, "
                             "or a tokenizer's folder or hub name")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0; evaluation uses other seeds)")
    parser.add_argument("--text-fraction", type=float, default=0.25, help="share of filler documents (default 0.25)")
    parser.add_argument("--drill-fraction", type=float, default=0.0,
                        help="share of recall drills, question-dense documents (default 0)")
    args = parser.parse_args(argv)
    try:
        lengths = [int(n) for n in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths: expected comma-separated integers, got {args.lengths!r}")
    if args.count < 1 or not all(n > 0 for n in lengths):
        parser.error("--count and --lengths must be positive")
    if args.tokenizer == "words":
        tokenizer = recall_tokenizer()
    elif args.tokenizer == "bytes":
        tokenizer = None
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    try:
        write_jsonl(args.write, args.count, lengths, args.seed, args.text_fraction, tokenizer=tokenizer,
                    drill_fraction=args.drill_fraction)
    except ValueError as e:  # the shares: checked before anything is generated
        parser.error(f"--text-fraction, --drill-fraction: {e}")
    print(f"wrote {args.count * len(lengths)} documents to {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
