"""`Qwen3MoeForCausalLMDMS`: transformers' Qwen3-MoE with DMS attention (SPEC
§1–§5).

The DMS attention, decoder layer, body and causal LM are the generic ones of
`dms.models.modeling_dms`; this module names the Qwen3Moe pieces they go in
front of (q/k RMSNorms over the head dimension (the borrowed neuron is read
after the q-norm), biases iff attention_bias, Qwen3-MoE's RoPE; the sparse MoE
blocks and dense MLP layers are transformers' own, untouched) and registers
the ``"qwen3_moe_dms"`` model type.
"""

from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeAttention,
    Qwen3MoeDecoderLayer,
    Qwen3MoeForCausalLM,
    Qwen3MoeForQuestionAnswering,
    Qwen3MoeForSequenceClassification,
    Qwen3MoeForTokenClassification,
    Qwen3MoeModel,
    Qwen3MoeRMSNorm,
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
from dms.models.qwen3_moe.configuration_qwen3_moe_dms import Qwen3MoeConfigDMS

__all__ = [
    "Qwen3MoeAttentionDMS",
    "Qwen3MoeDecoderLayerDMS",
    "Qwen3MoeForCausalLMDMS",
    "Qwen3MoeForQuestionAnsweringDMS",
    "Qwen3MoeForSequenceClassificationDMS",
    "Qwen3MoeForTokenClassificationDMS",
    "Qwen3MoeModelDMS",
]


class Qwen3MoeAttentionDMS(DMSAttention, Qwen3MoeAttention):
    """Qwen3Moe attention whose keys are evicted by learned, delayed decisions
    (see `DMSAttention`)."""

    apply_rotary = staticmethod(apply_rotary_pos_emb)
    norm_class = Qwen3MoeRMSNorm


class Qwen3MoeDecoderLayerDMS(DMSDecoderLayer, Qwen3MoeDecoderLayer):
    """A Qwen3Moe decoder layer with `Qwen3MoeAttentionDMS`."""

    attention_class = Qwen3MoeAttentionDMS


class Qwen3MoeModelDMS(DMSPreTrainedMixin, DMSModel, Qwen3MoeModel):
    """Qwen3Moe's decoder stack with DMS attention."""

    config_class = Qwen3MoeConfigDMS
    decoder_layer_class = Qwen3MoeDecoderLayerDMS


class Qwen3MoeForCausalLMDMS(DMSPreTrainedMixin, DMSForCausalLM, Qwen3MoeForCausalLM):
    """Qwen3Moe causal LM with DMS: `from_pretrained` takes a plain or a DMS
    checkpoint of the family; `generate` keeps a compressed `DMSCache`."""

    config_class = Qwen3MoeConfigDMS
    model_class = Qwen3MoeModelDMS


Qwen3MoeForSequenceClassificationDMS = with_dms_body(Qwen3MoeForSequenceClassification, Qwen3MoeConfigDMS, __name__)
Qwen3MoeForTokenClassificationDMS = with_dms_body(Qwen3MoeForTokenClassification, Qwen3MoeConfigDMS, __name__)
Qwen3MoeForQuestionAnsweringDMS = with_dms_body(Qwen3MoeForQuestionAnswering, Qwen3MoeConfigDMS, __name__)

register_family(Qwen3MoeConfigDMS, Qwen3MoeModelDMS, Qwen3MoeForCausalLMDMS, Qwen3MoeForSequenceClassificationDMS,
                Qwen3MoeForTokenClassificationDMS, Qwen3MoeForQuestionAnsweringDMS)
