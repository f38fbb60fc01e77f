"""Retrofit DMS onto a Qwen3 model by distillation (the seed's command; the
same as `python -m models.train`, which serves every family).

    python -m models.qwen3.train --config configs/tiny.yaml
    python -m models.qwen3.train --config configs/qwen3_8b.yaml --prepare-dataset-only
    accelerate launch -m models.qwen3.train --config configs/qwen3_8b.yaml

Run from the repository root; `--set KEY=VALUE` overrides a config key.
"""

import sys

from dms.training.pipeline import main_train

if __name__ == "__main__":
    sys.exit(main_train(prog="python -m models.qwen3.train"))
