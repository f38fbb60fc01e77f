"""`MistralConfigDMS`: transformers' `MistralConfig` plus the DMS fields of SPEC.md
(see `dms.models.configuration_dms`), validated at construction."""

from transformers import MistralConfig

from dms.models.configuration_dms import DMSConfigMixin

__all__ = ["MistralConfigDMS"]


class MistralConfigDMS(DMSConfigMixin, MistralConfig):
    """Mistral configuration with DMS (SPEC.md §1–§7): the DMS fields and
    their defaults are `DMSConfigMixin`'s; the rest are `MistralConfig`'s.

    Its `model_type` is ``"mistral_dms"``; directories of type ``"mistral"``
    (plain checkpoints) load through it as well.
    """

    model_type = "mistral_dms"
    base_model_type = "mistral"
    __init__ = DMSConfigMixin.__init__  # in the class body: see dms.models.configuration_dms
