"""Evaluation of DMS models with lm-eval-harness.

- `python -m dms.eval ARGS...` (`dms.eval.harness`): lm-eval's command line
  run in this process, with this package's task folder on the include path;
  afterwards the compression the model's caches reached
  (`dms.cache.compression_tally`) is added to lm-eval's results file and
  written next to it as `compression_<date>.json`. `scripts/evaluate.sh`
  calls it.
- `dms_passkey` (`dms/eval/tasks/dms_passkey/`, documents from
  `dms.eval.passkey`): an offline long-context retrieval task.
- `dms_recall` (`dms/eval/tasks/dms_recall/`, documents from
  `dms.eval.recall_task`): the quality study's recall prompts (needles,
  variable tracking, associative recall), offline.
"""

import os

__all__ = ["TASKS_DIR", "main"]

# The folder to give lm-eval as --include_path (python -m dms.eval adds it).
TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")


def main(argv=None) -> int:
    """`python -m dms.eval`: see `dms.eval.harness.main`."""
    from dms.eval.harness import main as run

    return run(argv)
