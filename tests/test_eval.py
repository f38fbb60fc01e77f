"""Evaluation: the compression tally of dms.cache, the offline dms_passkey
task's documents and metric, and scripts/evaluate.sh running lm-eval
(--model hf, trust_remote_code) on a saved tiny DMS model on the CPU."""

import gc
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from dms.cache import compression_tally
from dms.eval import TASKS_DIR, passkey
from dms.models.qwen3.modeling_qwen3_dms import cache_kwargs
from dms.tiny import save_tiny, tiny_model, tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W = 64  # the tiny model's dms_window_size


def expected_stored(decisions, w=W):
    """SPEC §4 from the decisions [..., T]: last w + 1 tokens plus older tokens whose flag is 0."""
    t = decisions.shape[-1]
    old = max(t - w - 1, 0)
    return min(t, w + 1) + (decisions[..., 1:old + 1] == 0).sum(-1)


@pytest.fixture
def tally():
    compression_tally.reset()
    yield compression_tally
    compression_tally.enabled = True
    compression_tally.reset()


def test_tally_adds_each_cache_once_when_reset_or_dropped(tally):
    model = tiny_model(seed=2).eval()
    ids = torch.randint(0, 256, (2, 200), generator=torch.Generator().manual_seed(0))
    cache = model.get_cache()
    with torch.no_grad():
        decisions = model.model(ids, cache=cache, use_cache=True).dms_decisions.numpy().astype(np.int64)
    stored = expected_stored(decisions).sum((1, 2))  # per layer, over rows
    ratio, mean_row = cache.compression_ratio(), cache.mean_row_compression_ratio()
    assert ratio == pytest.approx(800 * 4 / stored.sum())
    assert tally.summary()["caches"] == 0  # nothing until the cache is reset or dropped
    cache.reset()
    del cache
    gc.collect()
    s = tally.summary()
    assert s["caches"] == 1 and s["compression_ratio"] == pytest.approx(ratio)
    assert s["mean_row_compression_ratio"] == pytest.approx(mean_row)
    assert s["tokens_seen"] == [2 * 2 * 200] * 4 and s["tokens_stored"] == stored.tolist()
    np.testing.assert_allclose(s["per_layer"], 800 / stored)
    # generate makes and drops its own cache: counted once per call
    with torch.no_grad():
        model.generate(ids[:1, :100], max_new_tokens=4, do_sample=False, pad_token_id=256)
    gc.collect()
    assert tally.summary()["caches"] == 2
    snap = tally.snapshot()
    tally.enabled = False
    with torch.no_grad():
        model(ids[:1, :50], **cache_kwargs(model.get_cache()))
    gc.collect()
    assert tally.snapshot() == snap
    tally.reset()
    assert tally.summary() == {"caches": 0, "compression_ratio": None, "mean_row_compression_ratio": None,
                               "per_layer": [], "tokens_seen": [], "tokens_stored": []}


def test_passkey_documents_fit_their_lengths():
    tok = tiny_tokenizer()
    docs = passkey.build_docs(tok, [256, 512], num_samples=3, seed=1)
    assert [d["max_length"] for d in docs] == [256, 512] * 3  # interleaved: --limit covers every length
    for d in docs:
        n = len(tok(d["input"] + " " + passkey.GEN_PREFIX, add_special_tokens=False).input_ids)
        assert d["max_length"] - 40 <= n <= d["max_length"]
        assert re.fullmatch(r"\d{5}", d["passkey"]) and d["input"].count(d["passkey"]) == 2
        assert re.findall(r"\d+", d["input"]) == [d["passkey"]] * 2  # no other number in the filler
        assert d["lengths"] == [256, 512]
    at = [d["input"].index(d["passkey"]) / len(d["input"]) for d in docs if d["max_length"] == 512]
    assert at[0] < 0.2 < at[1] < 0.8 < at[2]  # depths 0, 0.5, 1
    assert passkey.build_docs(tok, [256, 512], num_samples=3, seed=1) == docs
    assert passkey.build_docs(tok, [256], num_samples=3, seed=2)[0]["passkey"] != docs[0]["passkey"]


def test_passkey_bad_input_is_named():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="max_seq_lengths"):
        passkey.build_docs(tok, [0])
    with pytest.raises(ValueError, match="max_seq_lengths: 60 tokens is too short"):
        passkey.build_docs(tok, [60])
    with pytest.raises(ValueError, match="num_samples"):
        passkey.build_docs(tok, [256], num_samples=0)
    with pytest.raises(ValueError, match="tokenizer"):
        passkey.passkey_dataset(max_seq_lengths=[256])


