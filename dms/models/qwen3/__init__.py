"""Qwen3 with Dynamic Memory Sparsification."""

from dms.models.qwen3.configuration_qwen3_dms import Qwen3ConfigDMS

__all__ = ["Qwen3ConfigDMS"]
