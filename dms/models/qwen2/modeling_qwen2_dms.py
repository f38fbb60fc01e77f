"""`Qwen2ForCausalLMDMS`: transformers' Qwen2 / Qwen2.5 (and DeepSeek-R1-Distill-
Qwen, which is a Qwen2) with DMS attention (SPEC §1–§5).

The DMS attention, decoder layer, body and causal LM are the generic ones of
`dms.models.modeling_dms`; this module names the Qwen2 pieces they go in front
of (no q/k norms (the borrowed neuron is read from the query projection
output), q/k/v projections with biases and o_proj without (Qwen2's layout),
Qwen2's RoPE) and registers the ``"qwen2_dms"`` model type.
"""

from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention,
    Qwen2DecoderLayer,
    Qwen2ForCausalLM,
    Qwen2ForQuestionAnswering,
    Qwen2ForSequenceClassification,
    Qwen2ForTokenClassification,
    Qwen2Model,
    Qwen2RMSNorm,
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
from dms.models.qwen2.configuration_qwen2_dms import Qwen2ConfigDMS

__all__ = [
    "Qwen2AttentionDMS",
    "Qwen2DecoderLayerDMS",
    "Qwen2ForCausalLMDMS",
    "Qwen2ForQuestionAnsweringDMS",
    "Qwen2ForSequenceClassificationDMS",
    "Qwen2ForTokenClassificationDMS",
    "Qwen2ModelDMS",
]


class Qwen2AttentionDMS(DMSAttention, Qwen2Attention):
    """Qwen2 attention whose keys are evicted by learned, delayed decisions
    (see `DMSAttention`)."""

    apply_rotary = staticmethod(apply_rotary_pos_emb)
    norm_class = Qwen2RMSNorm


class Qwen2DecoderLayerDMS(DMSDecoderLayer, Qwen2DecoderLayer):
    """A Qwen2 decoder layer with `Qwen2AttentionDMS`."""

    attention_class = Qwen2AttentionDMS


class Qwen2ModelDMS(DMSPreTrainedMixin, DMSModel, Qwen2Model):
    """Qwen2's decoder stack with DMS attention."""

    config_class = Qwen2ConfigDMS
    decoder_layer_class = Qwen2DecoderLayerDMS


class Qwen2ForCausalLMDMS(DMSPreTrainedMixin, DMSForCausalLM, Qwen2ForCausalLM):
    """Qwen2 causal LM with DMS: `from_pretrained` takes a plain or a DMS
    checkpoint of the family; `generate` keeps a compressed `DMSCache`."""

    config_class = Qwen2ConfigDMS
    model_class = Qwen2ModelDMS


Qwen2ForSequenceClassificationDMS = with_dms_body(Qwen2ForSequenceClassification, Qwen2ConfigDMS, __name__)
Qwen2ForTokenClassificationDMS = with_dms_body(Qwen2ForTokenClassification, Qwen2ConfigDMS, __name__)
Qwen2ForQuestionAnsweringDMS = with_dms_body(Qwen2ForQuestionAnswering, Qwen2ConfigDMS, __name__)

register_family(Qwen2ConfigDMS, Qwen2ModelDMS, Qwen2ForCausalLMDMS, Qwen2ForSequenceClassificationDMS,
                Qwen2ForTokenClassificationDMS, Qwen2ForQuestionAnsweringDMS)
