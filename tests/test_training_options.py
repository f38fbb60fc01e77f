"""Training options on short tiny runs: a separate frozen teacher with the
student's weights gives the same run as one model with two passes;
train_all_weights trains every tensor against a frozen copy of the initial
model; the student is saved in the requested dtype; FSDP needs several
processes; the command line prepares data only and reports config errors by
key."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dms.training.config import load_config
from dms.training.engine import is_adapter_parameter, load_student

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(tmp_path, name, **extra):
    overrides = {"model.tiny_lm_steps": 0, "data.max_length": 48, "data.num_sequences": 12,
                 "data.cache_dir": str(tmp_path / "cache"), "trainer.output_dir": str(tmp_path / name),
                 "trainer.max_steps": 3, "trainer.per_device_train_batch_size": 2, "trainer.learning_rate": 1e-2,
                 "trainer.save_steps": None, "trainer.report_to": "none", "distillation.final_cr": 3.0,
                 "distillation.final_step": 3, "model.dms.window_size": 4, "model.dms.paged_attention_block_size": 2,
                 "model.dms.alpha_scale": 1.0, "model.dms.initial_alpha_offset": 0.0,
                 "trainer.training_arguments": {"disable_tqdm": True}}
    overrides.update(extra)
    return load_config(TINY, overrides)


def _logs(trainer):
    return [e for e in trainer.state.log_history if "distill_loss" in e]


def test_separate_teacher_with_the_same_weights_gives_the_same_run(tmp_path):
    from dms.training.pipeline import train

    shared = train(_config(tmp_path, "shared"))
    separate = train(_config(tmp_path, "separate", **{"teacher.name_or_path": "tiny"}))
    assert shared.teacher is None and separate.teacher is not None
    assert not any(p.requires_grad for p in separate.teacher.parameters())
    a, b = _logs(shared), _logs(separate)
    assert len(a) == len(b) == 3 and a[-1]["distill_loss"] > 0
    for x, y in zip(a, b):
        for key in ("loss", "distill_loss", "compression_loss", "achieved_cr"):
            assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-9), key


def test_plain_qwen3_checkpoint_as_student_and_as_teacher(tmp_path):
    """A plain transformers Qwen3 folder: the student gets keep-everything
    adapters over its weights; as a separate teacher it runs as transformers'
    own Qwen3, whose logits match the student's eviction-off pass."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from dms.tiny import TINY_VOCAB_SIZE, tiny_tokenizer
    from dms.training.pipeline import train

    torch.manual_seed(0)
    plain = Qwen3ForCausalLM(Qwen3Config(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, eos_token_id=256, pad_token_id=256, tie_word_embeddings=True))
    folder = str(tmp_path / "plain")
    plain.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    extra = {"model.name_or_path": folder, "model.dms.separate_alpha": True}
    config = _config(tmp_path, "own", **extra)
    student = load_student(config)
    assert all(float(layer.self_attn.dms_proj_alpha.weight.detach().abs().max()) == 0
               for layer in student.model.layers)
    reference = plain.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in student.state_dict().items() if k in reference)
    own = _logs(train(config))
    separate = train(_config(tmp_path, "separate", **extra, **{"teacher.name_or_path": folder}))
    assert type(separate.teacher) is Qwen3ForCausalLM and not separate.teacher.training
    for x, y in zip(own, _logs(separate)):
        assert y["distill_loss"] == pytest.approx(x["distill_loss"], rel=1e-3, abs=1e-6)
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-3, abs=1e-6)


def test_train_all_weights_trains_everything_against_the_initial_model(tmp_path):
    from dms.training.pipeline import train

    config = _config(tmp_path, "all", **{"distillation.train_all_weights": True})
    trainer = train(config)
    initial = load_student(config).state_dict()
    saved = load_file(str(tmp_path / "all" / "student_model" / "model.safetensors"))
    unchanged = [k for k in saved if torch.equal(saved[k], initial[k])]
    assert not [k for k in unchanged if not k.endswith("_norm.weight")], unchanged  # norms may stay put
    assert any(not torch.equal(saved[k], initial[k]) for k in saved if not is_adapter_parameter(k))
    assert all(p.requires_grad for p in trainer.model.parameters())
    teacher = trainer.teacher.state_dict()
    assert trainer.teacher.config.dms_disable_eviction and not trainer.model.config.dms_disable_eviction
    assert all(torch.equal(teacher[k], initial[k]) for k in initial)


