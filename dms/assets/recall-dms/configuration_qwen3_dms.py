"""Loads the DMS config class from the installed dms package
(pip install dms-kv; the import name is dms)."""
from dms.models.qwen3.configuration_qwen3_dms import Qwen3ConfigDMS

__all__ = ["Qwen3ConfigDMS"]
