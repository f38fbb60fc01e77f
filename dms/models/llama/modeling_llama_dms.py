"""`LlamaForCausalLMDMS`: transformers' Llama (Llama 2, Llama 3.x) with DMS
attention (SPEC §1–§5).

The DMS attention, decoder layer, body and causal LM are the generic ones of
`dms.models.modeling_dms`; this module names the Llama pieces they go in front
of (no q/k norms (the borrowed neuron is read from the query projection
output), biases iff attention_bias, Llama's RoPE (with its rope_scaling, e.g.
Llama 3's "llama3")) and registers the ``"llama_dms"`` model type.
"""

from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
    LlamaRMSNorm,
    apply_rotary_pos_emb,
)

from dms.models.modeling_dms import (
    DMSAttention,
    DMSDecoderLayer,
    DMSForCausalLM,
    DMSModel,
    DMSPreTrainedMixin,
    register_family,
    with_dms_body,
)
from dms.models.llama.configuration_llama_dms import LlamaConfigDMS

__all__ = [
    "LlamaAttentionDMS",
    "LlamaDecoderLayerDMS",
    "LlamaForCausalLMDMS",
    "LlamaForQuestionAnsweringDMS",
    "LlamaForSequenceClassificationDMS",
    "LlamaForTokenClassificationDMS",
    "LlamaModelDMS",
]


class LlamaAttentionDMS(DMSAttention, LlamaAttention):
    """Llama attention whose keys are evicted by learned, delayed decisions
    (see `DMSAttention`)."""

    apply_rotary = staticmethod(apply_rotary_pos_emb)
    norm_class = LlamaRMSNorm


class LlamaDecoderLayerDMS(DMSDecoderLayer, LlamaDecoderLayer):
    """A Llama decoder layer with `LlamaAttentionDMS`."""

    attention_class = LlamaAttentionDMS


class LlamaModelDMS(DMSPreTrainedMixin, DMSModel, LlamaModel):
    """Llama's decoder stack with DMS attention."""

    config_class = LlamaConfigDMS
    decoder_layer_class = LlamaDecoderLayerDMS


class LlamaForCausalLMDMS(DMSPreTrainedMixin, DMSForCausalLM, LlamaForCausalLM):
    """Llama causal LM with DMS: `from_pretrained` takes a plain or a DMS
    checkpoint of the family; `generate` keeps a compressed `DMSCache`."""

    config_class = LlamaConfigDMS
    model_class = LlamaModelDMS


LlamaForSequenceClassificationDMS = with_dms_body(LlamaForSequenceClassification, LlamaConfigDMS, __name__)
LlamaForTokenClassificationDMS = with_dms_body(LlamaForTokenClassification, LlamaConfigDMS, __name__)
LlamaForQuestionAnsweringDMS = with_dms_body(LlamaForQuestionAnswering, LlamaConfigDMS, __name__)

register_family(LlamaConfigDMS, LlamaModelDMS, LlamaForCausalLMDMS, LlamaForSequenceClassificationDMS,
                LlamaForTokenClassificationDMS, LlamaForQuestionAnsweringDMS)
