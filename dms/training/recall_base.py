"""Trains, from scratch, a small model that needs its memory: a plain Qwen3
(the word-level `dms.eval.recall.recall_tokenizer`: a key and an answer are
one token each) on `dms.eval.recall`'s generated mix of
long-context recall prompts and filler text. It is the base model that DMS
is retrofitted onto in the quality study (bench/quality.py, issue 13); the
result is an ordinary Hugging Face directory (config, safetensors, tokenizer)
that `Qwen3ForCausalLMDMS.from_pretrained` loads with fresh adapters.

    python -m dms.training.recall_base --output outputs/recall_base
    python -m dms.training.recall_base --output outputs/recall_base --steps 6000   # continues a run
    python -m dms.training.recall_base --output outputs/base6 --steps 1500 --set num_hidden_layers=6 \
        --set grow_from=outputs/recall_base --set induction_steps=0 --set ramp_steps=0   # a deeper model from it
    python -m dms.training.recall_base --output outputs/base_w --steps 1500 --set head_dim=64 \
        --set grow_from=outputs/recall_base --set induction_steps=0 --set ramp_steps=0   # wider heads from it

Training runs in two phases: `induction_steps` of copying random token
sequences (which forms the content-matching attention that recall needs;
the recall mix alone plateaued at picking one of the context's values), then
the recall mix, itself starting on short prompts with few facts (`ramp_*`).

Every step draws fresh examples (a pure function of the seed and the step),
so nothing is memorised and a resumed run sees exactly the data it would
have seen. A checkpoint (weights, optimizer, step, log) is written every
`--save-every` steps, atomically; a run started on an output folder that has
one continues from it. Progress shows on a tqdm bar; `training_log.jsonl`
records the losses and, every `--eval-every` steps, the held-out accuracy.
"""

import argparse
import json
import math
import os
import random
import shutil
import sys
from dataclasses import asdict, dataclass, field

import torch

__all__ = ["BaseConfig", "batch_for_step", "grow", "main", "recall_accuracy", "train", "widen_heads"]


@dataclass
class BaseConfig:
    """Model and training settings (every field has a default; the command
    line's --set KEY=VALUE overrides one)."""

    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 768
    max_position_embeddings: int = 4096
    rope_theta: float = 1e6  # Qwen3's (transformers' Qwen3Config default, 1e4, leaves too few slow RoPE pairs at 2K)
    # Initial q_norm / k_norm weights (Qwen3's: 1). With sharper attention from the start (2.5) and a
    # learning rate of 3e-3 this model learned nothing of pure associative recall in 600 steps, where
    # 1.0 and 1e-3 learned to pick the context's values (measured in issue 13's notes).
    qk_norm_init: float = 1.0
    # Curriculum, phase 1: the first steps train copying of random token sequences only (a sequence, a
    # random gap, the sequence again; loss on the copy). Content-based copying (an induction head) is
    # what recall needs, and the recall mix alone did not form it: every run plateaued at picking one of
    # the context's values. After this phase the recall mix starts (and ramp_steps count from there).
    induction_steps: int = 1500
    induction_rows: int = 32  # rows per phase-1 step ...
    induction_span: int = 32  # ... each: this many random tokens, a gap of 0 to span-1, the copy, padding ...
    # ... drawn from this many word and number tokens (a seeded sample). Copying formed in ~1400 steps with
    # 890 distinct tokens and had not by 1500 with all ~4400 (each is seen less often); any set larger
    # than hidden_size spans the embedding space, so the copy it teaches works for every token.
    induction_vocab: int = 1000
    lengths: tuple = (256, 512, 1024, 2048)  # prompt lengths in tokens; a step uses one
    tokens_per_step: int = 8192  # rows per step = tokens_per_step // length
    text_fraction: float = 0.25  # rows of plain filler text; the rest are recall prompts ...
    drill_fraction: float = 0.5  # ... of which this share are drills (dms.eval.recall.make_drills)
    drill_filler: float = 0.25  # share of filler sentences among a drill's items
    answer_weight: float = 2.0  # extra loss weight: mean over answer tokens, added to the LM mean
    # The tasks that the recall prompts of a step cycle through (shuffled per step); a name given twice
    # gets twice the prompts. The default weighs the three alike.
    task_mix: tuple = ("niah", "vt", "mqar")
    facts_scale: float = 1.0  # facts per training prompt, x the evaluation's (dms.eval.recall facts_scale) ...
    questions: int = None  # ... and questions per prompt (None: every fact), for more retrieval signal per token
    ramp_steps: int = 1500  # curriculum: over these first steps the facts per prompt grow linearly ...
    ramp_start: float = 0.25  # ... from this share of facts_scale (one needle: the copy that bootstraps retrieval) ...
    ramp_lengths: tuple = (128, 256)  # ... at these prompt lengths
    steps: int = 5000  # 1500 of copying, then 3500 of the recall mix: 91% / 92% held-out at 1024 / 2048 (issue 13)
    learning_rate: float = 1e-3  # see qk_norm_init
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of the learning rate
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    autocast_bf16: bool = False  # bfloat16 autocast (float32 master weights): ~1.6x faster where the CPU has AMX
    eval_lengths: tuple = (1024, 2048)
    eval_examples: int = 90  # held-out prompts per length (tasks cycled)
    eval_seed: int = 1_000_003  # held-out examples come from seeds no training step uses
    # Start from a trained base (a folder this module wrote) instead of random weights: its layers keep
    # their weights and the layers this config adds (num_hidden_layers above the base's) are interleaved
    # among them with their output projections (o_proj, down_proj) zeroed, so step 0 computes what the
    # base computed. How the 6-layer recall base grew from the 4-layer one (issue 13). A head_dim a
    # whole multiple of the base's widens its heads the same way (widen_heads). Set
    # induction_steps=0 and ramp_steps=0 with it: the base has been through both.
    grow_from: str = None
    extra: dict = field(default_factory=dict)

    def model_config(self, tokenizer):
        from transformers import Qwen3Config

        return Qwen3Config(vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=self.hidden_size,
                           num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                           num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                           intermediate_size=self.intermediate_size,
                           max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
                           bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)


