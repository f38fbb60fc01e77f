"""`Qwen3ConfigDMS`: transformers' `Qwen3Config` plus the DMS fields of
SPEC.md, with the names, defaults and meaning of the reference implementation
(so its checkpoints' config.json files load unchanged), validated at
construction."""

import math
import warnings

from transformers import Qwen3Config

__all__ = ["DMS_FIELDS", "Qwen3ConfigDMS"]


def _require(condition, field, expected, value):
    if not condition:
        raise ValueError(f"{field}: expected {expected}, got {value!r}")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


DMS_FIELDS = ("dms_alpha_scale", "dms_initial_alpha_offset", "dms_window_size", "dms_paged_attention_block_size",
              "dms_cr", "dms_disable_eviction", "dms_separate_alpha", "dms_alpha_per", "dms_tau",
              "dms_compile_limit", "dms_manual_inference_mode", "dms_chunked_prefill", "dms_preallocate_for_tokens")
"""Every DMS field of `Qwen3ConfigDMS` (SPEC §7 names)."""


def _validate_dms(f):
    """Raises ValueError naming the first DMS field of `f` (a dict of all
    DMS_FIELDS) whose value is out of its range."""
    for name in ("dms_alpha_scale", "dms_initial_alpha_offset"):
        _require(_is_number(f[name]), name, "a finite number", f[name])
    page = f["dms_paged_attention_block_size"]
    _require(_is_int(page) and page >= 1, "dms_paged_attention_block_size", "an int >= 1", page)
    _require(_is_int(f["dms_window_size"]) and f["dms_window_size"] > page, "dms_window_size",
             f"an int larger than dms_paged_attention_block_size ({page})", f["dms_window_size"])
    _require(_is_number(f["dms_cr"]) and f["dms_cr"] >= 1, "dms_cr", "a ratio >= 1", f["dms_cr"])
    for name in ("dms_disable_eviction", "dms_separate_alpha", "dms_manual_inference_mode"):
        _require(isinstance(f[name], bool), name, "a bool", f[name])
    _require(f["dms_alpha_per"] in ("head", "layer"), "dms_alpha_per", "'head' or 'layer'", f["dms_alpha_per"])
    _require(_is_number(f["dms_tau"]) and f["dms_tau"] > 0, "dms_tau", "a finite temperature > 0", f["dms_tau"])
    _require(f["dms_compile_limit"] is None or (_is_int(f["dms_compile_limit"]) and f["dms_compile_limit"] >= 1),
             "dms_compile_limit", "None or an int >= 1", f["dms_compile_limit"])
    _require(f["dms_chunked_prefill"] is None or (_is_int(f["dms_chunked_prefill"]) and f["dms_chunked_prefill"] >= 1),
             "dms_chunked_prefill", "None or an int >= 1", f["dms_chunked_prefill"])
    pre = f["dms_preallocate_for_tokens"]
    _require(pre is None or (_is_int(pre) and pre >= 0), "dms_preallocate_for_tokens", "None or an int >= 0", pre)


