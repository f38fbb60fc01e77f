"""`python -m dms.eval [lm-eval arguments]`: lm-eval-harness's command line,
run in this process so that the compression reached by the model's DMS caches
can be reported with lm-eval's results.

Every DMSCache adds its tokens seen / stored to `dms.cache.compression_tally`
when it is dropped or reset (lm-eval's generate calls make and drop one per
batch). This wrapper empties the tally, runs lm-eval (`run` is implied, as
with `lm_eval ARGS`), then

- adds `dms_compression` (the tally's summary, merged over processes under
  `accelerate launch`) to the results dict lm-eval saves, and
- writes the same dict as `compression_<date>.json` next to each results file
  the run wrote under --output_path (or to --dms_compression_json PATH).

`--include_path` defaults to this package's task folder (`dms_passkey`). A
model without DMS caches gives {"caches": 0, "compression_ratio": null}.

    python -m dms.eval --model hf \\
        --model_args pretrained=PATH,trust_remote_code=true,dtype=bfloat16 \\
        --tasks dms_passkey --output_path PATH/eval_results --log_samples
"""

import glob
import json
import os
import sys

__all__ = ["main"]

_OWN_OPTION = "--dms_compression_json"


def _take_option(argv, name):
    """Removes `name VALUE` / `name=VALUE` from argv; returns (value or None, rest)."""
    rest, value, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == name:
            if i + 1 >= len(argv):
                raise SystemExit(f"{name}: expected a value")
            value = argv[i + 1]
            i += 2
            continue
        if arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return value, rest


def _option_value(argv, *names):
    """The last value given for any of `names` (lm-eval keeps the last), or None."""
    value = None
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
    return value


def _results_files(output_path):
    """{path: mtime} of the results files lm-eval writes for --output_path
    (a folder: <folder>/<model>/results_<date>.json; a .json path:
    <stem>_<date>.json beside it)."""
    if output_path is None:
        return {}
    if output_path.endswith(".json"):
        stem = os.path.splitext(os.path.basename(output_path))[0]
        pattern = os.path.join(os.path.dirname(os.path.abspath(output_path)), glob.escape(stem) + "_*.json")
    else:
        pattern = os.path.join(glob.escape(os.path.abspath(output_path)), "**", "results_*.json")
    return {p: os.path.getmtime(p) for p in glob.glob(pattern, recursive=True)}


def _compression_path(results_path, output_path):
    name = os.path.basename(results_path)
    if output_path.endswith(".json"):
        date = name[len(os.path.splitext(os.path.basename(output_path))[0]) + 1:]
    else:
        date = name[len("results_"):]
    return os.path.join(os.path.dirname(results_path), "compression_" + date)


def _gathered_summary():
    """The tally's summary, summed over every process when torch.distributed
    is running (all processes must call this)."""
    from dms.cache import CompressionTally, compression_tally

    snapshot = compression_tally.snapshot()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, snapshot)
        width = max(len(p["tokens_seen"]) for p in parts)
        snapshot = {"caches": sum(p["caches"] for p in parts),
                    "mean_row_ratio_sum": sum(p["mean_row_ratio_sum"] for p in parts),
                    "tokens_seen": [sum(p["tokens_seen"][i] if i < len(p["tokens_seen"]) else 0 for p in parts)
                                    for i in range(width)],
                    "tokens_stored": [sum(p["tokens_stored"][i] if i < len(p["tokens_stored"]) else 0
                                          for p in parts) for i in range(width)]}
    return CompressionTally.summarize(snapshot)


