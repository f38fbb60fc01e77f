"""Quality of DMS against training-free eviction at the same KV budget, on
generated long-context recall prompts (issue 13): accuracy per task and
held-out perplexity of the base model (vanilla), of each DMS retrofit, and of
the training-free policies (content-blind, StreamingLLM, TOVA, H2O) sized to
the budget each DMS model used, at each context length (in the base
tokenizer's tokens). Prints a Markdown table (and writes it, with a
plot of accuracy against compression, when --out is given).

    python bench/quality.py --models adapters-2x=outputs/recall_adapters/cr2,adapters-4x=...
    python bench/quality.py --quick      # 20 prompts per length

Every model runs through the inference path users get: `generate` with a
`DMSCache`, greedy, one prompt per row.
"""

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import command_line, machine_description  # noqa: E402

from dms import AutoModelForCausalLMDMS  # noqa: E402
from dms.eval.baselines import eviction_policy  # noqa: E402
from dms.eval.quality import evaluate_recall, matched_baselines  # noqa: E402
from dms.eval.recall import make_examples, make_text  # noqa: E402

ANSWER_ROOM = 16  # positions a prompt leaves free for generating its answer
EVAL_SEED = 1_000_003  # no training step of dms.training.recall_base draws from this seed


def _models(text):
    out = []
    for item in filter(None, (text or "").split(",")):
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"--models: expected LABEL=PATH[,LABEL=PATH...], got {item!r}")
        out.append((label, path))
    return out


