"""Writes the quality study's base model and one DMS retrofit into the
package (dms/assets, see dms.recall_models) in bfloat16, each with a model
card: the last step of scripts/quality_study.sh.

    python scripts/ship_recall_models.py --base outputs/recall_base \
        --dms outputs/recall_all_weights/8x --compression 8
"""

import argparse
import json
import os
import sys

from dms.recall_models import ship


def _last_accuracy(base):
    """The held-out accuracies of the base model's last evaluation."""
    with open(os.path.join(base, "training_log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    last = [r for r in rows if any(k.startswith("accuracy_") for k in r)][-1]
    return last["step"], {k.removeprefix("accuracy_"): v for k, v in last.items() if k.startswith("accuracy_")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the base model's folder (python -m dms.training.recall_base)")
    parser.add_argument("--dms", required=True, help="the retrofit to ship (a models.qwen3.extract output)")
    parser.add_argument("--compression", type=float, required=True,
                        help="the compression the retrofit was trained to (its schedule's target there)")
    args = parser.parse_args(argv)
    step, accuracy = _last_accuracy(args.base)
    with open(os.path.join(args.base, "recall_base.json")) as f:
        settings = json.load(f)
    scores = ", ".join(f"{acc:.1%} at {n} tokens" for n, acc in accuracy.items())
    table = "".join(f"| {k} | {json.dumps(v)} |\n" for k, v in settings.items() if k != "extra")
    earlier = ""
    if settings.get("grow_from"):  # a second stage: say what the first one was, from its own card
        card = os.path.join(settings["grow_from"], "README.md")
        with open(card) as f:
            first = f.read()
        marker = "settings, from its card:\n"  # that card is itself a second stage's (this script run again)
        if marker in first:
            first = first.split(marker, 1)[1].lstrip()
        elif "| setting | value |" in first:
            first = first[first.index("| setting | value |"):]
        earlier = f"""
Trained in two stages. The second ({step} steps, the settings in the first table) continued from the first
stage's weights, as they were in `{settings["grow_from"]}` then (with a fresh optimizer); the first stage's
settings, from its card:

{first.rstrip()}
"""
    base_card = f"""# recall-base

A {settings['num_hidden_layers']}-layer Qwen3 (hidden {settings['hidden_size']}, {settings['num_attention_heads']} query
and {settings['num_key_value_heads']} KV heads of dim {settings['head_dim']}) trained from scratch on a CPU by
`python -m dms.training.recall_base` ({step} steps{" in its second stage" if earlier else ""}; settings in the table below) on generated long-context recall
(`dms.eval.recall`: multi-key needles, variable tracking, associative recall, and filler text), with the word-level
tokenizer of `dms.eval.recall.recall_tokenizer`. Held-out accuracy with a full cache (teacher-forced greedy
answers, {settings['eval_examples']} prompts per length): {scores}.

The base model of the quality study (bench/QUALITY.md); `dms.recall_models.recall_model("recall-base")` loads it.

| setting | value |
| --- | --- |
""" + table + earlier
    dms_card = f"""# recall-dms

The DMS retrofit of recall-base (learned, delayed KV-cache eviction), trained by distillation from recall-base with
`python -m models.qwen3.train` (scripts/quality_study.sh, configs/recall_*.yaml) and extracted where its linear
compression schedule reached {args.compression:g}x. Shipped in bfloat16; `dms.recall_models.recall_model()` loads it,
`python -m dms.demo` asks it questions. Its accuracy, compression and the training-free baselines at the same
KV budget are in bench/QUALITY.md.
"""
    print(ship(args.base, "recall-base", base_card, {"held_out_accuracy": accuracy, "steps": step}))
    print(ship(args.dms, "recall-dms", dms_card, {"trained_compression": args.compression, "source": args.dms},
               tokenizer=args.base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
