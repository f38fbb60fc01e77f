"""Qwen3 with Dynamic Memory Sparsification."""

from dms.models.qwen3.configuration_qwen3_dms import Qwen3ConfigDMS
from dms.models.qwen3.modeling_qwen3_dms import (
    Qwen3ForCausalLMDMS,
    Qwen3ForQuestionAnsweringDMS,
    Qwen3ForSequenceClassificationDMS,
    Qwen3ForTokenClassificationDMS,
    Qwen3ModelDMS,
)

__all__ = [
    "Qwen3ConfigDMS",
    "Qwen3ForCausalLMDMS",
    "Qwen3ForQuestionAnsweringDMS",
    "Qwen3ForSequenceClassificationDMS",
    "Qwen3ForTokenClassificationDMS",
    "Qwen3ModelDMS",
]
