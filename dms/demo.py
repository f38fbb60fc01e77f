"""`python -m dms.demo`: a DMS model answers long-context questions with its
KV cache compressed, next to the same model with eviction off.

Without --model it runs the shipped recall model (`dms.recall_models`: a
small Qwen3 trained here on long-context recall, with DMS retrofitted at
8x; nothing is downloaded) and asks it --questions fresh recall
questions (`dms.eval.recall`: needles, variable tracking, associative
recall, prompts of --prompt-tokens): each answer with DMS on and off next to
the right one, with the compression and the KV bytes.

With --model PATH (a checkpoint of any supported family: a DMS-retrofitted
one, or a plain one plus DMS defaults) it asks questions when --questions is
given, and otherwise prefills a random prompt in chunks and generates, and
prints the speed, the compression per layer and the KV-cache bytes against
the same run with eviction off. `--model tiny` is the built-in tiny
Qwen3-DMS (deterministic random weights, adapters set so that a real fraction
of tokens is evicted) for that run.

--kv-dtype fp8_e4m3 (or fp8_e5m2) stores the DMS run's cache in FP8 pages
(`dms.PagedLayerCache`); the run with eviction off keeps pages in --dtype,
so its KV bytes are those of a plain dense cache.

    python -m dms.demo [--model PATH|tiny] [--questions N] [--prompt-tokens N]
                       [--new-tokens 64] [--chunk 256] [--device cpu|cuda]
                       [--dtype float32] [--kv-dtype auto]
"""

import argparse
import sys
import time

import torch

import dms
from dms.models.auto import AutoModelForCausalLMDMS
from dms.models.qwen3.modeling_qwen3_dms import cache_kwargs
from dms.tiny import tiny_model


def run(model, prompt, new_tokens, disable_eviction, pad_token_id=0, kv_cache_dtype="auto"):
    model.config.dms_disable_eviction = disable_eviction
    cache = model.get_cache(kv_cache_dtype=kv_cache_dtype)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=pad_token_id, **cache_kwargs(cache))
    if prompt.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return out, cache, seconds


def ask(model, name, args):
    """--questions: fresh recall prompts answered with DMS on and off."""
    from transformers import AutoTokenizer

    from dms.eval.recall import make_examples, score

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--questions: {args.model} has no tokenizer to write questions with "
                         f"({str(e).splitlines()[0]})") from None
    examples = make_examples(args.questions, args.prompt_tokens, seed=args.seed, tokenizer=tokenizer)
    print(f"dms {dms.__version__} demo: {name}, {args.device}, {args.dtype}, DMS pages {args.kv_dtype}")
    print(f"{args.questions} recall questions, prompts of up to {args.prompt_tokens} tokens (seed {args.seed})\n")
    print(f"{'task':<6}{'answer':>8}{'DMS':>8}{'off':>8}{'compression':>13}{'KV bytes DMS':>15}{'off':>12}")
    right = {"DMS": 0, "off": 0}
    for ex in examples:
        ids = torch.tensor([tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]], device=model.device)
        answers, caches = {}, {}
        for label, disabled in (("DMS", False), ("off", True)):
            out, cache, _ = run(model, ids, len(tokenizer(ex.completion, add_special_tokens=False)["input_ids"]) + 1,
                                disabled, pad_token_id=tokenizer.pad_token_id,
                                kv_cache_dtype="auto" if disabled else args.kv_dtype)
            text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            answers[label] = (text.strip().split(" ")[0].rstrip(".") or "-")[:7]
            right[label] += score(ex, text)
            caches[label] = cache
        print(f"{ex.task:<6}{ex.answer:>8}{answers['DMS']:>8}{answers['off']:>8}"
              f"{caches['DMS'].compression_ratio():>12.2f}x{caches['DMS'].bytes_in_use():>15,}"
              f"{caches['off'].bytes_in_use():>12,}")
    model.config.dms_disable_eviction = False
    print(f"\nright: DMS {right['DMS']}/{args.questions}, eviction off {right['off']}/{args.questions} "
          "(compression = tokens seen / stored; KV bytes: pages in use once the answer is generated)")
    return 0


