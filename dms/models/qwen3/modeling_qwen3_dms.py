"""`Qwen3ForCausalLMDMS`: transformers' Qwen3 with DMS attention (SPEC §1–§5).

The DMS attention, decoder layer, body and causal LM are the generic ones of
`dms.models.modeling_dms`; this module names the Qwen3 pieces they go in
front of (projections without bias by default, q/k RMSNorms over the head
dimension, Qwen3's RoPE) and registers the ``"qwen3_dms"`` model type.
"""

from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3Attention,
    Qwen3DecoderLayer,
    Qwen3ForCausalLM,
    Qwen3ForQuestionAnswering,
    Qwen3ForSequenceClassification,
    Qwen3ForTokenClassification,
    Qwen3Model,
    Qwen3RMSNorm,
    apply_rotary_pos_emb,
)

from dms.models.modeling_dms import (  # noqa: F401  (cache_kwargs, CausalLMOutputDMS: imported from here by others)
    CausalLMOutputDMS,
    DMSAttention,
    DMSDecoderLayer,
    DMSForCausalLM,
    DMSModel,
    DMSPreTrainedMixin,
    cache_kwargs,
    register_family,
    with_dms_body,
)
from dms.models.qwen3.configuration_qwen3_dms import Qwen3ConfigDMS

__all__ = [
    "Qwen3AttentionDMS",
    "Qwen3DecoderLayerDMS",
    "Qwen3ForCausalLMDMS",
    "Qwen3ForQuestionAnsweringDMS",
    "Qwen3ForSequenceClassificationDMS",
    "Qwen3ForTokenClassificationDMS",
    "Qwen3ModelDMS",
]


class Qwen3AttentionDMS(DMSAttention, Qwen3Attention):
    """Qwen3 attention whose keys are evicted by learned, delayed decisions
    (see `DMSAttention`); the borrowed neuron is read after the q-norm."""

    apply_rotary = staticmethod(apply_rotary_pos_emb)
    norm_class = Qwen3RMSNorm


class Qwen3DecoderLayerDMS(DMSDecoderLayer, Qwen3DecoderLayer):
    """A Qwen3 decoder layer with `Qwen3AttentionDMS`."""

    attention_class = Qwen3AttentionDMS


class Qwen3ModelDMS(DMSPreTrainedMixin, DMSModel, Qwen3Model):
    """Qwen3's decoder stack with DMS attention."""

    config_class = Qwen3ConfigDMS
    decoder_layer_class = Qwen3DecoderLayerDMS


class Qwen3ForCausalLMDMS(DMSPreTrainedMixin, DMSForCausalLM, Qwen3ForCausalLM):
    """Qwen3 causal LM with DMS: `from_pretrained` takes a plain Qwen3 or a
    DMS checkpoint; `generate` keeps a compressed `DMSCache`."""

    config_class = Qwen3ConfigDMS
    model_class = Qwen3ModelDMS


Qwen3ForSequenceClassificationDMS = with_dms_body(Qwen3ForSequenceClassification, Qwen3ConfigDMS, __name__)
Qwen3ForTokenClassificationDMS = with_dms_body(Qwen3ForTokenClassification, Qwen3ConfigDMS, __name__)
Qwen3ForQuestionAnsweringDMS = with_dms_body(Qwen3ForQuestionAnswering, Qwen3ConfigDMS, __name__)

register_family(Qwen3ConfigDMS, Qwen3ModelDMS, Qwen3ForCausalLMDMS, Qwen3ForSequenceClassificationDMS,
                Qwen3ForTokenClassificationDMS, Qwen3ForQuestionAnsweringDMS)
