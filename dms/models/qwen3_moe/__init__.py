"""Qwen3-MoE with Dynamic Memory Sparsification."""

from dms.models.qwen3_moe.configuration_qwen3_moe_dms import Qwen3MoeConfigDMS
from dms.models.qwen3_moe.modeling_qwen3_moe_dms import (
    Qwen3MoeForCausalLMDMS,
    Qwen3MoeForQuestionAnsweringDMS,
    Qwen3MoeForSequenceClassificationDMS,
    Qwen3MoeForTokenClassificationDMS,
    Qwen3MoeModelDMS,
)

__all__ = [
    "Qwen3MoeConfigDMS",
    "Qwen3MoeForCausalLMDMS",
    "Qwen3MoeForQuestionAnsweringDMS",
    "Qwen3MoeForSequenceClassificationDMS",
    "Qwen3MoeForTokenClassificationDMS",
    "Qwen3MoeModelDMS",
]
