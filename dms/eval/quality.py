"""Accuracy of a model on generated recall prompts (`dms.eval.recall`)
through the inference path users get — `generate` with a `DMSCache`, greedy,
one prompt per row — together with the KV budget it used: tokens stored per
(layer, KV head) row at the end of each prompt, and the compression ratio
(all tokens seen / all tokens stored). `matched_baselines` sizes the
training-free policies of `dms.eval.baselines` to the budget a DMS run used.

    model = AutoModelForCausalLMDMS.from_pretrained(path).eval()
    result = evaluate_recall(model, tokenizer, make_examples(60, 1024, seed=1_000_003,
                                                                  tokenizer=tokenizer))
    result["accuracy"], result["stored_per_row"], result["compression_ratio"]
"""

import torch

from dms.eval.baselines import H2O, TOVA, ContentBlind, StreamingLLM, eviction_policy
from dms.eval.recall import score

__all__ = ["evaluate_recall", "matched_baselines"]


@torch.no_grad()
def evaluate_recall(model, tokenizer, examples, *, policy=None, window_size=None, show_progress=False):
    """Greedy answers of `model` (eval mode) to `examples` through generate
    with a fresh DMSCache per prompt; `policy`/`window_size` run a baseline
    (see `dms.eval.baselines.eviction_policy`).

    Returns accuracy, per-task accuracy, stored_per_row (mean tokens stored
    per (layer, KV head) row once the prompt is read, all but its last token,
    which generate feeds), seen_per_row (the same for tokens seen),
    compression_ratio (their ratio), the evicted fraction of decisions on
    the prompts, and the answers given. Each prompt is prefilled once: the
    cache that was measured is the one generate continues."""
    from tqdm.auto import tqdm

    from dms.models.qwen3.modeling_qwen3_dms import cache_kwargs

    right, by_task, answers = 0, {}, []
    seen = stored = 0
    evicted = 0.0
    with eviction_policy(model, policy, window_size):
        for ex in tqdm(examples, desc="recall", disable=not show_progress, leave=False):
            ids = torch.tensor([tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]],
                               device=model.device)
            cache = model.get_cache()
            out = model(ids[:, :-1], **cache_kwargs(cache))  # the prompt: its budget is measured here
            stats = cache.compression_stats()
            seen += sum(stats["tokens_seen"])
            stored += sum(stats["tokens_stored"])
            evicted += float(out.evicted_fraction.sum())
            n_answer = len(tokenizer(ex.completion, add_special_tokens=False)["input_ids"])
            generated = model.generate(ids, max_new_tokens=n_answer + 1, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id, **cache_kwargs(cache))
            text = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
            ok = score(ex, text)
            right += ok
            hits, total = by_task.get(ex.task, (0, 0))
            by_task[ex.task] = (hits + ok, total + 1)
            answers.append(text)
    n = max(1, len(examples))
    rows = n * model.config.num_hidden_layers * model.config.num_key_value_heads
    return {"accuracy": right / n, "per_task": {t: h / c for t, (h, c) in by_task.items()},
            "stored_per_row": stored / rows, "seen_per_row": seen / rows,
            "compression_ratio": seen / stored if stored else 1.0, "evicted_fraction": evicted / n,
            "answers": answers}


def matched_baselines(dms_result, window, sinks=4, seed=0, chunk=16):
    """{name: (policy, window_size)} of training-free baselines at the
    budget `dms_result` (an `evaluate_recall` result of the DMS model) used:
    content-blind eviction at its evicted fraction (same window),
    StreamingLLM whose sinks + window hold its mean stored tokens per row,
    and TOVA and H2O keeping that many tokens per row (prompts read in
    chunks of `chunk` tokens, their own window; see dms.eval.baselines)."""
    budget = max(int(round(dms_result["stored_per_row"])), 2)
    streaming_window = max(budget - sinks - 1, 1)
    return {"content-blind": (ContentBlind(dms_result["evicted_fraction"], seed), window),
            "StreamingLLM": (StreamingLLM(sinks), streaming_window),
            "TOVA": (TOVA(budget, chunk=chunk), None),
            "H2O": (H2O(budget, chunk=chunk), None)}
