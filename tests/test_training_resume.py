"""Resume: a run stopped after k steps and resumed with
resume_from_checkpoint "auto" logs the same losses for the following steps as
an uninterrupted run, ends with the same weights, and draws its gate noise
from the same (process, accumulation micro-step, global step) counters."""

import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from dms import ops
from dms.training.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
STEPS, STOP = 6, 3


class _StopAt(TrainerCallback):
    """Stops training (like a killed job) right after step `step`'s checkpoint."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _config(out, cache, **extra):
    overrides = {"model.tiny_lm_steps": 0, "data.max_length": 64, "data.num_sequences": 24,
                 "data.cache_dir": cache, "trainer.output_dir": out, "trainer.max_steps": STEPS,
                 "trainer.per_device_train_batch_size": 2, "trainer.gradient_accumulation_steps": 2,
                 "trainer.learning_rate": 1e-2, "trainer.save_steps": STOP, "trainer.report_to": "none",
                 "distillation.final_cr": 3.0, "distillation.final_step": STEPS, "model.dms.window_size": 4,
                 "model.dms.paged_attention_block_size": 2, "model.dms.alpha_scale": 1.0,
                 "model.dms.initial_alpha_offset": 0.0,
                 "trainer.training_arguments": {"disable_tqdm": True}}
    overrides.update(extra)
    return load_config(TINY, overrides)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and one stopped after STOP steps then resumed;
    each with the noise counters its student passes used."""
    from dms.training.pipeline import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("resume")
    cache = str(base / "cache")
    recorded = []
    original = ops.logistic_noise_like

    def recording(z, *, seed, process_index=0, accum_step=0, global_step=0):
        if seed == 0:  # layer 0 (seed = trainer.seed 0 + layer index)
            recorded[-1].append((process_index, accum_step, global_step))
        return original(z, seed=seed, process_index=process_index, accum_step=accum_step, global_step=global_step)

    ops.logistic_noise_like = recording
    try:
        recorded.append([])
        whole = train(_config(str(base / "whole"), cache))
        recorded.append([])
        train(_config(str(base / "split"), cache), callbacks=[_StopAt(STOP)])
        recorded.append([])
        resumed = train(_config(str(base / "split"), cache, **{"trainer.resume_from_checkpoint": "auto"}))
    finally:
        ops.logistic_noise_like = original
        torch.set_num_threads(threads)
    yield {"base": base, "whole": whole, "resumed": resumed, "counters": recorded}


def _steps(trainer):
    return {e["step"]: e for e in trainer.state.log_history if "distill_loss" in e}


@pytest.mark.slow
def test_resumed_run_continues_exactly(runs):
    whole, resumed = _steps(runs["whole"]), _steps(runs["resumed"])
    assert sorted(whole) == list(range(1, STEPS + 1))
    assert sorted(resumed) == list(range(1, STEPS + 1))  # the first STOP come from the checkpoint's state
    assert whole[STEPS]["achieved_cr"] > 1.2  # the run really evicts
    for step in range(STOP + 1, STEPS + 1):
        for key in ("loss", "distill_loss", "compression_loss", "lm_loss", "achieved_cr", "grad_norm"):
            assert resumed[step][key] == pytest.approx(whole[step][key], rel=1e-6, abs=1e-9), (step, key)
    a = load_file(str(runs["base"] / "whole" / "student_model" / "model.safetensors"))
    b = load_file(str(runs["base"] / "split" / "student_model" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_noise_counters_follow_process_accumulation_step_and_global_step(runs):
    whole, first, second = runs["counters"]
    expected = [(0, micro, step) for step in range(STEPS) for micro in range(2)]
    assert whole == expected
    assert first == expected[:2 * STOP]
    assert second == expected[2 * STOP:]


def test_resume_auto_without_checkpoint_starts_fresh_and_bad_path_fails(tmp_path):
    from dms.training.engine import resolve_resume

    assert resolve_resume("auto", str(tmp_path / "nothing")) is None
    assert resolve_resume(None, str(tmp_path)) is None
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-12").mkdir()
    assert resolve_resume("auto", str(tmp_path)).endswith("checkpoint-12")
    with pytest.raises(FileNotFoundError, match="trainer.resume_from_checkpoint"):
        resolve_resume(str(tmp_path / "missing"), str(tmp_path))
