"""Qwen3 entry points: `train` and `extract` (thin wrappers of
`dms.training.pipeline`); the model classes are in `dms.models.qwen3`."""

from dms.models.qwen3 import Qwen3ConfigDMS, Qwen3ForCausalLMDMS

__all__ = ["Qwen3ConfigDMS", "Qwen3ForCausalLMDMS"]
