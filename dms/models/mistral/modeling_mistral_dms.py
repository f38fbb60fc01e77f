"""`MistralForCausalLMDMS`: transformers' Mistral with DMS attention (SPEC
§1–§5).

The DMS attention, decoder layer, body and causal LM are the generic ones of
`dms.models.modeling_dms`; this module names the Mistral pieces they go in
front of (no q/k norms (the borrowed neuron is read from the query projection
output), no biases, Mistral's RoPE; a config with a sliding window
(Mistral-7B-v0.1's 4096) is refused, see `dms.models.modeling_dms`) and
registers the ``"mistral_dms"`` model type.
"""

from transformers.models.mistral.modeling_mistral import (
    MistralAttention,
    MistralDecoderLayer,
    MistralForCausalLM,
    MistralForQuestionAnswering,
    MistralForSequenceClassification,
    MistralForTokenClassification,
    MistralModel,
    MistralRMSNorm,
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
from dms.models.mistral.configuration_mistral_dms import MistralConfigDMS

__all__ = [
    "MistralAttentionDMS",
    "MistralDecoderLayerDMS",
    "MistralForCausalLMDMS",
    "MistralForQuestionAnsweringDMS",
    "MistralForSequenceClassificationDMS",
    "MistralForTokenClassificationDMS",
    "MistralModelDMS",
]


class MistralAttentionDMS(DMSAttention, MistralAttention):
    """Mistral attention whose keys are evicted by learned, delayed decisions
    (see `DMSAttention`)."""

    apply_rotary = staticmethod(apply_rotary_pos_emb)
    norm_class = MistralRMSNorm


class MistralDecoderLayerDMS(DMSDecoderLayer, MistralDecoderLayer):
    """A Mistral decoder layer with `MistralAttentionDMS`."""

    attention_class = MistralAttentionDMS


class MistralModelDMS(DMSPreTrainedMixin, DMSModel, MistralModel):
    """Mistral's decoder stack with DMS attention."""

    config_class = MistralConfigDMS
    decoder_layer_class = MistralDecoderLayerDMS


class MistralForCausalLMDMS(DMSPreTrainedMixin, DMSForCausalLM, MistralForCausalLM):
    """Mistral causal LM with DMS: `from_pretrained` takes a plain or a DMS
    checkpoint of the family; `generate` keeps a compressed `DMSCache`."""

    config_class = MistralConfigDMS
    model_class = MistralModelDMS


MistralForSequenceClassificationDMS = with_dms_body(MistralForSequenceClassification, MistralConfigDMS, __name__)
MistralForTokenClassificationDMS = with_dms_body(MistralForTokenClassification, MistralConfigDMS, __name__)
MistralForQuestionAnsweringDMS = with_dms_body(MistralForQuestionAnswering, MistralConfigDMS, __name__)

register_family(MistralConfigDMS, MistralModelDMS, MistralForCausalLMDMS, MistralForSequenceClassificationDMS,
                MistralForTokenClassificationDMS, MistralForQuestionAnsweringDMS)
