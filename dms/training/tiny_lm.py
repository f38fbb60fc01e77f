"""A built-in tiny model that knows something: `dms.tiny`'s random Qwen3-DMS,
first trained as a plain language model on the run's data.

A retrofit distils the model into itself with eviction on. With random
weights the teacher predicts an almost uniform distribution that eviction
barely changes, so nothing resists the compression loss and the achieved
compression overshoots the schedule. `model.tiny_lm_steps` > 0 gives the
`tiny` model a short language-model training (eviction off, every weight
but the DMS adapters, which stay at keep-everything) before the retrofit, so
the teacher has predictions worth keeping. The result is cached on disk, keyed
by everything that determines it, and reused by every later run and process.
"""

import hashlib
import json
import os
import shutil
import uuid

import torch

__all__ = ["TINY_LM_BATCH", "TINY_LM_LR", "ensure_tiny_lm", "tiny_lm_path"]

TINY_LM_BATCH = 8
"""Sequences per step of the language-model training."""
TINY_LM_LR = 3e-3
"""AdamW learning rate of the language-model training (constant)."""
_FORMAT = 1


def tiny_lm_path(config):
    """The cache folder of the trained tiny model of `config` (a
    TrainingConfig): next to the data cache, named by a hash of the seed,
    steps, DMS settings, data config and this module's format."""
    from dms.training.data import DEFAULT_CACHE_DIR

    m = config.model
    key = {"format": _FORMAT, "seed": m.init_seed, "steps": m.tiny_lm_steps, "batch": TINY_LM_BATCH,
           "lr": TINY_LM_LR, "dms": m.dms.overrides(), "data": config.data.to_dict()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    root = os.path.expanduser(config.data.cache_dir if config.data.cache_dir is not None else DEFAULT_CACHE_DIR)
    return os.path.join(root, "tiny-lm", digest)


def ensure_tiny_lm(config, *, show_progress=True):
    """Train (once) and cache the tiny language model of `config`; returns
    its folder, which `Qwen3ForCausalLMDMS.from_pretrained` loads."""
    from tqdm.auto import tqdm

    from dms.tiny import tiny_model, tiny_tokenizer
    from dms.training.data import build_dataset

    path = tiny_lm_path(config)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    tokenizer = tiny_tokenizer()
    dataset = build_dataset(config.data, tokenizer, show_progress=show_progress)
    model = tiny_model(config.model.init_seed, evicting=False, **config.model.dms.overrides())
    model.config.dms_disable_eviction = True
    model.train()
    params = [p for n, p in model.named_parameters() if "dms_proj_alpha" not in n]
    optimizer = torch.optim.AdamW(params, lr=TINY_LM_LR)
    generator = torch.Generator().manual_seed(config.model.init_seed)
    bar = tqdm(range(config.model.tiny_lm_steps), desc="tiny LM", disable=not show_progress)
    for _ in bar:
        rows = torch.randint(0, len(dataset), (TINY_LM_BATCH,), generator=generator).tolist()
        batch = [dataset[i] for i in rows]
        input_ids = torch.stack([b["input_ids"] for b in batch])
        attention_mask = torch.stack([b["attention_mask"] for b in batch])
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.config.dms_disable_eviction = False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:  # written aside and renamed: readers see a whole model or none
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path
