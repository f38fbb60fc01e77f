"""Llama (Llama 2, Llama 3.x) with Dynamic Memory Sparsification."""

from dms.models.llama.configuration_llama_dms import LlamaConfigDMS
from dms.models.llama.modeling_llama_dms import (
    LlamaForCausalLMDMS,
    LlamaForQuestionAnsweringDMS,
    LlamaForSequenceClassificationDMS,
    LlamaForTokenClassificationDMS,
    LlamaModelDMS,
)

__all__ = [
    "LlamaConfigDMS",
    "LlamaForCausalLMDMS",
    "LlamaForQuestionAnsweringDMS",
    "LlamaForSequenceClassificationDMS",
    "LlamaForTokenClassificationDMS",
    "LlamaModelDMS",
]
