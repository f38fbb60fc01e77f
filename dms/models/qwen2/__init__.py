"""Qwen2 / Qwen2.5 (and DeepSeek-R1-Distill-Qwen, which is a Qwen2) with Dynamic
Memory Sparsification."""

from dms.models.qwen2.configuration_qwen2_dms import Qwen2ConfigDMS
from dms.models.qwen2.modeling_qwen2_dms import (
    Qwen2ForCausalLMDMS,
    Qwen2ForQuestionAnsweringDMS,
    Qwen2ForSequenceClassificationDMS,
    Qwen2ForTokenClassificationDMS,
    Qwen2ModelDMS,
)

__all__ = [
    "Qwen2ConfigDMS",
    "Qwen2ForCausalLMDMS",
    "Qwen2ForQuestionAnsweringDMS",
    "Qwen2ForSequenceClassificationDMS",
    "Qwen2ForTokenClassificationDMS",
    "Qwen2ModelDMS",
]
