"""configs/tiny.yaml end to end (shrunk through overrides to stay in CI time):
losses finite, the achieved compression follows the schedule, training lowers
the objective, only adapter tensors change, the saved student loads with
trust_remote_code in a fresh process and generates with compression, and a
student extracted from an intermediate checkpoint has exactly the
checkpoint's weights."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dms.training.config import load_config
from dms.training.engine import cr_schedule, forward_kl, is_adapter_parameter, load_student, loss_mask, noise_counters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")

# tiny.yaml with a faster retrofit; 300 language-model steps make a teacher
# that copies (loss ~0.4 nats/byte), so eviction has something to cost.
# Whether learned eviction beats content-blind eviction is guarded on a model
# that needs its memory: tests/test_recall_models.py (the tiny model's
# margin depended on the training trajectory, so on the CPU's GEMM kernels).
OVERRIDES = {"model.tiny_lm_steps": 300, "trainer.max_steps": 80, "distillation.final_step": 60,
             "trainer.learning_rate": 5e-4, "trainer.save_steps": 25, "trainer.report_to": "none",
             "trainer.training_arguments": {"disable_tqdm": True}}
NOISE_DRAWS = 8  # KLs are averaged over this many gate-noise draws
CR_TOLERANCE = 0.15  # |achieved / target - 1| of every 10-step window's means


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from dms.training.pipeline import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("tiny_run")
    config = load_config(TINY, dict(OVERRIDES, **{"trainer.output_dir": str(out / "run"),
                                                    "data.cache_dir": str(out / "cache")}))
    try:
        trainer = train(config)
        yield config, trainer
    finally:
        torch.set_num_threads(threads)


def _history(trainer):
    return [entry for entry in trainer.state.log_history if "distill_loss" in entry]


@pytest.mark.slow
def test_losses_finite_and_achieved_cr_tracks_the_schedule(tiny_run):
    config, trainer = tiny_run
    logs = _history(trainer)
    assert [entry["step"] for entry in logs] == list(range(1, config.trainer.max_steps + 1))
    for entry in logs:
        for key in ("loss", "distill_loss", "compression_loss", "lm_loss", "achieved_cr"):
            assert math.isfinite(entry[key]), (entry["step"], key)
        assert entry["loss"] == pytest.approx(entry["distill_loss"] + entry["compression_loss"], rel=1e-3, abs=1e-6)
        expected = cr_schedule(entry["step"] - 1, 1.0, config.distillation.final_cr, config.final_step)
        assert entry["target_cr"] == pytest.approx(expected)
    for start in range(0, len(logs), 10):
        window = logs[start:start + 10]
        target = sum(e["target_cr"] for e in window) / len(window)
        achieved = sum(e["achieved_cr"] for e in window) / len(window)
        assert abs(achieved / target - 1) <= CR_TOLERANCE, (window[0]["step"], target, achieved)
    # By the end the hinge is (nearly) satisfied and the student still predicts well.
    tail = logs[-10:]
    assert sum(e["compression_loss"] for e in tail) / 10 < 0.02
    assert sum(e["lm_loss"] for e in tail) / 10 < math.log(320) - 2  # far below a uniform guess


def _fixed_batch(config):
    from dms.tiny import tiny_tokenizer
    from dms.training.data import build_dataset

    dataset = build_dataset(config.data, tiny_tokenizer(), show_progress=False)
    rows = [dataset[i] for i in range(len(dataset) - 4, len(dataset))]
    return torch.stack([r["input_ids"] for r in rows]), torch.stack([r["attention_mask"] for r in rows])


@pytest.mark.slow
def test_training_lowers_the_objective(tiny_run):
    """At the final target, the trained student's loss (KL + compression
    loss, averaged over NOISE_DRAWS gate-noise draws) is far below the
    initial model's, which evicts nothing."""
    from dms.models.qwen3 import Qwen3ForCausalLMDMS

    config, _ = tiny_run
    ids, am = _fixed_batch(config)
    target = 1 - 1 / config.distillation.final_cr
    mask = loss_mask(ids, am, [256])
    initial = load_student(config).train()
    trained = Qwen3ForCausalLMDMS.from_pretrained(os.path.join(config.trainer.output_dir, "student_model")).train()
    with torch.no_grad():
        initial.config.dms_disable_eviction = True
        teacher = initial(ids, attention_mask=am, use_cache=False).logits
        initial.config.dms_disable_eviction = False

        def objective(model):
            """KL + compression loss and evicted fraction, averaged over noise draws."""
            totals = torch.zeros(2, dtype=torch.float64)
            for draw in range(NOISE_DRAWS):
                out = model(ids, attention_mask=am, use_cache=False, dms_target=target,
                            dms_noise_counters=noise_counters(123 + draw, 0, 0, 10_000))
                kl = forward_kl(out.logits, teacher, mask).item()
                totals += torch.tensor([kl + out.compression_loss.item(), out.evicted_fraction.mean().item()])
            return (totals / NOISE_DRAWS).tolist()

        before, evicted_before = objective(initial)
        after, evicted = objective(trained)
    assert evicted_before < 0.05 and before > 0.9 * target
    assert after < 0.25 * before and evicted > 0.5 * target


