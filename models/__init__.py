"""Command-line entry points per model family, run from the repository root
(`python -m models.qwen3.train`, `python -m models.qwen3.extract`). The
modeling code is `dms.models` inside the installed package."""
