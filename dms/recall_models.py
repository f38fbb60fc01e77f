"""The recall models shipped with dms: the quality study's base model, a
small Qwen3 trained from scratch here on generated long-context recall
(`python -m dms.training.recall_base`), and its DMS retrofit (all weights
trained by distillation with `python -m models.qwen3.train`, extracted where
the schedule reached 8x); bench/QUALITY.md has how they were made and what
they score. Both are ordinary Hugging Face directories (bfloat16
safetensors, config, the word-level tokenizer of
`dms.eval.recall.recall_tokenizer`) inside the package: nothing is
downloaded.

    >>> from dms.recall_models import recall_model, recall_model_path
    >>> model = recall_model()                 # the DMS retrofit, float32 on the CPU
    >>> base = recall_model("recall-base")     # the model it was retrofitted onto

`python -m dms.demo` asks the DMS model fresh questions; the offline lm-eval
task `dms_recall` runs on either directory (`pretrained=$(python -c "from
dms.recall_models import recall_model_path; print(recall_model_path())")`).
"""

import json
import os
import shutil

__all__ = ["ASSETS", "NAMES", "recall_model", "recall_model_path", "ship"]

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
"""Where the shipped model directories are."""

NAMES = ("recall-dms", "recall-base")
"""The shipped models: the DMS retrofit (the default) and its base model."""


def recall_model_path(name="recall-dms"):
    """The directory of shipped model `name` (one of NAMES)."""
    if name not in NAMES:
        raise ValueError(f"name: expected one of {NAMES}, got {name!r}")
    path = os.path.join(ASSETS, name)
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"{path}: the shipped model {name!r} is missing from this installation "
                                "(a source checkout has it under dms/assets; scripts/quality_study.sh remakes it)")
    return path


def recall_model(name="recall-dms", dtype=None, **kwargs):
    """Shipped model `name` loaded with `AutoModelForCausalLMDMS` (float32
    unless `dtype` says otherwise; `kwargs` go to `from_pretrained`, config
    overrides included). The base model loads as a DMS model that evicts
    nothing, on pages of the retrofit's size (so that training-free policies
    run on it with the retrofit's window: `dms.eval.baselines`)."""
    import torch

    from dms.models.auto import AutoModelForCausalLMDMS

    if name == "recall-base" and "dms_paged_attention_block_size" not in kwargs:
        with open(os.path.join(recall_model_path(), "config.json")) as f:
            kwargs["dms_paged_attention_block_size"] = json.load(f)["dms_paged_attention_block_size"]
    return AutoModelForCausalLMDMS.from_pretrained(recall_model_path(name), dtype=dtype or torch.float32, **kwargs)


def ship(source, name, card, meta, tokenizer=None):
    """Writes model directory `source` into the package as shipped model
    `name`, its weights in bfloat16, with `card` (Markdown: what it is, how
    it was made, what it scores) as its README.md and `meta` (a dict, e.g.
    the compression it was trained for: `trained_compression`) as
    shipped.json, and the tokenizer of `tokenizer` (a folder; default
    `source`); returns the new directory. The quality study's last step
    (scripts/quality_study.sh)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import dms.models  # noqa: F401  (a DMS directory loads as its DMS class, a plain one stays plain)

    if name not in NAMES:
        raise ValueError(f"name: expected one of {NAMES}, got {name!r}")
    target = os.path.join(ASSETS, name)
    tmp = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(tokenizer or source).save_pretrained(tmp)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(card.rstrip() + "\n")
    with open(os.path.join(tmp, "shipped.json"), "w") as f:
        json.dump(meta, f, indent=2)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp, target)
    return target