@pytest.mark.slow
def test_only_adapter_tensors_change(tiny_run):
    config, trainer = tiny_run
    initial = load_student(config).state_dict()
    saved = load_file(os.path.join(config.trainer.output_dir, "student_model", "model.safetensors"))
    assert set(saved) <= set(initial)
    changed = [name for name in saved if not torch.equal(saved[name], initial[name])]
    assert changed and all(is_adapter_parameter(name) for name in changed)
    assert any(name.endswith("dms_proj_alpha.weight") for name in changed)
    for name, p in trainer.model.named_parameters():
        assert p.requires_grad == is_adapter_parameter(name), name


@pytest.mark.slow
def test_saved_student_loads_with_remote_code_and_generates_with_compression(tiny_run, tmp_path):
    config, _ = tiny_run
    student = os.path.join(config.trainer.output_dir, "student_model")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "from dms.models.qwen3.modeling_qwen3_dms import cache_kwargs\n"
        "path = sys.argv[1]\n"
        "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()\n"
        "tok = AutoTokenizer.from_pretrained(path)\n"
        "prompt = [{'role': 'user', 'content': 'Ana has 53 shells and gets 69 more. How many shells does she have?'}]\n"
        "inputs = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors='pt', return_dict=True)\n"
        "cache = model.get_cache()\n"
        "with torch.no_grad():\n"
        "    out = model.generate(**inputs, max_new_tokens=48, do_sample=False, **cache_kwargs(cache))\n"
        "print(type(model).__name__, model.dtype, out.shape[1] - inputs['input_ids'].shape[1],\n"
        "      cache.compression_ratio())\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script, student], capture_output=True, text=True, cwd=str(tmp_path),
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, dtype, new_tokens, ratio = proc.stdout.split()[-4:]
    assert name == "Qwen3ForCausalLMDMS" and dtype == "torch.float32" and int(new_tokens) == 48
    assert float(ratio) > 2.0  # trained for 4x; a fresh adapter gives exactly 1
    with open(os.path.join(student, "config.json")) as f:
        saved = json.load(f)
    assert saved["auto_map"]["AutoModelForCausalLM"].endswith("Qwen3ForCausalLMDMS")
    assert saved["dms_cr"] == config.distillation.final_cr and saved["dms_disable_eviction"] is False


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_extract_from_intermediate_checkpoint_gives_its_weights(tiny_run, tmp_path):
    from dms.training.pipeline import main_extract, read_checkpoint_weights

    config, _ = tiny_run
    run = config.trainer.output_dir
    checkpoint = os.path.join(run, "checkpoint-25")
    out = str(tmp_path / "step25")
    assert main_extract(["--config", os.path.join(run, "config.yaml"), "--checkpoint", checkpoint,
                         "--output", out]) == 0
    extracted = load_file(os.path.join(out, "model.safetensors"))
    stored = load_file(os.path.join(checkpoint, "model.safetensors"))
    assert set(extracted) == set(stored)
    assert all(torch.equal(extracted[k], stored[k]) for k in stored)
    final = load_file(os.path.join(run, "student_model", "model.safetensors"))
    assert any(not torch.equal(final[k], stored[k]) for k in stored)  # step 25 is not the end
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dms_cr"] == pytest.approx(cr_schedule(25, 1.0, 4.0, 60))
    assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))

    # The FSDP layouts of the same weights read back identically.
    full = tmp_path / "fsdp_full"
    full.mkdir()
    torch.save(stored, full / "pytorch_model_fsdp.bin")
    sharded = tmp_path / "fsdp_sharded"
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": {k: v.clone() for k, v in stored.items()}}, checkpoint_id=str(sharded / "pytorch_model_fsdp_0"))
    for folder in (full, sharded):
        weights = read_checkpoint_weights(str(folder))
        assert set(weights) == set(stored) and all(torch.equal(weights[k], stored[k]) for k in stored)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        read_checkpoint_weights(str(tmp_path))
