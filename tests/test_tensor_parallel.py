"""Tensor parallelism (transformers' tp_plan="auto") for every family:
`torchrun --nproc_per_node 2` on CPU (gloo) runs tests/tp_worker.py, which
loads tiny random DMS models with eviction on, once on each process alone and
once split over the two ranks by KV head, and drives both through prefill,
decode steps, a new turn, chunked prefill, a left-padded batch generate and
beam search with the same tokens: logits agree to float32 rounding, the
generated tokens are the same, and the compression figures (summed over the
ranks) equal the single process's. A split that does not divide the KV heads
is refused at load, training a split model is refused at its forward."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from dms import Qwen3ConfigDMS, Qwen3ForCausalLMDMS

from .test_families import FAMILIES, TINY, _model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "tp_worker.py")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

# (name, family, DMS fields): every decision source on Qwen3, one per other family.
VARIANTS = [
    ("qwen3-separate-head", "qwen3", dict(dms_separate_alpha=True)),
    ("qwen3-separate-layer", "qwen3", dict(dms_separate_alpha=True, dms_alpha_per="layer")),
    ("qwen3-borrowed-head", "qwen3", dict(dms_separate_alpha=False)),
    ("qwen3-borrowed-layer", "qwen3", dict(dms_separate_alpha=False, dms_alpha_per="layer")),
    ("qwen3-current", "qwen3", dict(dms_separate_alpha=False, dms_decision_target="current")),
    ("llama", "llama", dict(dms_separate_alpha=True)),
    ("qwen2", "qwen2", dict(dms_separate_alpha=False)),
    ("mistral", "mistral", dict(dms_separate_alpha=True, dms_alpha_per="layer")),
    ("qwen3_moe", "qwen3_moe", dict(dms_separate_alpha=True)),
]


def _qwen3(seed=0, **fields):
    """The tiny Qwen3 DMS model with decisions that evict (as test_families' _model)."""
    torch.manual_seed(seed)
    fields = {**TINY, **dict(dms_window_size=5, dms_paged_attention_block_size=2, dms_alpha_scale=1.0,
                             dms_initial_alpha_offset=0.0), **fields}
    m = Qwen3ForCausalLMDMS(Qwen3ConfigDMS(**fields))
    with torch.no_grad():
        for layer in m.model.layers:
            attn = layer.self_attn
            if m.config.dms_separate_alpha:
                torch.nn.init.normal_(attn.dms_proj_alpha.weight, std=0.5)
            else:
                torch.nn.init.normal_(attn.q_norm.weight, mean=1.0, std=0.5)
    return m


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, models, extra=(), nproc=2):
    spec, out = tmp_path / "models.json", tmp_path / "out.json"
    spec.write_text(json.dumps(models))
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    if not extra:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), WORKER, str(spec), str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return proc, (json.loads(out.read_text()) if proc.returncode == 0 else None)


def _save_variants(tmp_path):
    models = []
    for name, family, fields in VARIANTS:
        model = _qwen3(**fields) if family == "qwen3" else _model(family, **fields)
        model.save_pretrained(tmp_path / name)
        models.append({"name": name, "path": str(tmp_path / name)})
    _qwen3(**dict(dms_separate_alpha=True), **{"num_key_value_heads": 3, "num_attention_heads": 6}) \
        .save_pretrained(tmp_path / "three-heads")
    return models + [{"name": "three-heads", "path": str(tmp_path / "three-heads"), "refused": True}]


def _assert_equal_runs(results, ranks=2):
    assert set(results) == {name for name, _, _ in VARIANTS} | {"three-heads"}
    refused = results.pop("three-heads")["error"]
    if ranks == 1:
        assert refused is None  # one rank divides any number of heads
    else:
        assert refused == (
            "tp_plan: 2 tensor-parallel ranks do not divide the model's 3 KV heads; DMS splits the cache by KV head, "
            "so use a tensor-parallel size that divides 3 (tp_size, or the number of processes torchrun starts)")
    for name, r in results.items():
        if ranks > 1:
            assert r["train_refused"].startswith("model.train(): a tensor-parallel (tp_plan) DMS model runs "
                                                 "inference"), name
        assert (r["local_kv_heads"], r["kv_heads"]) == (2 // ranks, 2), name  # each rank holds its share of the KV heads
        for check in ("prefill", "turns", "chunked", "generate"):
            assert r[check] < 1e-4, (name, check, r[check])
        for check in ("prefill_cr", "turns_cr", "turns_tokens", "turns_bytes", "chunked_cr"):
            one, split = r[check]
            assert one == split, (name, check, r[check])
        assert r["prefill_cr"][0] > 1.1 and r["turns_cr"][0][0] > 1.1, name  # eviction is on
        assert r["generate_tokens"], name
        assert r.get("beam_tokens", True), name


@pytest.mark.slow
def test_two_ranks_equal_one_process_for_every_family(tmp_path):
    proc, results = _torchrun(tmp_path, _save_variants(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    _assert_equal_runs(results)


@pytest.mark.cuda
def test_tensor_parallel_size_one_on_a_gpu_equals_plain_loading(tmp_path):
    proc, results = _torchrun(tmp_path, _save_variants(tmp_path), extra=("--cuda",), nproc=1)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    _assert_equal_runs(results, ranks=1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_equal_one(tmp_path):
    proc, results = _torchrun(tmp_path, _save_variants(tmp_path), extra=("--cuda",))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    _assert_equal_runs(results)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_layers_on_two_gpus_equal_one_gpu(tmp_path):
    """device_map puts layer 0 on cuda:0 and layer 1 on cuda:1: each layer's
    cache is made on its layer's device, and every turn equals one GPU."""
    from dms import AutoModelForCausalLMDMS

    from .tp_worker import _turns

    _qwen3(dms_separate_alpha=True).save_pretrained(tmp_path / "m")
    one = AutoModelForCausalLMDMS.from_pretrained(tmp_path / "m", dtype=torch.float32).to("cuda:0").eval()
    split = AutoModelForCausalLMDMS.from_pretrained(
        tmp_path / "m", dtype=torch.float32,
        device_map={"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
                    "model.norm": 1, "lm_head": 1}).eval()
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (la, sa, ba), (lb, sb, bb) = _turns(one, ids, "cuda:0"), _turns(split, ids, "cuda:0")
    assert max(float((x.cpu() - y.cpu()).abs().max()) for x, y in zip(la, lb)) < 1e-4
    assert sa == sb and ba == bb and sa["compression_ratio"] > 1.1
    cache = split.get_cache()
    split(input_ids=ids.to("cuda:0"), cache=cache)
    assert [layer.paged.k_pages.device.index for layer in cache.layers] == [0, 1]
