"""Retrofit training runs end to end: prepare the data, train, save the
student, extract a student from an intermediate checkpoint.

`python -m models.train` and `python -m models.extract` (any family: it comes
from the checkpoint's model_type; `models.qwen3.train` and
`models.qwen3.extract` are the same commands under the seed's names) are thin
wrappers of `main_train` and `main_extract`; `scripts/train.sh` runs the
first with --prepare-dataset-only in one process, then under
`accelerate launch`.
"""

import argparse
import glob
import importlib.util
import json
import os
import sys
import tempfile
import warnings

import torch

from dms.training.config import ConfigError, load_config, parse_set_args
from dms.training.engine import (
    DMSTrainer,
    cr_schedule,
    eos_token_ids,
    freeze_for_training,
    load_student,
    load_teacher,
    load_tokenizer,
    resolve_resume,
    save_student_model,
    torch_dtype,
)

__all__ = ["build_training_arguments", "extract", "main_extract", "main_train", "prepare_data",
           "read_checkpoint_weights", "save_final_student", "train"]

STUDENT_DIR = "student_model"


def _report_to(setting):
    if setting == "auto":
        found = [name for name in ("tensorboard", "tensorboardX") if importlib.util.find_spec(name)]
        return ["tensorboard"] if found else "none"
    return setting


def _has_accelerator():
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu and xpu.is_available()) or torch.backends.mps.is_available()


def build_training_arguments(config):
    """`transformers.TrainingArguments` of config.trainer (creating them sets
    up the distributed state under `accelerate launch`)."""
    from transformers import TrainingArguments

    t = config.trainer
    kwargs = dict(
        output_dir=t.output_dir, max_steps=t.max_steps, per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon, optim=t.optim,
        max_grad_norm=t.max_grad_norm, bf16=t.bf16,
        logging_steps=t.logging_steps, save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500, save_total_limit=t.save_total_limit, seed=t.seed, fsdp=t.fsdp or "",
        fsdp_config=t.fsdp_config, dataloader_num_workers=t.dataloader_num_workers, report_to=_report_to(t.report_to),
        # Our batches are fixed-length {input_ids, attention_mask} dicts.
        remove_unused_columns=False,
        # Every trained parameter takes part in every step.
        ddp_find_unused_parameters=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without an accelerator, processes started by accelerate launch /
        # torchrun join one gloo group (accelerate treats them as unrelated
        # single processes unless told to use the CPU).
        use_cpu=not _has_accelerator(),
    )
    # transformers renamed gradient_checkpointing to activation_checkpointing (5.2x).
    name = "activation_checkpointing" if hasattr(TrainingArguments, "activation_checkpointing") \
        else "gradient_checkpointing"
    kwargs[name] = t.gradient_checkpointing
    if t.gradient_checkpointing:
        # Non-reentrant: works when no input of a layer requires grad (frozen
        # embeddings); the gate noise is recomputed identically in backward.
        kwargs[f"{name}_kwargs"] = {"use_reentrant": False}
    kwargs.update(t.training_arguments)
    return TrainingArguments(**kwargs)


def prepare_data(config, *, show_progress=True):
    """Tokenise and cache the training data of `config` (one process);
    returns the cache folder."""
    from dms.training.data import prepare_dataset

    path = prepare_dataset(config.data, load_tokenizer(config.model), show_progress=show_progress)
    if config.model.name_or_path == "tiny" and config.model.tiny_lm_steps:
        from dms.training.tiny_lm import ensure_tiny_lm

        ensure_tiny_lm(config, show_progress=show_progress)
    return path