def test_student_saved_in_bfloat16_loads_as_bfloat16(tmp_path):
    from transformers import AutoModelForCausalLM

    from dms.tiny import tiny_model, tiny_tokenizer
    from dms.training.engine import save_student_model

    model = tiny_model(0, evicting=True)
    live_dtype = model.config.dtype
    path = save_student_model(model, str(tmp_path / "student"), dtype=torch.bfloat16, tokenizer=tiny_tokenizer(),
                              final_cr=5.0)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    assert config["dtype"] == "bfloat16" and config["dms_cr"] == 5.0
    weights = load_file(os.path.join(path, "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    # the live model is left alone
    assert model.dtype == torch.float32 and model.config.dms_cr == 8 and model.config.dtype == live_dtype
    loaded = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    assert loaded.dtype == torch.bfloat16
    for name, tensor in model.state_dict().items():
        if name in weights:
            assert torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16)), name


def test_bfloat16_model_with_float32_adapters_and_autocast(tmp_path):
    """configs/qwen3_1.7b.yaml's dtypes: bfloat16 weights, float32 adapters,
    bf16 autocast, a bfloat16 student saved."""
    from dms.training.pipeline import train

    config = _config(tmp_path, "bf16", **{"model.dtype": "bfloat16", "model.trainable_dtype": "float32",
                                          "trainer.bf16": True, "distillation.final_cr": 2.0})
    trainer = train(config)
    for name, p in trainer.model.named_parameters():
        assert p.dtype == (torch.float32 if is_adapter_parameter(name) else torch.bfloat16), name
    logs = _logs(trainer)
    assert all(e["loss"] == e["loss"] and abs(e["loss"]) < 10 for e in logs) and logs[-1]["achieved_cr"] > 1.2
    saved = load_file(str(tmp_path / "bf16" / "student_model" / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}


def test_gradient_checkpointing_changes_nothing(tmp_path):
    """Recomputed layers draw the same gate noise in backward: the run is the same."""
    from dms.training.pipeline import train

    plain = _logs(train(_config(tmp_path, "plain")))
    trainer = train(_config(tmp_path, "recomputed", **{"trainer.gradient_checkpointing": True}))
    model = trainer.model
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    recomputed = _logs(trainer)
    for x, y in zip(plain, recomputed):
        for key in ("loss", "grad_norm", "achieved_cr"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-8), key


def test_fsdp_in_one_process_is_refused(tmp_path):
    from dms.training.pipeline import train

    config = _config(tmp_path, "fsdp", **{"trainer.max_steps": 1, "trainer.fsdp": "full_shard auto_wrap"})
    with pytest.raises(ValueError, match="fsdp"):
        train(config)


def test_adapters_only_needs_a_separate_adapter(tmp_path):
    from dms.training.engine import freeze_for_training

    config = _config(tmp_path, "borrowed", **{"model.dms.separate_alpha": False})
    with pytest.raises(ValueError, match="model.dms.separate_alpha"):
        freeze_for_training(load_student(config))


@pytest.mark.slow
def test_command_line_prepares_data_only(tmp_path):
    cmd = [sys.executable, "-m", "models.qwen3.train", "--config", "configs/tiny.yaml", "--prepare-dataset-only",
           "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.num_sequences=4",
           "--set", "data.max_length=32"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training data cached in" in proc.stdout
    assert len(list((tmp_path / "cache").glob("*/meta.json"))) == 1
    assert not (tmp_path / "outputs").exists()


def test_command_line_reports_config_errors_by_key(capsys):
    from dms.training.pipeline import main_extract, main_train

    with pytest.raises(SystemExit) as code:
        main_train(["--config", TINY, "--set", "trainer.max_steps=0"])
    assert code.value.code == 2
    assert "trainer.max_steps: expected an int >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main_train(["--config", TINY, "--set", "trainer.max_steps"])
    assert "--set: expected KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main_extract(["--config", TINY, "--checkpoint", "/nonexistent/checkpoint-3"])
    assert "--checkpoint: no such directory" in capsys.readouterr().err
