"""Write a loadable DMS student model from an intermediate training checkpoint.

    python -m models.qwen3.extract --config outputs/qwen3_8b/config.yaml \
        --checkpoint outputs/qwen3_8b/checkpoint-238 [--output DIR]

Run from the repository root; the default output is CHECKPOINT/student_model.
"""

import sys

from dms.training.pipeline import main_extract

if __name__ == "__main__":
    sys.exit(main_extract(prog="python -m models.qwen3.extract"))