def _count(low, what):
    """An argparse type: an int >= low."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} (an integer >= {low}), got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what} (an integer >= {low}), got {value}")
        return value
    return parse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dms.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="checkpoint directory or hub name, or tiny: the built-in random tiny model "
                             "(default: the shipped recall model, dms.recall_models)")
    parser.add_argument("--prompt-tokens", type=_count(1, "a prompt length"), default=None,
                        help="prompt length (default 2048 with questions, else 600)")
    parser.add_argument("--new-tokens", type=_count(1, "a number of tokens"), default=64,
                        help="tokens to generate (default 64)")
    parser.add_argument("--chunk", type=_count(0, "a chunk size, 0 for one prefill"), default=256,
                        help="chunked prefill size; 0 prefills the prompt at once (default 256)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--kv-dtype", default="auto", choices=["auto", "fp8_e4m3", "fp8", "fp8_e5m2"],
                        help="pages of the DMS run's cache: auto (--dtype) or FP8 (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt and the tiny model (default 0)")
    parser.add_argument("--questions", type=_count(0, "a number of questions"), default=None,
                        help="ask this many recall questions (a model with a tokenizer; default 3 on the "
                             "shipped model, else 0: generate from a random prompt)")
    args = parser.parse_args(argv)
    if args.questions is None:
        args.questions = 3 if args.model is None else 0
    if args.prompt_tokens is None:
        args.prompt_tokens = 2048 if args.questions else 600
    if args.questions and args.model == "tiny":
        parser.error("--questions: needs a trained model (the built-in tiny model has random weights and "
                     "answers nothing; leave out --model for the shipped recall model)")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: expected cpu or cuda[:N], got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: expected cpu or cuda[:N], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch build sees no CUDA device (use --device cpu)")
    if device.type == "cuda" and not dms.build_info()["cuda"]:
        parser.error("--device cuda: dms was built without CUDA (rebuild with nvcc present, or use --device cpu)")

    dtype = getattr(torch, args.dtype)
    shipped = args.model is None
    if shipped:
        from dms.recall_models import recall_model_path

        try:
            args.model = recall_model_path()
        except FileNotFoundError as e:
            parser.error(f"{e}; or pass --model PATH or --model tiny")
    if args.model != "tiny":
        try:
            model = AutoModelForCausalLMDMS.from_pretrained(args.model, dtype=dtype)
        except OSError as e:
            parser.error(f"--model {args.model}: cannot load it ({str(e).splitlines()[0]})")
        name = "the shipped recall model (dms.recall_models)" if shipped else args.model
    else:
        model = tiny_model(args.seed).to(dtype)
        name = "built-in tiny Qwen3-DMS (4 layers, 2 KV heads, w=64, random weights)"
    model = model.to(device).eval()
    model.config.dms_chunked_prefill = args.chunk or None
    if args.questions:
        return ask(model, name, args)
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(1, model.config.vocab_size, (1, args.prompt_tokens), generator=g).to(device)

    print(f"dms {dms.__version__} demo: {name}, {args.device}, {args.dtype}, DMS pages {args.kv_dtype}")
    chunking = f"chunks of {args.chunk}" if args.chunk else "one prefill"
    print(f"prompt {args.prompt_tokens} tokens ({chunking}), generating {args.new_tokens}\n")
    rows = []
    for label, disabled in (("DMS", False), ("eviction off", True)):
        out, cache, seconds = run(model, prompt, args.new_tokens, disabled,
                                  kv_cache_dtype="auto" if disabled else args.kv_dtype)
        rows.append((label, out, cache, seconds))
    dense_bytes = rows[1][2].bytes_in_use()
    print(f"{'run':<14}{'tokens/s':>10}{'KV bytes in use':>18}{'vs dense':>10}{'compression':>13}")
    for label, out, cache, seconds in rows:
        used = cache.bytes_in_use()
        print(f"{label:<14}{args.new_tokens / seconds:>10.1f}{used:>18,}{used / dense_bytes:>10.1%}"
              f"{cache.compression_ratio():>12.2f}x")
    print("(compression = all tokens seen / all tokens stored: the KV memory saved)")
    print("\ncompression per layer (tokens seen / stored):")
    print("  " + "  ".join(f"L{i}: {r:.2f}x" for i, r in enumerate(rows[0][2].compression_ratios())))
    model.config.dms_disable_eviction = False
    print(f"\nfirst generated tokens, DMS:          {rows[0][1][0, args.prompt_tokens:][:12].tolist()}")
    print(f"first generated tokens, eviction off: {rows[1][1][0, args.prompt_tokens:][:12].tolist()}")
    if args.model == "tiny":
        print("(random weights: the two runs may pick different tokens; a retrofitted model keeps them close)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
