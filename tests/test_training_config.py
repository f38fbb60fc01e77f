"""Training configs: the shipped ones load; every bad key is reported by its
dotted path; unknown keys are rejected; overrides (--set, dicts) apply; the
resolved config round-trips through OUTPUT/config.yaml; every key and its
default is documented in configs/README.md."""

import dataclasses
import os
import re

import pytest
import yaml

from dms.training.config import (
    ConfigError,
    DistillationConfig,
    DMSModelConfig,
    ModelConfig,
    TeacherConfig,
    TrainerConfig,
    TrainingConfig,
    apply_overrides,
    load_config,
    parse_set_args,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
SECTIONS = {"model": ModelConfig, "model.dms": DMSModelConfig, "teacher": TeacherConfig,
            "distillation": DistillationConfig, "trainer": TrainerConfig}


def _minimal(**sections):
    raw = {"data": {"blend": "sample:1.0"}}
    raw.update(sections)
    return raw


@pytest.mark.parametrize("name", ["tiny", "qwen3_8b", "qwen3_1.7b", "recall_adapters", "recall_all_weights"])
def test_shipped_configs_load(name):
    config = load_config(os.path.join(CONFIGS, f"{name}.yaml"))
    assert config.model.dms.separate_alpha is True
    assert config.trainer.output_dir == f"outputs/{name}"


def test_the_seed_recipe():
    c = load_config(os.path.join(CONFIGS, "qwen3_8b.yaml"))
    assert c.model.name_or_path == "Qwen/Qwen3-8B" and c.model.dtype == "bfloat16"
    d = c.model.dms
    assert (d.window_size, d.tau, d.alpha_scale, d.initial_alpha_offset) == (512, 0.1, 100.0, 5.0)
    assert (c.distillation.initial_cr, c.distillation.final_cr, c.final_step) == (1.0, 16.0, 510)
    assert c.trainer.max_steps == 544 and c.trainer.learning_rate == 3e-5
    assert c.trainer.lr_scheduler_type == "constant" and c.trainer.bf16
    assert "full_shard" in c.trainer.fsdp and not c.distillation.train_all_weights
    assert c.teacher.name_or_path is None
    assert [s.name for s in c.data.blend] == ["OpenR1Math220k"]
    assert 238 % c.trainer.save_steps == 0  # the 8x checkpoint of the seed's extract example


def test_defaults_fill_every_key():
    c = TrainingConfig.from_dict(_minimal())
    assert c.model.name_or_path == "tiny" and c.model.dtype == "float32"
    assert c.distillation.initial_cr == 1.0 and c.final_step == c.trainer.max_steps == 544
    assert c.trainer.resume_from_checkpoint is None and c.teacher.name_or_path is None


@pytest.mark.parametrize("raw, key", [
    (dict(trainer={"max_steps": 0}), "trainer.max_steps"),
    (dict(trainer={"max_steps": "ten"}), "trainer.max_steps"),
    (dict(trainer={"learning_rate": "fast"}), "trainer.learning_rate"),
    (dict(trainer={"bf16": "yes"}), "trainer.bf16"),
    (dict(trainer={"report_to": 3}), "trainer.report_to"),
    (dict(trainer={"resume_from_checkpoint": 5}), "trainer.resume_from_checkpoint"),
    (dict(trainer={"fsdp_config": [1]}), "trainer.fsdp_config"),
    (dict(trainer={"fsdp": 1}), "trainer.fsdp"),
    (dict(trainer={"maxsteps": 3}), "trainer.maxsteps"),
    (dict(trainer={"training_arguments": {"max_steps": 3}}), "trainer.training_arguments.max_steps"),
    (dict(trainer={"training_arguments": {"no_such_arg": 3}}), "trainer.training_arguments.no_such_arg"),
    (dict(model={"dtype": "fp8"}), "model.dtype"),
    (dict(model={"name": "x"}), "model.name"),
    (dict(model={"tiny_lm_steps": 5, "name_or_path": "Qwen/Qwen3-8B"}), "model.tiny_lm_steps"),
    (dict(model={"dms": {"window_size": -1}}), "model.dms.window_size"),
    (dict(model={"dms": {"alpha_per": "token"}}), "model.dms.alpha_per"),
    (dict(model={"dms": {"tau": 0}}), "model.dms.tau"),
    (dict(model={"dms": {"windowsize": 4}}), "model.dms.windowsize"),
    (dict(model={"dms": 4}), "model.dms"),
    (dict(model={"dtype": "bfloat16", "trainable_dtype": "float32"}, trainer={"fsdp": "full_shard"}),
     "model.trainable_dtype"),
    (dict(teacher={"dtype": "int8"}), "teacher.dtype"),
    (dict(distillation={"final_cr": 0.5}), "distillation.final_cr"),
    (dict(distillation={"initial_cr": 4.0, "final_cr": 2.0}), "distillation.final_cr"),
    (dict(distillation={"kl_chunk_size": 0}), "distillation.kl_chunk_size"),
    (dict(distillation={"train_all_weights": 1}), "distillation.train_all_weights"),
    (dict(data={"blend": "sample:1.0", "max_length": 1}), "data.max_length"),
    (dict(data={"blend": "sample:1.0", "maxlen": 1}), "data.maxlen"),
    (dict(data={}), "data.blend"),
    (dict(optimizer={}), "optimizer"),
])
def test_errors_name_the_key(raw, key):
    base = _minimal()
    base.update(raw)
    with pytest.raises(ConfigError) as err:
        TrainingConfig.from_dict(base)
    assert str(err.value).startswith(key + ":"), str(err.value)


def test_numbers_in_yaml_exponent_form_are_accepted():
    # PyYAML reads 3e-5 (no dot) as a string
    c = TrainingConfig.from_dict(_minimal(trainer=yaml.safe_load("learning_rate: 3e-5")))
    assert c.trainer.learning_rate == 3e-5


def test_overrides_and_set_args(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_minimal(trainer={"max_steps": 7})))
    sets = parse_set_args(["trainer.max_steps=3", "model.dms.window_size=32", "trainer.fsdp_config={a: 1}",
                           "trainer.save_steps=null"])
    assert sets == {"trainer.max_steps": 3, "model.dms.window_size": 32, "trainer.fsdp_config": {"a": 1},
                    "trainer.save_steps": None}
    c = load_config(str(path), sets)
    assert c.trainer.max_steps == 3 and c.model.dms.window_size == 32 and c.trainer.save_steps is None
    c = load_config(str(path), {"distillation": {"final_cr": 2.0}})
    assert c.distillation.final_cr == 2.0 and c.trainer.max_steps == 7
    with pytest.raises(ConfigError, match=r"^--set"):
        parse_set_args(["trainer.max_steps"])
    with pytest.raises(ConfigError, match=r"^trainer.max_steps"):
        apply_overrides({"trainer": {"max_steps": 3}}, {"trainer.max_steps.x": 1})
    with pytest.raises(ConfigError, match=r"^trainer.max_steps: .*\(in .*c.yaml\)"):
        load_config(str(path), {"trainer.max_steps": -1})
    with pytest.raises(FileNotFoundError, match="config"):
        load_config(str(tmp_path / "missing.yaml"))


def test_saved_config_round_trips(tmp_path):
    c = load_config(os.path.join(CONFIGS, "qwen3_8b.yaml"), {"trainer.resume_from_checkpoint": "auto"})
    saved = c.save(str(tmp_path / "out" / "config.yaml"))
    again = load_config(saved)
    assert again.to_dict() == c.to_dict()
    assert again.trainer.resume_from_checkpoint == "auto"


def _documented_keys():
    text = open(os.path.join(CONFIGS, "README.md")).read()
    rows = re.findall(r"^\| `([a-z_.0-9]+)` \| ([^|]*) \|", text, flags=re.M)
    return {key: default.strip() for key, default in rows}


def test_readme_documents_every_key_with_its_default():
    documented = _documented_keys()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if "section" in f.metadata:
                continue
            key = f"{section}.{f.name}"
            assert key in documented, f"configs/README.md lacks {key}"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert yaml.safe_load(documented[key].strip("`")) == default, (key, documented[key], default)
    from dms.training.data import DataConfig

    for f in dataclasses.fields(DataConfig):
        key = f"data.{f.name}"
        assert key in documented, f"configs/README.md lacks {key}"
        if f.name != "blend":
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert yaml.safe_load(documented[key].strip("`")) == default, (key, documented[key], default)
