"""Loads the DMS model classes from the installed dms package
(pip install dms-kv; the import name is dms)."""
from dms.models.qwen3.modeling_qwen3_dms import Qwen3ForCausalLMDMS, Qwen3ModelDMS

__all__ = ["Qwen3ForCausalLMDMS", "Qwen3ModelDMS"]