class Qwen3ConfigDMS(Qwen3Config):
    """Qwen3 configuration with DMS (SPEC.md §1–§7).

    Args:
        dms_alpha_scale: s, scale of the decision logits (default 100.0).
        dms_initial_alpha_offset: o, offset subtracted from them (default 5.0):
            a fresh adapter gives every logit -o, i.e. keeps everything.
        dms_window_size: w, the eviction delay in tokens (default 512).
        dms_paged_attention_block_size: P, slots per cache page (default 256);
            must be smaller than w.
        dms_cr: the compression ratio the model was trained for; informative
            (default 8).
        dms_disable_eviction: never evict (the teacher / vanilla model;
            default False).
        dms_separate_alpha: True: decisions come from a separate adapter
            (`dms_proj_alpha_norm`, `dms_proj_alpha`); False: from the last
            component of the first query head of each group (default False,
            as in the reference and the published checkpoints). Loading a
            config.json without any `dms_*` field (a plain Qwen3 checkpoint)
            defaults to True instead: a fresh, zero adapter that keeps
            everything until it is retrofitted (see `from_dict`).
        dms_alpha_per: "head" (a decision per KV head) or "layer" (head 0's
            decision for all heads of a layer) (default "head").
        dms_tau: Gumbel-sigmoid temperature while training (default 0.1).
        dms_compile_limit: accepted for compatibility with the reference
            (it sets torch.compile limits there); dms compiles nothing
            (default 72).
        dms_manual_inference_mode: accepted for compatibility (default False).
        dms_chunked_prefill: split prompts into chunks of this many tokens
            (default None: one prefill).
        dms_preallocate_for_tokens: cache pages reserved per row up front,
            in tokens (default 4096).
        **kwargs: the fields of `Qwen3Config`.

    Its `model_type` is ``"qwen3_dms"``, so a directory saved by dms never
    loads silently as a dense Qwen3 (which would drop the adapters): the
    Auto classes know it where dms is imported (see `dms.models`), and
    elsewhere its `auto_map` asks for `trust_remote_code=True`. Directories
    of type ``"qwen3"`` (plain Qwen3, the published DMS checkpoints) load
    through the DMS classes as before.
    """

    model_type = "qwen3_dms"

    def __init__(self, dms_alpha_scale=100.0, dms_initial_alpha_offset=5.0, dms_window_size=512,
                 dms_paged_attention_block_size=256, dms_cr=8, dms_disable_eviction=False, dms_separate_alpha=False,
                 dms_alpha_per="head", dms_tau=0.1, dms_compile_limit=72, dms_manual_inference_mode=False,
                 dms_chunked_prefill=None, dms_preallocate_for_tokens=4096, **kwargs):
        _validate_dms(dict(
            dms_alpha_scale=dms_alpha_scale, dms_initial_alpha_offset=dms_initial_alpha_offset,
            dms_window_size=dms_window_size, dms_paged_attention_block_size=dms_paged_attention_block_size,
            dms_cr=dms_cr, dms_disable_eviction=dms_disable_eviction, dms_separate_alpha=dms_separate_alpha,
            dms_alpha_per=dms_alpha_per, dms_tau=dms_tau, dms_compile_limit=dms_compile_limit,
            dms_manual_inference_mode=dms_manual_inference_mode, dms_chunked_prefill=dms_chunked_prefill,
            dms_preallocate_for_tokens=dms_preallocate_for_tokens))
        self.dms_alpha_scale = float(dms_alpha_scale)
        self.dms_initial_alpha_offset = float(dms_initial_alpha_offset)
        self.dms_window_size = dms_window_size
        self.dms_paged_attention_block_size = dms_paged_attention_block_size
        self.dms_cr = dms_cr
        self.dms_disable_eviction = dms_disable_eviction
        self.dms_separate_alpha = dms_separate_alpha
        self.dms_alpha_per = dms_alpha_per
        self.dms_tau = float(dms_tau)
        self.dms_compile_limit = dms_compile_limit
        self.dms_manual_inference_mode = dms_manual_inference_mode
        self.dms_chunked_prefill = dms_chunked_prefill
        self.dms_preallocate_for_tokens = dms_preallocate_for_tokens
        super().__init__(**kwargs)

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        """transformers' reader of config.json; a ``"qwen3"`` directory (a
        plain or published DMS checkpoint) is read as this type without
        transformers' "model of another type" warning: it is one of ours."""
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if config_dict.get("model_type") == "qwen3":
            config_dict = dict(config_dict, model_type=cls.model_type)
        return config_dict, kwargs

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """The config of a config.json (what `from_pretrained` reads), with
        `kwargs` as overrides.

        A config.json with DMS fields (a DMS checkpoint: the published hub
        layout, or a reference or dms training output) keeps the reference's
        defaults, so `nvidia/Qwen3-8B-DMS-8x`, which has no adapter weights
        and no `dms_separate_alpha`, decides with the borrowed query neuron.
        One without any (a plain Qwen3 checkpoint) gets the separate, zero
        adapter, which keeps every token: the model then computes exactly
        what the checkpoint did. Asking for the borrowed neuron on a plain
        checkpoint (`dms_separate_alpha=False`) works, with a warning that
        such a model evicts by an untrained query component."""
        unknown = [key for key in kwargs if key.startswith("dms_") and key not in DMS_FIELDS]
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], DMS_FIELDS, n=1)
            raise ValueError(f"{unknown[0]}: not a DMS field" + (f"; did you mean {close[0]}?" if close else "")
                             + f" (the DMS fields: {', '.join(DMS_FIELDS)})")
        if not any(key.startswith("dms_") for key in config_dict):
            if kwargs.get("dms_separate_alpha", True) is False:
                warnings.warn("Qwen3ConfigDMS: dms_separate_alpha=False on a checkpoint without DMS fields: "
                              "eviction decisions come from a query component that was never trained for it, "
                              "so the model evicts arbitrary tokens until it is retrofitted "
                              "(python -m models.qwen3.train)", UserWarning, stacklevel=2)
            else:
                config_dict = dict(config_dict, dms_separate_alpha=True)
        out = super().from_dict(config_dict, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        _validate_dms({name: getattr(config, name) for name in DMS_FIELDS})  # overrides are set after __init__
        return out
