"""The distributed path for real: `bash scripts/train.sh` prepares the data in
one process, then `accelerate launch` starts two CPU processes (a gloo group)
that train the tiny config for a few steps through
`python -m models.qwen3.train`, sharding the data between them and writing
one checkpoint and one student. The config asks for FSDP, which accelerate
offers on GPUs only: the run says so and trains as DDP."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_train_sh_launches_two_cpu_processes(tmp_path):
    out = tmp_path / "run"
    sets = {"model.tiny_lm_steps": 0, "data.max_length": 64, "data.num_sequences": 8,
            "data.cache_dir": str(tmp_path / "cache"), "trainer.output_dir": str(out), "trainer.max_steps": 3,
            "trainer.save_steps": 3, "trainer.per_device_train_batch_size": 1, "trainer.report_to": "none",
            "trainer.training_arguments": "{disable_tqdm: true}", "trainer.fsdp": "full_shard auto_wrap"}
    cmd = ["bash", os.path.join(ROOT, "scripts", "train.sh"), os.path.join(ROOT, "configs", "tiny.yaml")]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", NUM_PROCESSES="2", PYTHON=sys.executable,
               ACCELERATE_ARGS="--main_process_port 29517")
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "accelerate launch --multi_gpu --num_processes 2" in proc.stdout
    assert "training data cached in" in proc.stdout  # the single-process preparation ran first
    assert "accelerate shards only on GPUs" in proc.stderr
    checkpoint = out / "checkpoint-3"
    # One RNG state per process: the run had two ranks.
    assert sorted(p.name for p in checkpoint.glob("rng_state*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    with open(checkpoint / "trainer_state.json") as f:
        state = json.load(f)
    logs = [e for e in state["log_history"] if "distill_loss" in e]
    assert [e["step"] for e in logs] == [1, 2, 3]
    # 8 sequences, 1 per process per step: two processes finish 3/4 of an epoch in 3 steps.
    assert logs[-1]["epoch"] == pytest.approx(0.75)
    assert all(e["loss"] == e["loss"] and e["achieved_cr"] >= 1.0 for e in logs)
    assert (out / "student_model" / "model.safetensors").is_file()
    assert (out / "config.yaml").is_file()
