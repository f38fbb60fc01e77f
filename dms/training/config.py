"""The YAML config of a retrofit training run: load, validate, resolve defaults, save.

A config has five sections, each optional (a missing one takes its defaults):

    model:         the student (what to load, dtypes, DMS settings)
    teacher:       the teacher (default: the student's own weights with eviction off)
    distillation:  the compression schedule and what trains
    data:          the training data (validated by `dms.training.data.DataConfig`)
    trainer:       the Hugging Face Trainer (steps, batch, optimiser, checkpoints, FSDP)

Every key is validated on load; a bad value raises `ConfigError` naming the
key by its dotted path (``trainer.max_steps: expected an int >= 1, got 0``)
and unknown keys are rejected. Every key has a default, listed in the
section classes below and in configs/README.md. `TrainingConfig.save` writes
the resolved config (defaults filled in) as OUTPUT/config.yaml, which
`load_config` reads back unchanged (`python -m models.extract` uses it).
"""

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ConfigError",
    "DistillationConfig",
    "ModelConfig",
    "DMSModelConfig",
    "TeacherConfig",
    "TrainerConfig",
    "TrainingConfig",
    "apply_overrides",
    "load_config",
    "parse_set_args",
]

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config value is missing its expected form; the message starts with
    the dotted key."""


# --- value checks: each returns the (normalised) value or raises ConfigError ---

def _fail(key, expected, value):
    raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bool(key, v):
    if not isinstance(v, bool):
        _fail(key, "true or false", v)
    return v


def _int(minimum, optional=False):
    def check(key, v):
        if optional and v is None:
            return v
        if not _is_int(v) or v < minimum:
            _fail(key, f"{'null or ' if optional else ''}an int >= {minimum}", v)
        return v
    return check


def _float(minimum=None, positive=False, optional=False):
    def check(key, v):
        if optional and v is None:
            return v
        if isinstance(v, str):  # PyYAML reads 3e-5 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                pass
        ok = _is_number(v) and (minimum is None or v >= minimum) and (not positive or v > 0)
        if not ok:
            bound = " > 0" if positive else (f" >= {minimum}" if minimum is not None else "")
            _fail(key, f"{'null or ' if optional else ''}a finite number{bound}", v)
        return float(v)
    return check


def _str(optional=False, nonempty=True):
    def check(key, v):
        if optional and v is None:
            return v
        if not isinstance(v, str) or (nonempty and not v):
            _fail(key, f"{'null or ' if optional else ''}a{' non-empty' if nonempty else ''} string", v)
        return v
    return check


def _choice(*choices, optional=False):
    def check(key, v):
        if optional and v is None:
            return v
        if v not in choices:
            _fail(key, ("null or " if optional else "") + " or ".join(repr(c) for c in choices), v)
        return v
    return check


def _dict(optional=False):
    def check(key, v):
        if optional and v is None:
            return v
        if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
            _fail(key, f"{'null or ' if optional else ''}a mapping with string keys", v)
        return copy.deepcopy(v)
    return check


def _report_to(key, v):
    if isinstance(v, str) and v:
        return v
    if isinstance(v, list) and v and all(isinstance(x, str) and x for x in v):
        return list(v)
    _fail(key, "'auto', 'none', an integration name or a list of them", v)


def _fsdp(key, v):
    if isinstance(v, (str, bool)):
        return v
    _fail(key, "a transformers fsdp string such as 'full_shard auto_wrap', true (settings in fsdp_config), "
               "or '' / false for none", v)


def _resume(key, v):
    if v is None or (isinstance(v, str) and v):
        return v
    _fail(key, "null, 'auto' or the path of a checkpoint directory", v)


def _check(fn, doc):
    """Field metadata: the validator and the one-line documentation."""
    return {"check": fn, "doc": doc}


# --- sections ---

@dataclass
class DMSModelConfig:
    """`model.dms`: DMS fields of the student's DMS config (`Qwen3ConfigDMS`,
    `LlamaConfigDMS`, ...; SPEC.md names without the `dms_` prefix). Each
    default null keeps the loaded checkpoint's value (the DMS config's default
    for a plain checkpoint).

    separate_alpha: decisions from a separate adapter (true; the recipe) or a
        borrowed query neuron (false). Adapters-only training needs true.
    alpha_per: "head" or "layer".
    window_size: eviction delay w in tokens.
    tau: Gumbel-sigmoid temperature.
    alpha_scale: decision logit scale s.
    initial_alpha_offset: decision logit offset o.
    paged_attention_block_size: cache page size P (< window_size).
    chunked_prefill: prefill chunk for inference, stored in the saved model.
    preallocate_for_tokens: cache tokens reserved per row at inference.
    """

    separate_alpha: bool | None = field(default=None, metadata=_check(
        lambda k, v: v if v is None else _bool(k, v), "adapter (true) or borrowed neuron (false)"))
    alpha_per: str | None = field(default=None, metadata=_check(
        _choice("head", "layer", optional=True), "'head' or 'layer'"))
    window_size: int | None = field(default=None, metadata=_check(_int(1, optional=True), "eviction delay w"))
    tau: float | None = field(default=None, metadata=_check(
        _float(positive=True, optional=True), "Gumbel-sigmoid temperature"))
    alpha_scale: float | None = field(default=None, metadata=_check(_float(optional=True), "logit scale s"))
    initial_alpha_offset: float | None = field(default=None, metadata=_check(
        _float(optional=True), "logit offset o"))
    paged_attention_block_size: int | None = field(default=None, metadata=_check(
        _int(1, optional=True), "cache page size P"))
    chunked_prefill: int | None = field(default=None, metadata=_check(
        _int(1, optional=True), "inference prefill chunk"))
    preallocate_for_tokens: int | None = field(default=None, metadata=_check(
        _int(0, optional=True), "inference cache reservation"))

    def overrides(self):
        """{dms_<name>: value} for the fields that are set (for from_pretrained)."""
        return {f"dms_{k}": v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class ModelConfig:
    """`model`: the student.

    name_or_path: a Hugging Face id or directory of a plain or DMS checkpoint
        of a supported family (model_type llama, mistral, qwen2, qwen3,
        qwen3_moe, or their "_dms" types), or "tiny" for the built-in tiny
        model (dms.tiny) (default "tiny").
    dtype: dtype the weights load in: float32, bfloat16 or float16
        (default float32).
    trainable_dtype: dtype of the trained parameters (default null: dtype);
        float32 keeps full-precision adapters over a bfloat16 model. Not with
        FSDP, which needs one dtype per sharded unit.
    save_dtype: dtype of the saved student (default null: dtype).
    tokenizer: tokenizer id or directory (default null: name_or_path; the
        built-in byte tokenizer for "tiny").
    init_seed: seed of the built-in tiny model's random weights (default 0;
        only for "tiny").
    tiny_lm_steps: only for "tiny": first train the random model as a plain
        language model on the run's data for this many steps (eviction off,
        adapters untouched; cached on disk), so the teacher has predictions
        worth keeping (default 0: the random model as dms.tiny makes it).
    dms: the `model.dms` section (`DMSModelConfig`).
    """

    name_or_path: str = field(default="tiny", metadata=_check(_str(), "checkpoint id/path or 'tiny'"))
    dtype: str = field(default="float32", metadata=_check(_choice(*DTYPES), "weights dtype"))
    trainable_dtype: str | None = field(default=None, metadata=_check(
        _choice(*DTYPES, optional=True), "trained parameters' dtype"))
    save_dtype: str | None = field(default=None, metadata=_check(
        _choice(*DTYPES, optional=True), "saved student's dtype"))
    tokenizer: str | None = field(default=None, metadata=_check(_str(optional=True), "tokenizer id/path"))
    init_seed: int = field(default=0, metadata=_check(_int(0), "tiny model seed"))
    tiny_lm_steps: int = field(default=0, metadata=_check(_int(0), "tiny LM pre-training steps"))
    dms: DMSModelConfig = field(default_factory=DMSModelConfig, metadata={"section": DMSModelConfig})


@dataclass
class TeacherConfig:
    """`teacher`: what the student is distilled from.

    name_or_path: null (default): the student's own weights with eviction
        off, one model and two forward passes per step (with
        distillation.train_all_weights: a frozen copy of the student's
        initial weights). Otherwise a separate frozen checkpoint
        ("tiny" for the built-in model) with the student's vocabulary.
    dtype: dtype of a separate teacher (default null: model.dtype).
    """

    name_or_path: str | None = field(default=None, metadata=_check(_str(optional=True), "teacher checkpoint"))
    dtype: str | None = field(default=None, metadata=_check(_choice(*DTYPES, optional=True), "teacher dtype"))


@dataclass
class DistillationConfig:
    """`distillation`: the objective of SPEC §6.

    initial_cr: compression ratio targeted at step 0 (default 1.0).
    final_cr: compression ratio reached at `final_step` and kept after
        (default 8.0).
    final_step: step at which final_cr is reached (default null:
        trainer.max_steps). target(step) = 1 - 1/cr(step), cr linear in between.
    train_all_weights: train every parameter (the paper's recipe) instead of
        the DMS adapters only (default false).
    kl_chunk_size: positions per chunk of the KL and LM-loss computation
        (default 512); bounds the float32 working set to
        kl_chunk_size x vocabulary.
    """

    initial_cr: float = field(default=1.0, metadata=_check(_float(minimum=1.0), "CR at step 0"))
    final_cr: float = field(default=8.0, metadata=_check(_float(minimum=1.0), "CR at final_step"))
    final_step: int | None = field(default=None, metadata=_check(_int(1, optional=True), "end of the CR ramp"))
    train_all_weights: bool = field(default=False, metadata=_check(_bool, "train every weight"))
    kl_chunk_size: int = field(default=512, metadata=_check(_int(1), "positions per loss chunk"))


@dataclass
class TrainerConfig:
    """`trainer`: the Hugging Face Trainer (transformers.TrainingArguments).

    output_dir: where checkpoints, config.yaml and student_model/ go
        (default "outputs/dms").
    max_steps: optimiser steps (default 544).
    per_device_train_batch_size: sequences per device per micro-step (default 1).
    gradient_accumulation_steps: micro-steps per optimiser step (default 1).
    learning_rate: peak learning rate (default 3e-5).
    lr_scheduler_type: a transformers scheduler name (default "constant").
    warmup_steps: learning-rate warm-up steps (default 0).
    weight_decay: AdamW weight decay (default 0.0).
    adam_beta1, adam_beta2, adam_epsilon: AdamW (default 0.9, 0.999, 1e-8).
    optim: a transformers optimiser name (default "adamw_torch").
    max_grad_norm: gradient clipping norm, 0 = off (default 1.0).
    bf16: bfloat16 autocast (default false).
    gradient_checkpointing: recompute layer activations in backward (default false).
    logging_steps: log every this many steps (default 1).
    save_steps: checkpoint every this many steps; null = no intermediate
        checkpoints (default 50).
    save_total_limit: keep at most this many checkpoints (default null: all).
    seed: seed of the Trainer and of the DMS gate noise (default 42).
    fsdp: transformers' `fsdp` setting: a string such as "full_shard
        auto_wrap", or true with everything in fsdp_config (default "": no
        FSDP).
    fsdp_config: transformers' `fsdp_config` mapping (default null).
    dataloader_num_workers: data-loading worker processes (default 0).
    report_to: "auto" (TensorBoard when installed, else none), "none", or
        integration names (default "auto").
    resume_from_checkpoint: null (start fresh), "auto" (the newest
        output_dir/checkpoint-N, fresh if none) or a checkpoint path
        (default null).
    training_arguments: any other TrainingArguments fields, passed through
        unchanged (default {}).
    """

    output_dir: str = field(default="outputs/dms", metadata=_check(_str(), "output directory"))
    max_steps: int = field(default=544, metadata=_check(_int(1), "optimiser steps"))
    per_device_train_batch_size: int = field(default=1, metadata=_check(_int(1), "micro-batch"))
    gradient_accumulation_steps: int = field(default=1, metadata=_check(_int(1), "micro-steps per step"))
    learning_rate: float = field(default=3e-5, metadata=_check(_float(minimum=0.0), "learning rate"))
    lr_scheduler_type: str = field(default="constant", metadata=_check(_str(), "scheduler"))
    warmup_steps: int = field(default=0, metadata=_check(_int(0), "warm-up steps"))
    weight_decay: float = field(default=0.0, metadata=_check(_float(minimum=0.0), "weight decay"))
    adam_beta1: float = field(default=0.9, metadata=_check(_float(minimum=0.0), "AdamW beta1"))
    adam_beta2: float = field(default=0.999, metadata=_check(_float(minimum=0.0), "AdamW beta2"))
    adam_epsilon: float = field(default=1e-8, metadata=_check(_float(positive=True), "AdamW epsilon"))
    optim: str = field(default="adamw_torch", metadata=_check(_str(), "optimiser"))
    max_grad_norm: float = field(default=1.0, metadata=_check(_float(minimum=0.0), "clip norm"))
    bf16: bool = field(default=False, metadata=_check(_bool, "bfloat16 autocast"))
    gradient_checkpointing: bool = field(default=False, metadata=_check(_bool, "activation recompute"))
    logging_steps: int = field(default=1, metadata=_check(_int(1), "log interval"))
    save_steps: int | None = field(default=50, metadata=_check(_int(1, optional=True), "checkpoint interval"))
    save_total_limit: int | None = field(default=None, metadata=_check(_int(1, optional=True), "checkpoints kept"))
    seed: int = field(default=42, metadata=_check(_int(0), "seed"))
    fsdp: str | bool = field(default="", metadata=_check(_fsdp, "FSDP mode"))
    fsdp_config: dict | None = field(default=None, metadata=_check(_dict(optional=True), "FSDP options"))
    dataloader_num_workers: int = field(default=0, metadata=_check(_int(0), "loader workers"))
    report_to: Any = field(default="auto", metadata=_check(_report_to, "loggers"))
    resume_from_checkpoint: str | None = field(default=None, metadata=_check(_resume, "resume"))
    training_arguments: dict = field(default_factory=dict, metadata=_check(_dict(), "extra TrainingArguments"))


_SECTIONS = {"model": ModelConfig, "teacher": TeacherConfig, "distillation": DistillationConfig,
             "trainer": TrainerConfig}


def _build(cls, raw, prefix):
    """An instance of the section dataclass `cls` from the mapping `raw`,
    every key checked; `prefix` is the dotted path of the section."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        _fail(prefix, "a mapping of keys to values", raw)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}"
        if key not in fields:
            raise ConfigError(f"{dotted}: unknown key; {prefix} takes {', '.join(sorted(fields))}")
        meta = fields[key].metadata
        if "section" in meta:
            values[key] = _build(meta["section"], value, dotted)
        else:
            values[key] = meta["check"](dotted, value)
    return cls(**values)


