"""`AutoModelForCausalLMDMS`: the DMS causal LM of whatever family a
checkpoint or config is (its `model_type`), with the same `from_pretrained`
as the explicit classes."""

import importlib

__all__ = ["AutoModelForCausalLMDMS", "FAMILIES", "dms_class_for"]

FAMILIES = {
    "llama": "LlamaForCausalLMDMS",
    "mistral": "MistralForCausalLMDMS",
    "qwen2": "Qwen2ForCausalLMDMS",
    "qwen3": "Qwen3ForCausalLMDMS",
    "qwen3_moe": "Qwen3MoeForCausalLMDMS",
}
"""Plain model_type -> the DMS causal LM class in `dms.models.<model_type>`;
each family's own DMS type ("llama_dms", ...) maps to the same class."""

_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def dms_class_for(model_type):
    """The DMS causal LM class for `model_type` (plain, e.g. "llama", or DMS,
    e.g. "llama_dms"); ValueError listing the supported types otherwise."""
    family = model_type[:-len("_dms")] if isinstance(model_type, str) and model_type.endswith("_dms") else model_type
    if family not in FAMILIES:
        supported = ", ".join(f"{name}, {name}_dms" for name in FAMILIES)
        raise ValueError(f"model_type: expected one of the families DMS supports ({supported}), got "
                         f"{model_type!r}")
    module = importlib.import_module(f"dms.models.{family}")
    return getattr(module, FAMILIES[family])


class AutoModelForCausalLMDMS:
    """The DMS model of a checkpoint's family:

        model = AutoModelForCausalLMDMS.from_pretrained("meta-llama/Llama-3.2-1B-Instruct")

    gives a `LlamaForCausalLMDMS` with fresh adapters that keep everything
    (a plain checkpoint), or the trained DMS model (a DMS checkpoint, whether
    its model_type is the plain one or ours). Families: see `FAMILIES`."""

    def __init__(self, *args, **kwargs):
        raise TypeError("AutoModelForCausalLMDMS: not instantiable; use AutoModelForCausalLMDMS.from_pretrained(path) "
                        "or AutoModelForCausalLMDMS.from_config(config)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`<Family>ForCausalLMDMS.from_pretrained(pretrained_model_name_or_path,
        *model_args, **kwargs)` for the family named by the config.json's
        model_type; `kwargs` may hold DMS overrides (`dms_window_size=...`)
        and transformers' loading options."""
        from transformers import PretrainedConfig

        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        config = kwargs.get("config")
        if config is not None and not isinstance(config, (str, bytes)):
            model_type = config.model_type
        else:
            config_dict, _ = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub)
            model_type = config_dict.get("model_type")
        return dms_class_for(model_type).from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @classmethod
    def from_config(cls, config, **dms_overrides):
        """A freshly initialised DMS model for `config`: a family's DMS config,
        or its plain transformers config (which gets the separate, zero
        adapter, as a plain checkpoint does), with `dms_overrides` applied."""
        model_class = dms_class_for(getattr(config, "model_type", None))
        if not isinstance(config, model_class.config_class) or dms_overrides:
            config = model_class.config_class.from_dict(config.to_dict(), **dms_overrides)
        return model_class(config)
