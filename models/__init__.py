"""Command-line entry points, run from the repository root:
`python -m models.train` and `python -m models.extract` serve every family
(the family comes from the checkpoint's model_type); `models.qwen3.train`
and `models.qwen3.extract` are the seed's names for the same commands. The
modeling code is `dms.models` inside the installed package."""
