"""`LlamaConfigDMS`: transformers' `LlamaConfig` plus the DMS fields of SPEC.md
(see `dms.models.configuration_dms`), validated at construction."""

from transformers import LlamaConfig

from dms.models.configuration_dms import DMSConfigMixin

__all__ = ["LlamaConfigDMS"]


class LlamaConfigDMS(DMSConfigMixin, LlamaConfig):
    """Llama (Llama 2, Llama 3.x) configuration with DMS (SPEC.md §1–§7): the DMS fields and
    their defaults are `DMSConfigMixin`'s; the rest are `LlamaConfig`'s.

    Its `model_type` is ``"llama_dms"``; directories of type ``"llama"``
    (plain checkpoints) load through it as well.
    """

    model_type = "llama_dms"
    base_model_type = "llama"
    __init__ = DMSConfigMixin.__init__  # in the class body: see dms.models.configuration_dms