def test_passkey_metric():
    assert passkey.score(" 48213. Remember", "48213") == 1.0
    assert passkey.score(" 482130", "48213") == 0.0
    assert passkey.score(" 4821 3", "48213") == 0.0
    assert passkey.score(" none", "48213") == 0.0
    doc = {"passkey": "11111", "max_length": 512, "lengths": [256, 512, 300]}
    assert passkey.process_results(doc, [" 11111"]) == {"exact_match": 1.0, "exact_match_256": -1.0,
                                                         "exact_match_512": 1.0}
    assert passkey.aggregate([1.0, -1.0, 0.0]) == 0.5 and passkey.aggregate([-1.0]) == -1.0
    with open(os.path.join(TASKS_DIR, "dms_passkey", "dms_passkey.yaml")) as f:
        declared = [int(n) for n in re.findall(r"metric: exact_match_(\d+)", f.read())]
    assert tuple(declared) == passkey.DECLARED_LENGTHS


@pytest.mark.slow
def test_evaluate_sh_runs_lm_eval_on_a_tiny_dms_model(tmp_path):
    model_dir = save_tiny(str(tmp_path / "tiny"))
    env = dict(os.environ, MAX_SEQ_LENGTHS="256,512", BATCH_SIZE="2", CUDA_VISIBLE_DEVICES="",
               PYTHON=sys.executable, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               KV_CACHE_DTYPE="fp8_e4m3")  # lm-eval's --model_args reach the config: FP8 pages end to end
    env.pop("DEVICE", None)
    run = subprocess.run(["bash", os.path.join(ROOT, "scripts", "evaluate.sh"), model_dir, "dms_passkey",
                          "--limit", "3", "--seed", "0"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert "no CUDA GPU found" in run.stderr
    [results_path] = glob.glob(os.path.join(model_dir, "eval_results", "*", "results_*.json"))
    with open(results_path) as f:
        results = json.load(f)
    metrics = results["results"]["dms_passkey"]
    for key in ("exact_match,none", "exact_match_256,none", "exact_match_512,none"):
        assert 0.0 <= metrics[key] <= 1.0
    # the metric, recomputed from the logged samples
    [samples_path] = glob.glob(os.path.join(os.path.dirname(results_path), "samples_dms_passkey_*.jsonl"))
    with open(samples_path) as f:
        samples = [json.loads(line) for line in f]
    assert len(samples) == 3
    hits = [float((re.findall(r"\d+", s["filtered_resps"][0]) or [None])[0] == s["target"]) for s in samples]
    assert metrics["exact_match,none"] == pytest.approx(sum(hits) / 3)
    # compression: in the results file and next to it
    comp = results["dms_compression"]
    date = os.path.basename(results_path)[len("results_"):]
    with open(os.path.join(os.path.dirname(results_path), "compression_" + date)) as f:
        assert json.load(f) == comp
    assert comp["caches"] == 2  # 3 prompts in batches of 2
    assert comp["compression_ratio"] > 1.2  # the tiny adapters evict, and prompts exceed the window
    tok = tiny_tokenizer()
    prompt_tokens = sum(len(tok(s["arguments"]["gen_args_0"]["arg_0"]).input_ids) for s in samples)
    seen = comp["tokens_seen"]
    assert len(seen) == 4 and len(set(seen)) == 1 and seen[0] >= 2 * prompt_tokens  # 2 KV heads per layer
    assert all(r > 1 for r in comp["per_layer"])


@pytest.mark.parametrize("args, tasks, extra", [
    ([], "niah_single_2", []),
    (["--limit", "2"], "niah_single_2", ["--limit", "2"]),
    (["dms_passkey", "--limit", "2"], "dms_passkey", ["--limit", "2"]),
])
def test_evaluate_sh_takes_extra_arguments_with_or_without_tasks(tmp_path, args, tasks, extra):
    """TASKS is optional: `evaluate.sh MODEL --limit 2` keeps the default task
    (it used to pass `--tasks --limit 2`). A stub interpreter records what
    lm-eval would be given."""
    stub = tmp_path / "python"
    stub.write_text(f'#!/usr/bin/env bash\nif [[ "$1" == -m ]]; then printf "%s\\n" "$@"; exit 0; fi\n'
                    f'exec {sys.executable} "$@"\n')
    stub.chmod(0o755)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(["bash", os.path.join(root, "scripts", "evaluate.sh"), str(tmp_path / "model"), *args],
                          capture_output=True, text=True, env=dict(os.environ, PYTHON=str(stub), DEVICE="cpu"))
    assert proc.returncode == 0, proc.stderr
    argv = proc.stdout.splitlines()
    assert argv[argv.index("--tasks") + 1] == tasks
    assert argv[argv.index("--model_args") + 1].endswith(",dms_kv_cache_dtype=auto")
    assert argv[len(argv) - len(extra):] == extra if extra else argv[-1] == "--log_samples"


def test_a_run_without_dms_caches_warns_how_to_load_the_model(tally, capsys):
    from dms.eval.harness import _print_report

    _print_report(tally.summary())
    err = capsys.readouterr().err
    assert "WARNING: no DMS cache held tokens" in err and "trust_remote_code=true" in err


def test_passkey_refuses_lengths_beyond_the_models_positions(tmp_path):
    from dms.tiny import save_tiny

    path = save_tiny(str(tmp_path / "tiny"), max_position_embeddings=512)
    with pytest.raises(ValueError, match=r"^max_seq_lengths: \[1024\] exceed the model's max_position_embeddings "
                                         r"\(512\); pass lengths up to 512"):
        passkey.passkey_dataset(pretrained=path, max_seq_lengths=[256, 1024])
    docs = passkey.passkey_dataset(pretrained=path, max_seq_lengths=[256, 512], num_samples=2)["test"]
    assert len(docs) == 4


def test_a_failed_download_names_the_tasks_that_run_offline(monkeypatch):
    """What RULER's essay tasks raise without network (datasets'
    ConnectionError from huggingface_hub's LocalEntryNotFoundError) becomes a
    message naming the offline tasks; other errors pass through unchanged."""
    import lm_eval.__main__

    from dms.eval import harness

    def offline():
        try:
            raise OSError("LocalEntryNotFoundError: cannot reach the hub")
        except OSError as e:
            raise ConnectionError("Couldn't reach 'baber/paul_graham_essays' on the Hub") from e

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", offline)
    with pytest.raises(SystemExit, match=r"(?s)a task needs a download that failed \(ConnectionError: Couldn't reach "
                                         r"'baber/paul_graham_essays'.*dms_passkey.*niah_single_1, niah_multikey_2"):
        harness.main(["--model", "hf", "--tasks", "niah_single_2"])

    def broken():
        raise KeyError("not a download")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", broken)
    with pytest.raises(KeyError, match="not a download"):
        harness.main(["--model", "hf", "--tasks", "dms_passkey"])
    assert harness._download_failure(RuntimeError("x")) is None


def test_recall_task_documents_metrics_and_declared_lengths():
    from dms.eval import recall_task
    from dms.eval.recall import recall_tokenizer, solve

    tok = recall_tokenizer()
    docs = recall_task.build_docs(tok, [300, 512], num_samples=6, seed=2)
    assert [d["max_length"] for d in docs[:4]] == [300, 512, 300, 512]  # interleaved: --limit covers both
    assert {d["task"] for d in docs} == {"niah", "vt", "mqar"}
    for d in docs:
        assert solve(d["input"]) == d["answer"]
        assert len(tok(d["input"], add_special_tokens=False)["input_ids"]) <= d["max_length"]
    assert recall_task.build_docs(tok, [300, 512], num_samples=6, seed=2) == docs
    doc = next(d for d in docs if d["task"] == "vt" and d["max_length"] == 300)
    right = recall_task.process_results(doc, [f" {doc['answer']}."])
    assert right["exact_match"] == right["exact_match_vt"] == right["exact_match_300"] == 1.0
    assert right["exact_match_niah"] == right["exact_match_mqar"] == right["exact_match_512"] == -1.0
    assert recall_task.process_results(doc, [f" {doc['answer']}7"])["exact_match"] == 0.0
    with pytest.raises(ValueError, match="^num_samples: expected an int >= 1"):
        recall_task.build_docs(tok, [300], num_samples=0)
    with pytest.raises(ValueError, match="^tokenizer: dms_recall sizes its prompts"):
        recall_task.recall_dataset(max_seq_lengths=[300])
    with open(os.path.join(TASKS_DIR, "dms_recall", "dms_recall.yaml")) as f:
        declared = re.findall(r"metric: exact_match_(\w+)", f.read())
    assert declared == ["niah", "vt", "mqar"] + [str(n) for n in passkey.DECLARED_LENGTHS]


@pytest.mark.slow
def test_lm_eval_runs_the_recall_task_on_the_shipped_recall_model(tmp_path):
    """lm-eval's `dms_recall` on the shipped DMS recall model (a copy: the
    results are written next to the model): the samples are scored as
    `dms.eval.recall.score` scores them, and a trained model answers."""
    import shutil

    from dms.recall_models import recall_model_path

    model_dir = shutil.copytree(recall_model_path(), str(tmp_path / "recall-dms"))
    env = dict(os.environ, MAX_SEQ_LENGTHS="2048", BATCH_SIZE="2", CUDA_VISIBLE_DEVICES="",
               PYTHON=sys.executable, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    env.pop("DEVICE", None)
    run = subprocess.run(["bash", os.path.join(ROOT, "scripts", "evaluate.sh"), model_dir, "dms_recall",
                          "--limit", "6"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    [results_path] = glob.glob(os.path.join(model_dir, "eval_results", "*", "results_*.json"))
    with open(results_path) as f:
        metrics = json.load(f)["results"]["dms_recall"]
    [samples_path] = glob.glob(os.path.join(os.path.dirname(results_path), "samples_dms_recall_*.jsonl"))
    with open(samples_path) as f:
        samples = [json.loads(line) for line in f]
    from dms.eval.recall import RecallExample, score

    hits = [score(RecallExample("", "", s["target"], 0), s["filtered_resps"][0]) for s in samples]
    assert len(samples) == 6 and metrics["exact_match,none"] == pytest.approx(sum(hits) / 6)
    assert metrics["exact_match_2048,none"] == pytest.approx(sum(hits) / 6) and sum(hits) >= 4