@torch.no_grad()
def perplexity(model, tokenizer, docs):
    """exp(mean next-token loss) over `docs`, each one prefill through a
    DMSCache (eval mode: the attention with eviction, as decode sees it)."""
    total, count = 0.0, 0
    for doc in docs:
        ids = torch.tensor([tokenizer(doc, add_special_tokens=False)["input_ids"]])
        out = model(ids, labels=ids)
        total += float(out.loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return math.exp(total / count)


def _row(length, method, result, ppl):
    tasks = " / ".join(f"{result['per_task'].get(t, float('nan')):.2f}" for t in ("niah", "vt", "mqar"))
    budget = f"{result['stored_per_row']:.0f} / {result['seen_per_row']:.0f}"
    return [length, method, f"{result['accuracy']:.3f}", tasks, budget, f"{result['compression_ratio']:.2f}x",
            f"{ppl:.3f}"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="outputs/recall_base", help="the base model (vanilla)")
    parser.add_argument("--models", default="", help="DMS models, LABEL=PATH,... (default none)")
    parser.add_argument("--lengths", default="2048,3072",
                        help="prompt lengths in tokens (default 2048,3072: the trained length and a longer one)")
    parser.add_argument("--count", type=int, default=60, help="prompts per length (default 60)")
    parser.add_argument("--quick", action="store_true", help="20 prompts per length and 4 documents of perplexity")
    parser.add_argument("--sinks", type=int, default=4, help="StreamingLLM's attention sinks (default 4)")
    parser.add_argument("--out", default=None, help="write the table (.md) and the plot (.png) here")
    parser.add_argument("--merge", default=None, metavar="A.md,B.md",
                        help="instead of measuring: join tables this bench wrote (runs done in parallel) into "
                             "one, vanilla once per length, and plot it; needs --out")
    args = parser.parse_args(argv)
    if args.merge:
        if not args.out:
            parser.error("--merge: needs --out (where the joined table and its plot go)")
        return _merge(args.merge.split(","), args.out)
    count = 20 if args.quick else args.count
    lengths = [int(n) for n in args.lengths.split(",")]
    torch.manual_seed(0)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    base = AutoModelForCausalLMDMS.from_pretrained(args.base).eval()  # a plain checkpoint: keeps everything
    room = base.config.max_position_embeddings - ANSWER_ROOM
    if max(lengths) > room:  # found before an hour of shorter lengths is spent, not after
        parser.error(f"--lengths: {max(lengths)} leaves no room for the answer in the base model's "
                     f"{base.config.max_position_embeddings} positions (at most {room})")
    header = ["length", "method", "accuracy", "niah / vt / mqar", "stored / seen per row", "compression", "perplexity"]
    rows, points = [], []
    start = time.time()
    for length in lengths:
        # Lengths count the model's own tokens (make_examples counts UTF-8 bytes without a tokenizer:
        # a "2048" prompt would be ~440 words long, and the 64-token window a seventh of it).
        examples = make_examples(count, length, seed=EVAL_SEED, tokenizer=tokenizer)
        docs = make_text(4 if args.quick else 12, length, seed=EVAL_SEED, tokenizer=tokenizer)
        vanilla = evaluate_recall(base, tokenizer, examples, show_progress=True)
        rows.append(_row(length, "vanilla", vanilla, perplexity(base, tokenizer, docs)))
        points.append(("vanilla", length, 1.0, vanilla["accuracy"]))
        for label, path in _models(args.models):
            model = AutoModelForCausalLMDMS.from_pretrained(path).eval()
            result = evaluate_recall(model, tokenizer, examples, show_progress=True)
            rows.append(_row(length, f"DMS {label}", result, perplexity(model, tokenizer, docs)))
            points.append((f"DMS {label.rsplit('-', 1)[0]}", length, result["compression_ratio"], result["accuracy"]))
            # The baselines run the base model with the DMS model's window, on pages of its size (a plain
            # checkpoint gets the default 256-slot pages; page size changes the memory layout, not results).
            base.config.dms_paged_attention_block_size = model.config.dms_paged_attention_block_size
            for name, (policy, window) in matched_baselines(result, model.config.dms_window_size,
                                                            sinks=args.sinks).items():
                baseline = evaluate_recall(base, tokenizer, examples, policy=policy, window_size=window,
                                           show_progress=True)
                with eviction_policy(base, policy, window):
                    ppl = perplexity(base, tokenizer, docs)
                rows.append(_row(length, f"{name} at {label}", baseline, ppl))
                points.append((name, length, baseline["compression_ratio"], baseline["accuracy"]))
        _write(header, rows, points, count, start, args.out)  # after every length: a long run keeps what it did
    return 0


def _write(header, rows, points, count, start, out):
    """Prints the table so far and writes it (and its plot) to `out`."""
    lines = [f"recall quality, {count} prompts per length (seed {EVAL_SEED}); `{command_line()}`",
             machine_description("cpu") + f"; {time.time() - start:.0f} s"] + _table(header, rows)
    print("\n".join(lines))
    if out:
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")
        _plot(points, os.path.splitext(out)[0] + ".png")


def _table(header, rows):
    """Markdown lines of a table, columns padded to their widest cell."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["| " + " | ".join(str(x).ljust(w) for x, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return lines + ["| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |" for row in rows]


def _point(row):
    """(method line, length, compression, accuracy) of a table row."""
    length, method, accuracy, _, _, compression = row[:6]
    if method.startswith("DMS "):
        method = method.rsplit("-", 1)[0]
    elif " at " in method:
        method = method.split(" at ")[0]
    return method, int(length), float(compression.rstrip("x")), float(accuracy)


def _merge(paths, out):
    """Joins tables written by --out into `out` (rows sorted by length, the
    first table's order within a length; vanilla once) and plots them."""
    heads, rows = [], []
    for path in paths:
        with open(path) as f:
            lines = f.read().splitlines()
        table = [line for line in lines if line.startswith("|")]
        heads += [line for line in lines if line and not line.startswith("|")]
        header = table[0]
        for line in table[2:]:
            row = [cell.strip() for cell in line.strip("|").split("|")]
            if row[1] != "vanilla" or not any(r[0] == row[0] and r[1] == "vanilla" for r in rows):
                rows.append(row)
    rows.sort(key=lambda r: int(r[0]))  # stable: each table's order within a length
    text = heads + _table([cell.strip() for cell in header.strip("|").split("|")], rows)
    with open(out, "w") as f:
        f.write("\n".join(text) + "\n")
    _plot([_point(r) for r in rows], os.path.splitext(out)[0] + ".png")
    print("\n".join(text))
    return 0


def _plot(points, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({p[1] for p in points})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        for method in dict.fromkeys(p[0] for p in points):
            xs = [(c, a) for m, n, c, a in points if m == method and n == length]
            xs.sort()
            ax.plot([c for c, _ in xs], [a for _, a in xs], marker="o", label=method)
        ax.set_title(f"{length} tokens")
        ax.set_xlabel("KV compression (tokens seen / stored)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4)
    fig.savefig(path, dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    sys.exit(main())
