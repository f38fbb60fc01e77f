"""Retrofit DMS onto a model of any supported family by distillation: the
family (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE) comes from the model_type
of the config's model.name_or_path.

    python -m models.train --config configs/tiny.yaml
    python -m models.train --config configs/llama3.2_1b.yaml --prepare-dataset-only
    accelerate launch -m models.train --config configs/llama3.2_1b.yaml

Run from the repository root; `--set KEY=VALUE` overrides a config key.
"""

import sys

from dms.training.pipeline import main_train

if __name__ == "__main__":
    sys.exit(main_train())
