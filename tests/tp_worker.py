"""Run by tests/test_tensor_parallel.py under `torchrun --nproc_per_node 2`
(gloo on CPU, or NCCL with --cuda): loads each model directory twice, on this
process alone and with tp_plan="auto", drives both through every turn
pattern with the same tokens, and rank 0 writes what differed to a JSON file.

    torchrun --nproc_per_node 2 tests/tp_worker.py MODELS.json OUT.json [--cuda]

MODELS.json: [{"name": ..., "path": ..., "refused": true if loading with
tp_plan must fail}, ...]. OUT.json: {name: {check: max |difference| of
logits, or a bool / a pair of values / an error message}}.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from dms import AutoModelForCausalLMDMS


def _max_diff(a, b):
    return float((a.float().cpu() - b.float().cpu()).abs().max())


def _turns(model, ids, device):
    """Logits of a 24-token prefill, 5 decode steps and a new 9-token turn
    (fixed tokens, the same for every model); the cache's figures after them."""
    cache = model.get_cache()
    out = [model(input_ids=ids[:, :24].to(device), cache=cache).logits]
    for t in range(24, 29):
        out.append(model(input_ids=ids[:, t:t + 1].to(device), cache=cache).logits)
    out.append(model(input_ids=ids[:, 29:38].to(device), cache=cache).logits)
    stats = cache.compression_stats()
    return out, stats, cache.bytes_in_use()


def _check(path, device):
    ref = AutoModelForCausalLMDMS.from_pretrained(path, dtype=torch.float32).to(device).eval()
    tp = AutoModelForCausalLMDMS.from_pretrained(path, dtype=torch.float32, tp_plan="auto").eval()
    result = {"local_kv_heads": tp.model.layers[0].self_attn.local_kv_heads(),
              "kv_heads": tp.config.num_key_value_heads}
    vocab = tp.config.vocab_size
    ids = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ref(input_ids=ids.to(device)), tp(input_ids=ids.to(device))
        result["prefill"] = _max_diff(a.logits, b.logits)
        result["prefill_cr"] = [a.compression_ratio, b.compression_ratio]
        (la, sa, ba), (lb, sb, bb) = _turns(ref, ids, device), _turns(tp, ids, device)
        result["turns"] = max(_max_diff(x, y) for x, y in zip(la, lb))
        result["turns_cr"] = [sa["compression_ratios"], sb["compression_ratios"]]
        result["turns_tokens"] = [sa["tokens_stored"], sb["tokens_stored"]]
        result["turns_bytes"] = [ba, bb]
        for m in (ref, tp):
            m.config.dms_chunked_prefill = 16
        a, b = ref(input_ids=ids.to(device)), tp(input_ids=ids.to(device))
        result["chunked"] = _max_diff(a.logits, b.logits)
        result["chunked_cr"] = [a.compression_ratio, b.compression_ratio]
        for m in (ref, tp):
            m.config.dms_chunked_prefill = None
        mask = torch.ones(2, 30, dtype=torch.long)
        mask[1, :7] = 0  # left padding
        kw = dict(attention_mask=mask.to(device), max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                  output_scores=True, pad_token_id=0)
        ga, gb = ref.generate(ids[:, :30].to(device), **kw), tp.generate(ids[:, :30].to(device), **kw)
        result["generate_tokens"] = bool(torch.equal(ga.sequences.cpu(), gb.sequences.cpu()))
        result["generate"] = max(_max_diff(x, y) for x, y in zip(ga.scores, gb.scores))
        if tp.config.dms_decision_target != "current":
            kw = dict(max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
            result["beam_tokens"] = bool(torch.equal(ref.generate(ids[:, :20].to(device), **kw).cpu(),
                                                     tp.generate(ids[:, :20].to(device), **kw).cpu()))
        tp.train()
        try:
            tp(input_ids=ids.to(device))
            result["train_refused"] = None
        except ValueError as e:
            result["train_refused"] = str(e)
    return result


def _load_error(path):
    try:
        AutoModelForCausalLMDMS.from_pretrained(path, dtype=torch.float32, tp_plan="auto")
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


def main():
    models, out = json.load(open(sys.argv[1])), sys.argv[2]
    cuda = "--cuda" in sys.argv
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    results = {m["name"]: (_load_error(m["path"]) if m.get("refused") else _check(m["path"], device))
               for m in models}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
