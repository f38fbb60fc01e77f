"""Model families with DMS attention. The modeling code lives here, inside the
installed package, so `from dms import ...` works from any directory; the
top-level `models/` folder of the repository holds the command-line entry
points (train, extract).

`modeling_dms` holds the one DMS attention, decoder layer, body and causal LM;
each family package (`llama`, `mistral`, `qwen2`, `qwen3`, `qwen3_moe`) puts
them in front of transformers' classes of that family. Importing this package
registers every family's config and model classes with transformers' Auto
classes (model types ``"llama_dms"``, ``"mistral_dms"``, ``"qwen2_dms"``,
``"qwen3_dms"``, ``"qwen3_moe_dms"``)."""

from dms.models import llama, mistral, qwen2, qwen3, qwen3_moe  # noqa: F401  (register the Auto classes)
from dms.models.auto import FAMILIES, AutoModelForCausalLMDMS, dms_class_for  # noqa: F401
