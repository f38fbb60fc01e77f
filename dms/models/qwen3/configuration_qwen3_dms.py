"""`Qwen3ConfigDMS`: transformers' `Qwen3Config` plus the DMS fields of
SPEC.md (see `dms.models.configuration_dms`), validated at construction."""

from transformers import Qwen3Config

from dms.models.configuration_dms import DMS_FIELDS, DMSConfigMixin

__all__ = ["DMS_FIELDS", "Qwen3ConfigDMS"]


class Qwen3ConfigDMS(DMSConfigMixin, Qwen3Config):
    """Qwen3 configuration with DMS (SPEC.md §1–§7): the DMS fields and their
    defaults are `DMSConfigMixin`'s; the rest are `Qwen3Config`'s.

    Its `model_type` is ``"qwen3_dms"``; directories of type ``"qwen3"``
    (plain Qwen3, the published DMS checkpoints such as
    `nvidia/Qwen3-8B-DMS-8x`) load through it as well.
    """

    model_type = "qwen3_dms"
    base_model_type = "qwen3"
    __init__ = DMSConfigMixin.__init__  # in the class body: transformers makes every config a dataclass,
    #                                     whose generated __init__ would otherwise replace the mixin's
