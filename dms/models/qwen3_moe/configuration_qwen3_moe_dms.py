"""`Qwen3MoeConfigDMS`: transformers' `Qwen3MoeConfig` plus the DMS fields of SPEC.md
(see `dms.models.configuration_dms`), validated at construction."""

from transformers import Qwen3MoeConfig

from dms.models.configuration_dms import DMSConfigMixin

__all__ = ["Qwen3MoeConfigDMS"]


class Qwen3MoeConfigDMS(DMSConfigMixin, Qwen3MoeConfig):
    """Qwen3-MoE configuration with DMS (SPEC.md §1–§7): the DMS fields and
    their defaults are `DMSConfigMixin`'s; the rest are `Qwen3MoeConfig`'s.

    Its `model_type` is ``"qwen3_moe_dms"``; directories of type ``"qwen3_moe"``
    (plain checkpoints) load through it as well.
    """

    model_type = "qwen3_moe_dms"
    base_model_type = "qwen3_moe"
    __init__ = DMSConfigMixin.__init__  # in the class body: see dms.models.configuration_dms
