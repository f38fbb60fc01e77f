"""Model families with DMS attention. The modeling code lives here, inside the
installed package, so `from dms import ...` works from any directory; the
top-level `models/` folder of the repository holds the command-line entry
points (train, extract).

Importing this package registers every family's config and model classes
with transformers' Auto classes (model type ``"qwen3_dms"``)."""

from dms.models import qwen3  # noqa: F401  (registers the Auto classes)
