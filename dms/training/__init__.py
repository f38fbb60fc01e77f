"""Retrofit training of DMS adapters by distillation (SPEC §6).

    config.py    the YAML config: every key validated, defaults, saved as OUTPUT/config.yaml
    data.py      training data: blends, chat templates, tokenisation cache, packing
    engine.py    losses, CR schedule, gate-noise counters, model loading, DMSTrainer
    pipeline.py  train / prepare data / extract a student; the command-line entry points

Run `python -m models.train --config configs/tiny.yaml` from the
repository root, or `bash scripts/train.sh CONFIG` for several processes.
"""

from dms.training.config import ConfigError, TrainingConfig, load_config

__all__ = ["ConfigError", "TrainingConfig", "load_config"]