def _encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def batch_for_step(config, tokenizer, step):
    """(input_ids, labels, answer_mask) [rows, T] of training step `step`: a
    pure function of (config.seed, step). Recall rows are prompt + completion
    + eos, text rows text + eos; padding is eos with label -100. The answer
    mask marks the tokens of every answer: the prompt's answered questions
    and the completion (a drill's: its answered questions)."""
    from dms.eval.recall import make_drills, make_examples, make_text

    rng = random.Random(f"dms.recall_base:{config.seed}:{step}")
    if step < config.induction_steps:
        return _copy_batch(config, tokenizer, rng)
    step -= config.induction_steps
    ramping = step < config.ramp_steps
    length = rng.choice(config.ramp_lengths if ramping else config.lengths)
    scale = config.facts_scale * (config.ramp_start + (1 - config.ramp_start) * step / config.ramp_steps
                                  if ramping else 1.0)
    rows = max(1, config.tokens_per_step // length)
    n_text = sum(rng.random() < config.text_fraction for _ in range(rows))
    n_drill = sum(rng.random() < config.drill_fraction for _ in range(rows - n_text))
    seed = config.seed * 1_000_000 + step  # eval_seed is far from every training seed
    tasks = list(config.task_mix)
    rng.shuffle(tasks)
    sequences, marked = [], []
    for ex in make_examples(rows - n_text - n_drill, length, seed=seed, tasks=tasks, tokenizer=tokenizer,
                            facts_scale=scale, questions=config.questions):
        text = ex.prompt + ex.completion
        marked.append((text, _answered_spans(ex.prompt) + [(len(ex.prompt), len(text))]))
    marked += [(d.text, d.answer_spans) for d in make_drills(n_drill, length - 1, seed=seed, tokenizer=tokenizer,
                                                               filler=config.drill_filler)]
    for text, spans in marked:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        marks = [any(a <= start and end <= b for a, b in spans) for start, end in encoded["offset_mapping"]]
        sequences.append((encoded["input_ids"] + [tokenizer.eos_token_id], marks + [False]))
    for doc in make_text(n_text, length, seed=seed, tokenizer=tokenizer):
        seq = _encode(tokenizer, doc) + [tokenizer.eos_token_id]
        sequences.append((seq, [False] * len(seq)))
    width = max(len(s) for s, _ in sequences)
    ids = torch.full((len(sequences), width), tokenizer.eos_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    answers = torch.zeros(ids.shape, dtype=torch.bool)
    for r, (seq, marks) in enumerate(sequences):
        ids[r, :len(seq)] = torch.tensor(seq)
        labels[r, :len(seq)] = ids[r, :len(seq)]
        answers[r, :len(seq)] = torch.tensor(marks)
    return ids, labels, answers


def _copy_batch(config, tokenizer, rng):
    """Phase 1 (`induction_steps`): rows of `induction_span` random tokens of
    `induction_vocab` words and numbers, a random gap of 0 to span - 1 random tokens, the same
    tokens again, then random tokens up to 4 x span; labels and answers are
    the copy's tokens after its first (the ones a content match predicts)."""
    words = sorted(i for p, i in tokenizer.get_vocab().items() if len(p) > 1 and p[0] == " " and p[1:].isalnum())
    words = random.Random(f"dms.recall_base.copy:{config.seed}").sample(words, min(len(words), config.induction_vocab))
    span = config.induction_span
    rows, copies = [], []
    for _ in range(config.induction_rows):
        gap = rng.randrange(span)
        first = [rng.choice(words) for _ in range(span)]
        row = first + [rng.choice(words) for _ in range(gap)] + first
        rows.append(row + [rng.choice(words) for _ in range(4 * span - len(row))])
        copies.append(span + gap)
    ids = torch.tensor(rows)
    answers = torch.zeros(ids.shape, dtype=torch.bool)
    for r, start in enumerate(copies):
        answers[r, start + 1:start + span] = True
    return ids, torch.where(answers, ids, -100), answers


def _answered_spans(prompt):
    """Character spans (with the leading space) of the answers of a prompt's
    answered questions: the lines after its first newline but the last."""
    spans, at = [], prompt.index("\n")
    for line in prompt[at + 1:].split("\n")[:-1]:
        at += 1
        value = line.rsplit(" ", 1)[1][:-1]  # "... is 417." -> "417"
        end = at + len(line) - 1
        spans.append((end - len(value) - 1, end))
        at += len(line)
    return spans


def _losses(model, ids, labels, answers):
    """(LM loss over every real token, loss over answer tokens or None)."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    target = labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                  ignore_index=-100, reduction="none").view(target.shape)
    real = target != -100
    lm = per_token[real].mean()
    answer = answers[:, 1:]
    return lm, (per_token[answer].mean() if bool(answer.any()) else None)


@torch.no_grad()
def recall_accuracy(model, tokenizer, examples, batch_size=8):
    """Exact-match accuracy of greedy answers, teacher-forced: an answer
    counts when the argmax at each of its tokens is that token and the text
    they make with the next argmax scores (`dms.eval.recall.score`: no digit
    follows; what greedy generation would print). Plain forward passes, no
    cache: the base model's own accuracy."""
    from dms.eval.recall import score

    right = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        seqs = [(_encode(tokenizer, e.prompt), _encode(tokenizer, e.completion)) for e in chunk]
        width = max(len(p) + len(a) for p, a in seqs)
        ids = torch.full((len(seqs), width), tokenizer.eos_token_id, dtype=torch.long)
        for r, (p, a) in enumerate(seqs):
            ids[r, :len(p) + len(a)] = torch.tensor(p + a)
        predicted = model(input_ids=ids).logits.argmax(-1)
        for r, (p, a) in enumerate(seqs):
            guess = predicted[r, len(p) - 1:len(p) + len(a)].tolist()
            right += guess[:-1] == a and score(chunk[r], tokenizer.decode(guess))
    return right / max(1, len(examples))


@torch.no_grad()
def widen_heads(base, head_dim, seed=0):
    """A copy of `base` (a Qwen3ForCausalLM with default RoPE) whose attention
    heads are `head_dim` wide, a whole multiple f of the base's, computing
    what `base` computes up to a tiny change of the keys' RMS. Base
    dimension pair i (rotated at frequency i of d / 2) becomes pair f * i,
    which RoPE rotates at the same frequency at the new width; the new
    dimensions start at zero in the queries and the output projection and
    small (1e-4 of the base's scale) in the keys and values, so that the
    new query rows, key rows and output columns get gradients at once (the
    values' new rows once the output columns move). The norms' weights
    absorb the change of the RMS over more dimensions and of the softmax
    scale 1 / sqrt(head_dim): the queries' keep theirs, the keys' are
    divided by sqrt(f)."""
    from transformers import Qwen3ForCausalLM

    config = base.config
    d = config.head_dim
    rope = getattr(config, "rope_parameters", None) or {}
    if head_dim % d or head_dim < d:
        raise ValueError(f"grow_from: head_dim = {head_dim} is not a whole multiple of the base's {d}")
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"grow_from: widening the heads needs default RoPE, the base has {rope.get('rope_type')!r}")
    f = head_dim // d
    wide_config = type(config).from_dict({**config.to_dict(), "head_dim": head_dim})
    wide = Qwen3ForCausalLM(wide_config).to(next(base.parameters()).dtype)
    half = d // 2
    old = torch.arange(d)
    new = torch.where(old < half, f * old, f * (old - half) + head_dim // 2)  # where base dim o lands
    g = torch.Generator().manual_seed(seed)
    ours = dict(wide.named_parameters())
    for name, param in base.named_parameters():
        target = ours[name]
        if target.shape == param.shape:
            target.copy_(param)
            continue
        leaf = name.rsplit(".", 2)[-2]
        if leaf in ("q_norm", "k_norm"):
            target.fill_(float(param.mean()))
            target[new] = param
            if leaf == "k_norm":
                target /= f ** 0.5
            continue
        heads = param.shape[0 if leaf != "o_proj" else 1] // d
        rows = (torch.arange(heads)[:, None] * head_dim + new[None, :]).flatten()
        if leaf == "o_proj":
            target.zero_()
            target[:, rows] = param
            continue
        small = 0.0 if leaf == "q_proj" else 1e-4 * float(param.std())
        target.copy_(torch.randn(target.shape, generator=g) * small)
        target[rows] = param
    return wide


@torch.no_grad()
def grow(model, base):
    """Copies `base` (a Qwen3ForCausalLM of the same widths, or heads a whole
    factor narrower (`widen_heads`), and at most as many layers) into
    `model`: base layer i becomes layer i * L // L_base (L, L_base: the
    layer counts), every other layer keeps its fresh weights with its output
    projections zeroed, so that `model` computes what `base` computes until
    training changes them."""
    if base.config.head_dim != model.config.head_dim:
        base = widen_heads(base, model.config.head_dim)
    layers, base_layers = model.model.layers, base.model.layers
    if len(base_layers) > len(layers):
        raise ValueError(f"grow_from: the base has {len(base_layers)} layers, more than num_hidden_layers = "
                         f"{len(layers)}")
    ours = dict(model.named_parameters())
    for name, param in base.named_parameters():
        if name not in ours or ours[name].shape != param.shape:
            raise ValueError(f"grow_from: the base's {name} {tuple(param.shape)} does not fit this config "
                             f"({tuple(ours[name].shape) if name in ours else 'absent'}); only "
                             "num_hidden_layers and head_dim may differ")
    placed = {i * len(layers) // len(base_layers): layer for i, layer in enumerate(base_layers)}
    for name, param in base.named_parameters():
        if not name.startswith("model.layers."):
            ours[name].copy_(param)
    for i, layer in enumerate(layers):
        if i in placed:
            layer.load_state_dict(placed[i].state_dict())
        else:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()


def _lr_at(config, step):
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.learning_rate * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def _save_checkpoint(output, model, optimizer, step, config):
    path = os.path.join(output, "checkpoint")
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "config": asdict(config)},
               os.path.join(tmp, "trainer_state.pt"))
    old = f"{path}.old-{os.getpid()}"
    if os.path.isdir(path):
        os.rename(path, old)
    os.rename(tmp, path)  # readers see the old checkpoint or the new one, never half of one
    shutil.rmtree(old, ignore_errors=True)


def train(config, output, *, eval_every=250, save_every=100, show_progress=True):
    """Trains (or continues) the base model into `output`; returns the model."""
    from tqdm.auto import tqdm
    from transformers import Qwen3ForCausalLM

    from dms.eval.recall import make_examples, recall_tokenizer

    tokenizer = recall_tokenizer()
    os.makedirs(output, exist_ok=True)
    checkpoint = os.path.join(output, "checkpoint")
    start = 0
    if os.path.isfile(os.path.join(checkpoint, "trainer_state.pt")):
        model = Qwen3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        state = torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=False)
        start = state["step"]
        # A field newer than the checkpoint: what the run did without it.
        defaults = {**asdict(BaseConfig()), "drill_fraction": 0.0, "induction_steps": 0}
        saved = {**{k: defaults[k] for k in defaults.keys() - state["config"].keys()}, **state["config"]}
        saved = {k: v for k, v in saved.items() if k != "steps"}
        wanted = {k: v for k, v in asdict(config).items() if k != "steps"}
        if json.loads(json.dumps(saved)) != json.loads(json.dumps(wanted)):
            changed = sorted(k for k in wanted if json.dumps(saved.get(k)) != json.dumps(wanted[k]))
            raise ValueError(f"output: its checkpoint was trained with other settings ({', '.join(changed)}); "
                             "continue with the same settings (only --steps may change) or use another folder")
    else:
        torch.manual_seed(config.seed)
        model = Qwen3ForCausalLM(config.model_config(tokenizer))
        for name, param in model.named_parameters():
            if name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")):
                param.data.fill_(config.qk_norm_init)
        if config.grow_from is not None:
            grow(model, Qwen3ForCausalLM.from_pretrained(config.grow_from, dtype=torch.float32))
        state = None
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=config.learning_rate)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    held_out = {n: make_examples(config.eval_examples, n, seed=config.eval_seed, tokenizer=tokenizer)
                for n in config.eval_lengths}
    log_path = os.path.join(output, "training_log.jsonl")
    if os.path.isfile(log_path):  # steps logged after the checkpoint are done again: log them once
        with open(log_path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= start]
        with open(log_path, "w") as f:
            f.writelines(kept)
    bar = tqdm(range(start, config.steps), desc="recall base", initial=start, total=config.steps,
               disable=not show_progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(config, step)
        ids, labels, answers = batch_for_step(config, tokenizer, step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.autocast_bf16):
            lm, answer = _losses(model, ids, labels, answers)
        loss = lm if answer is None else lm + config.answer_weight * answer
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        entry = {"step": step + 1, "loss": loss.item(), "lm_loss": lm.item(),
                 "answer_loss": None if answer is None else answer.item(), "grad_norm": float(grad_norm),
                 "lr": _lr_at(config, step), "length": int(ids.shape[1])}
        if (step + 1) % eval_every == 0 or step + 1 == config.steps:
            model.eval()
            entry.update({f"accuracy_{n}": recall_accuracy(model, tokenizer, ex) for n, ex in held_out.items()})
            model.train()
        bar.set_postfix(loss=f"{entry['lm_loss']:.3f}", answer=f"{entry['answer_loss'] or 0:.3f}",
                        **{k: f"{v:.2f}" for k, v in entry.items() if k.startswith("accuracy")})
        with open(log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        if (step + 1) % save_every == 0 or step + 1 == config.steps:
            _save_checkpoint(output, model, optimizer, step + 1, config)
    model.eval()
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    with open(os.path.join(output, "recall_base.json"), "w") as f:
        json.dump(asdict(config), f, indent=2)
    return model


def _parse_value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder of the model (and of its checkpoint while training)")
    parser.add_argument("--steps", type=int, default=BaseConfig.steps, help="total steps (default %(default)s)")
    parser.add_argument("--eval-every", type=int, default=250, help="held-out accuracy every N steps (default 250)")
    parser.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a BaseConfig field, e.g. --set hidden_size=128 --set lengths=[256,512]")
    args = parser.parse_args(argv)
    for name in ("steps", "eval_every", "save_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected an int >= 1, got {getattr(args, name)}")
    config = BaseConfig(steps=args.steps)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in BaseConfig.__dataclass_fields__ or key == "extra":
            parser.error(f"--set {item}: expected KEY=VALUE with KEY one of "
                         f"{', '.join(k for k in BaseConfig.__dataclass_fields__ if k != 'extra')}")
        value = _parse_value(value)
        setattr(config, key, tuple(value) if isinstance(value, list) else value)
    train(config, args.output, eval_every=args.eval_every, save_every=args.save_every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
