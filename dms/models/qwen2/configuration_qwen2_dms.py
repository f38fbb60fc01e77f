"""`Qwen2ConfigDMS`: transformers' `Qwen2Config` plus the DMS fields of SPEC.md
(see `dms.models.configuration_dms`), validated at construction."""

from transformers import Qwen2Config

from dms.models.configuration_dms import DMSConfigMixin

__all__ = ["Qwen2ConfigDMS"]


class Qwen2ConfigDMS(DMSConfigMixin, Qwen2Config):
    """Qwen2 / Qwen2.5 (and DeepSeek-R1-Distill-Qwen, which is a Qwen2) configuration
    with DMS (SPEC.md §1–§7): the DMS fields and their defaults are
    `DMSConfigMixin`'s; the rest are `Qwen2Config`'s.

    Its `model_type` is ``"qwen2_dms"``; directories of type ``"qwen2"`` (plain
    checkpoints) load through it as well.
    """

    model_type = "qwen2_dms"
    base_model_type = "qwen2"
    __init__ = DMSConfigMixin.__init__  # in the class body: see dms.models.configuration_dms