def train(config, callbacks=None):
    """Run the training of `config`: save the resolved config as
    OUTPUT/config.yaml, train (resuming as trainer.resume_from_checkpoint
    says), and write the student to OUTPUT/student_model/. `callbacks`:
    extra `transformers.TrainerCallback`s. Returns the `DMSTrainer` (its
    `state.log_history` holds the logs)."""
    from transformers import default_data_collator, set_seed

    from dms.training.data import build_dataset

    args = build_training_arguments(config)
    output_dir = config.trainer.output_dir
    tokenizer = load_tokenizer(config.model)
    with args.main_process_first(desc="training data"):
        dataset = build_dataset(config.data, tokenizer, show_progress=args.local_process_index == 0)
    if args.should_save:
        config.save(os.path.join(output_dir, "config.yaml"))
    set_seed(args.seed)
    with args.main_process_first(desc="models"):  # the tiny LM is trained and cached once
        student = load_student(config, show_progress=args.local_process_index == 0)
        teacher = load_teacher(config, student, show_progress=args.local_process_index == 0)
    trainable_dtype = torch_dtype(config.model.trainable_dtype) if config.model.trainable_dtype else None
    freeze_for_training(student, config.distillation.train_all_weights, trainable_dtype)
    trainer = DMSTrainer(model=student, args=args, train_dataset=dataset, processing_class=tokenizer,
                         data_collator=default_data_collator, distillation=config.distillation,
                         final_step=config.final_step, teacher=teacher,
                         eos_ids=eos_token_ids(tokenizer, student.config), callbacks=callbacks)
    if config.trainer.fsdp and not trainer.is_fsdp_enabled:
        warnings.warn(f"trainer.fsdp is {config.trainer.fsdp!r}, but accelerate shards only on GPUs (and other "
                      f"accelerators); this {trainer.accelerator.distributed_type} run keeps a whole model per "
                      f"process", stacklevel=2)
    resume = resolve_resume(config.trainer.resume_from_checkpoint, output_dir)
    if resume is not None and args.should_save:
        print(f"resuming from {resume}", file=sys.stderr)
    trainer.train(resume_from_checkpoint=resume)
    save_final_student(trainer, config, tokenizer, os.path.join(output_dir, STUDENT_DIR))
    return trainer


def save_final_student(trainer, config, tokenizer, path):
    """Gather the trained student (from FSDP shards when sharded; every
    process must call this) and write it to `path` in the save dtype."""
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.args.should_save:
        model = trainer.accelerator.unwrap_model(trainer.model)
        dtype = torch_dtype(config.model.save_dtype or config.model.dtype)
        cr = cr_schedule(trainer.state.global_step, config.distillation.initial_cr, config.distillation.final_cr,
                         config.final_step)
        save_student_model(model, path, dtype=dtype, tokenizer=tokenizer, state_dict=state_dict, final_cr=cr)
        print(f"student saved to {path}", file=sys.stderr)
    trainer.accelerator.wait_for_everyone()


