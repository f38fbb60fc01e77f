"""Mistral with Dynamic Memory Sparsification."""

from dms.models.mistral.configuration_mistral_dms import MistralConfigDMS
from dms.models.mistral.modeling_mistral_dms import (
    MistralForCausalLMDMS,
    MistralForQuestionAnsweringDMS,
    MistralForSequenceClassificationDMS,
    MistralForTokenClassificationDMS,
    MistralModelDMS,
)

__all__ = [
    "MistralConfigDMS",
    "MistralForCausalLMDMS",
    "MistralForQuestionAnsweringDMS",
    "MistralForSequenceClassificationDMS",
    "MistralForTokenClassificationDMS",
    "MistralModelDMS",
]