def _is_main_process():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def main(argv=None) -> int:
    """Runs lm-eval with `argv` (default sys.argv[1:]) and reports compression.
    Extra option: --dms_compression_json PATH (default: compression_<date>.json
    beside each results file; with no --output_path, printed only)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["-h"], ["--help"]):
        print(__doc__)
        argv = ["run", "--help"]
    explicit_json, argv = _take_option(argv, _OWN_OPTION)
    subcommand = argv[0] if argv and not argv[0].startswith("-") else "run"
    if subcommand == "run" and _option_value(argv, "--include_path") is None and "-h" not in argv \
            and "--help" not in argv:
        from dms.eval import TASKS_DIR

        argv += ["--include_path", TASKS_DIR]
    output_path = _option_value(argv, "--output_path", "-o")
    before = _results_files(output_path)

    import lm_eval
    import lm_eval.evaluator
    from lm_eval.__main__ import cli_evaluate

    from dms.cache import compression_tally

    compression_tally.reset()
    summary = {}
    original = lm_eval.evaluator.simple_evaluate

    def simple_evaluate(*args, **kwargs):
        results = original(*args, **kwargs)
        import gc

        gc.collect()  # caches still waiting in reference cycles report now
        summary.update(_gathered_summary())
        if isinstance(results, dict):
            results["dms_compression"] = dict(summary)
        return results

    import dms.models  # noqa: F401  (directories saved by dms load without remote code)

    saved_argv = sys.argv
    sys.argv = ["lm-eval", *argv]
    lm_eval.simple_evaluate = simple_evaluate  # what lm-eval's CLI imports when it runs
    try:
        cli_evaluate()
    except Exception as exc:
        download = _download_failure(exc)
        if download is None:
            raise
        raise SystemExit(f"dms.eval: a task needs a download that failed ({download}).\n{OFFLINE_TASKS}") from exc
    finally:
        sys.argv = saved_argv
        del lm_eval.simple_evaluate  # back to lm_eval's lazy attribute

    if not summary or not _is_main_process():
        return 0
    written = []
    if explicit_json:
        written.append(explicit_json)
    elif output_path is not None:
        after = _results_files(output_path)
        written = [_compression_path(p, output_path) for p, t in after.items()
                   if p not in before or t > before[p]]
    for path in written:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(summary, f, indent=2)
    _print_report(summary, written)
    return 0


OFFLINE_TASKS = (
    "Offline (no hub, no NLTK download), these run: dms_passkey and dms_recall (shipped with dms), and RULER's niah_single_1, "
    "niah_multikey_2 and niah_multikey_3 (pip install 'lm-eval[ruler]'). RULER's other needle tasks "
    "(niah_single_2, niah_single_3, niah_multikey_1, niah_multivalue, niah_multiquery) read the hub dataset "
    "baber/paul_graham_essays, ruler_qa_squad and ruler_qa_hotpot download their data: run them once with network "
    "(later runs can set HF_DATASETS_OFFLINE=1).")
"""Which evaluation tasks need no network; what a failed download is answered with."""


def _download_failure(exc):
    """A short description when `exc` (or an exception it was raised from)
    is a failed download (no network, hub unreachable, offline mode), else
    None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        names = {cls.__name__ for cls in type(exc).__mro__}
        if isinstance(exc, ConnectionError) or names & {"ConnectError", "ConnectTimeout", "HTTPError",
                                                          "OfflineModeIsEnabled", "LocalEntryNotFoundError",
                                                          "URLError"}:
            return f"{type(exc).__name__}: {exc}"
        exc = exc.__cause__ or exc.__context__
    return None


def _print_report(summary, written=()):
    """The run's compression line; a warning when no DMS cache held a token."""
    ratio = summary["compression_ratio"]
    if ratio is None:
        print("dms: WARNING: no DMS cache held tokens during this run, so the model evaluated was not a DMS model "
              "(or never used a cache): a published DMS checkpoint (model_type qwen3, such as "
              "nvidia/Qwen3-8B-DMS-8x) loaded without trust_remote_code=true in --model_args runs as a dense "
              "Qwen3. Pass --model_args pretrained=PATH,trust_remote_code=true,...", file=sys.stderr)
    else:
        print(f"dms: compression ratio {ratio:.3f}x (all tokens seen / stored) over {summary['caches']} caches "
              f"(mean of per-row ratios {summary['mean_row_compression_ratio']:.3f}x)"
              + (f"; written to {', '.join(written)}" if written else ""))