def read_checkpoint_weights(checkpoint):
    """The model state dict of a Trainer checkpoint folder: model.safetensors
    (or its sharded index), pytorch_model.bin, or the FSDP forms
    (pytorch_model_fsdp.bin from FULL_STATE_DICT, pytorch_model_fsdp_0/ from
    SHARDED_STATE_DICT). Tensors are on the CPU."""
    from safetensors.torch import load_file

    def path(name):
        return os.path.join(checkpoint, name)

    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"checkpoint: no such directory {checkpoint!r}")
    if os.path.isfile(path("model.safetensors")):
        return load_file(path("model.safetensors"))
    for index, loader in (("model.safetensors.index.json", load_file),
                          ("pytorch_model.bin.index.json", lambda f: torch.load(f, map_location="cpu",
                                                                                weights_only=True))):
        if os.path.isfile(path(index)):
            with open(path(index)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            out = {}
            for shard in shards:
                out.update(loader(path(shard)))
            return out
    for name in ("pytorch_model.bin", "pytorch_model_fsdp.bin"):
        if os.path.isfile(path(name)):
            return torch.load(path(name), map_location="cpu", weights_only=True)
    sharded = sorted(glob.glob(path("pytorch_model_fsdp_*")))
    if sharded and os.path.isdir(sharded[0]):
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(sharded[0], os.path.join(tmp, "model.pt"))
            loaded = torch.load(os.path.join(tmp, "model.pt"), map_location="cpu", weights_only=True)
        return loaded.get("model", loaded)
    raise FileNotFoundError(f"checkpoint: {checkpoint!r} holds no model weights (looked for model.safetensors, "
                            f"its index, pytorch_model.bin, pytorch_model_fsdp.bin and pytorch_model_fsdp_0/)")


def _checkpoint_step(checkpoint):
    state = os.path.join(checkpoint, "trainer_state.json")
    if os.path.isfile(state):
        with open(state) as f:
            return int(json.load(f)["global_step"])
    return None


def extract(config, checkpoint, output=None):
    """Write the student of an intermediate `checkpoint` (a Trainer
    checkpoint folder of the run `config` describes) as a loadable model to
    `output` (default CHECKPOINT/student_model); returns `output`."""
    output = output or os.path.join(checkpoint, STUDENT_DIR)
    state_dict = read_checkpoint_weights(checkpoint)
    model = load_student(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ()) if model.config.tie_word_embeddings else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"checkpoint: {checkpoint!r} does not match the model of {config.source or 'the config'}: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    if os.path.isfile(os.path.join(checkpoint, "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    else:
        tokenizer = load_tokenizer(config.model)
    step = _checkpoint_step(checkpoint)
    cr = None if step is None else cr_schedule(step, config.distillation.initial_cr, config.distillation.final_cr,
                                               config.final_step)
    dtype = torch_dtype(config.model.save_dtype or config.model.dtype)
    return save_student_model(model, output, dtype=dtype, tokenizer=tokenizer, final_cr=cr)


def _config_from_args(parser, args):
    try:
        return load_config(args.config, parse_set_args(args.set))
    except (ConfigError, FileNotFoundError) as e:
        parser.error(str(e))


def main_train(argv=None, prog="python -m models.train"):
    """python -m models.train --config FILE [--prepare-dataset-only] [--set KEY=VALUE ...]"""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Retrofit DMS onto a Llama, Mistral, Qwen2, Qwen3 or Qwen3-MoE model by distillation "
                    "(SPEC §6; the family comes from model.name_or_path's model_type). Run from the repository "
                    "root; under `accelerate launch` for several processes (scripts/train.sh does both steps).")
    parser.add_argument("--config", required=True, help="YAML config (configs/*.yaml; keys in configs/README.md)")
    parser.add_argument("--prepare-dataset-only", action="store_true",
                        help="tokenise and cache the training data, then exit (run once before a multi-process "
                             "launch)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key by its dotted path, e.g. --set trainer.max_steps=10 "
                             "(value parsed as YAML; repeatable)")
    args = parser.parse_args(argv)
    config = _config_from_args(parser, args)
    if args.prepare_dataset_only:
        path = prepare_data(config)
        print(f"training data cached in {path}")
        return 0
    train(config)
    return 0


def main_extract(argv=None, prog="python -m models.extract"):
    """python -m models.extract --config OUTPUT/config.yaml --checkpoint OUTPUT/checkpoint-N [--output DIR]"""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write a loadable DMS student model from an intermediate training checkpoint.")
    parser.add_argument("--config", required=True, help="the run's config (OUTPUT/config.yaml)")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder (OUTPUT/checkpoint-N)")
    parser.add_argument("--output", default=None, help="where to write the model (default CHECKPOINT/student_model)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key by its dotted path (repeatable)")
    args = parser.parse_args(argv)
    config = _config_from_args(parser, args)
    if not os.path.isdir(args.checkpoint):
        parser.error(f"--checkpoint: no such directory {args.checkpoint!r}")
    path = extract(config, args.checkpoint, args.output)
    print(f"student saved to {path}")
    return 0