@dataclass
class TrainingConfig:
    """A validated training config: `model`, `teacher`, `distillation`,
    `trainer` (the dataclasses above) and `data` (a
    `dms.training.data.DataConfig`)."""

    model: ModelConfig
    teacher: TeacherConfig
    distillation: DistillationConfig
    trainer: TrainerConfig
    data: Any
    source: str | None = None  # the file it came from, for messages

    @classmethod
    def from_dict(cls, raw, source=None):
        """Validate a config mapping (as read from YAML); raises ConfigError
        naming the first bad key."""
        from dms.training.data import DataConfig

        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
        known = set(_SECTIONS) | {"data"}
        for key in raw:
            if key not in known:
                raise ConfigError(f"{key}: unknown section; a config takes {', '.join(sorted(known))}")
        sections = {name: _build(kind, raw.get(name), name) for name, kind in _SECTIONS.items()}
        try:
            data = DataConfig.from_dict(copy.deepcopy(raw.get("data") or {}))
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:  # DataConfig names the key as data.<key>
            raise ConfigError(str(e)) from None
        config = cls(data=data, source=source, **sections)
        config._check_consistency()
        return config

    def _check_consistency(self):
        d, t, m = self.distillation, self.trainer, self.model
        if d.final_cr < d.initial_cr:
            raise ConfigError(f"distillation.final_cr: expected >= distillation.initial_cr ({d.initial_cr}), "
                              f"got {d.final_cr}")
        if m.tiny_lm_steps and m.name_or_path != "tiny":
            raise ConfigError(f"model.tiny_lm_steps: only for the built-in model (model.name_or_path: tiny); "
                              f"use 0 with {m.name_or_path!r}")
        if m.trainable_dtype not in (None, m.dtype) and t.fsdp:
            raise ConfigError(f"model.trainable_dtype: FSDP shards parameters in units of one dtype; with "
                              f"trainer.fsdp set use null (= model.dtype {m.dtype!r}), got {m.trainable_dtype!r}")
        taken = {f.name for f in dataclasses.fields(TrainerConfig)} | {
            "output_dir", "save_strategy", "remove_unused_columns", "activation_checkpointing",
            "gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"}
        for key in t.training_arguments:
            if key in taken:
                raise ConfigError(f"trainer.training_arguments.{key}: set by the engine or by trainer.{key}; "
                                  f"remove it from training_arguments")
        if t.training_arguments:
            import transformers

            valid = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
            for key in t.training_arguments:
                if key not in valid:
                    raise ConfigError(f"trainer.training_arguments.{key}: unknown key; not a field of "
                                      f"transformers.TrainingArguments")

    @property
    def final_step(self):
        """The step at which the CR ramp ends (distillation.final_step, else max_steps)."""
        return self.distillation.final_step or self.trainer.max_steps

    def to_dict(self):
        """The resolved config as plain data (every default filled in)."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}
        out["data"] = _data_dict(self.data)
        return {k: out[k] for k in ("model", "teacher", "distillation", "data", "trainer")}

    def save(self, path):
        """Write the resolved config as YAML to `path` (a file) and return it."""
        import yaml

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write("# Resolved DMS training config: every key with the value this run used.\n")
            yaml.safe_dump(self.to_dict(), f, sort_keys=False, default_flow_style=False)
        return path


def _data_dict(data):
    if hasattr(data, "to_dict"):
        return data.to_dict()
    if dataclasses.is_dataclass(data):
        return dataclasses.asdict(data)
    return dict(vars(data))


def parse_set_args(items):
    """["a.b=1", "c=x"] -> {"a.b": 1, "c": "x"}; each value is parsed as YAML
    (numbers, true/false, null, lists)."""
    import yaml

    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set: expected KEY=VALUE with a dotted key (trainer.max_steps=10), got {item!r}")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def apply_overrides(raw, overrides):
    """A copy of the config mapping `raw` with `overrides` applied: a mapping
    of dotted keys ("trainer.max_steps") or nested mappings to values."""
    out = copy.deepcopy(raw) if raw else {}
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and "." not in key:
            for sub, v in value.items():
                out = apply_overrides(out, {f"{key}.{sub}": v})
            continue
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[:i + 1])}: is a value, cannot set {key} below it")
            node = child
        node[parts[-1]] = copy.deepcopy(value)
    return out


def load_config(path, overrides=None):
    """Read the YAML file `path`, apply `overrides` (see `apply_overrides`)
    and validate: a `TrainingConfig`. Errors name the key and the file."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config: no such file {path!r}")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {path} is not valid YAML: {e}") from None
    raw = apply_overrides(raw or {}, overrides)
    try:
        return TrainingConfig.from_dict(raw, source=path)
    except ConfigError as e:
        raise ConfigError(f"{e} (in {path})") from None
