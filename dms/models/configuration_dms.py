"""The DMS fields of every family's config (SPEC.md names, defaults and
meaning of the reference implementation, so its config.json files load
unchanged), validated at construction.

`DMSConfigMixin` goes in front of a transformers config class:
``class LlamaConfigDMS(DMSConfigMixin, LlamaConfig)`` with its own
`model_type` ("llama_dms") and the `base_model_type` of the plain checkpoints
it reads ("llama"), and ``__init__ = DMSConfigMixin.__init__`` in its body:
transformers turns every config class into a dataclass whose generated
`__init__` would otherwise replace the mixin's."""

import difflib
import math
import warnings

__all__ = ["DMS_FIELDS", "DMSConfigMixin", "validate_dms_fields"]


def _require(condition, field, expected, value):
    if not condition:
        raise ValueError(f"{field}: expected {expected}, got {value!r}")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


DMS_FIELDS = ("dms_alpha_scale", "dms_initial_alpha_offset", "dms_window_size", "dms_paged_attention_block_size",
              "dms_cr", "dms_disable_eviction", "dms_separate_alpha", "dms_alpha_per", "dms_tau",
              "dms_compile_limit", "dms_manual_inference_mode", "dms_chunked_prefill", "dms_preallocate_for_tokens",
              "dms_decision_target", "dms_zero_borrowed_after_rope", "dms_kv_cache_dtype")
"""Every DMS field of a DMS config (SPEC §7 names, then the two switches for
the FastDMS checkpoint layout, see `DMSConfigMixin`)."""

FASTDMS_METADATA = "dms_metadata.json"
"""The file beside the weights that marks the FastDMS / shisa-ai layout."""

# dms_metadata.json keys (FastDMS's names first, as its loader reads them) -> our fields.
_FASTDMS_KEYS = {"dms_window_size": ("window_size", "dms_window_size"),
                 "dms_alpha_scale": ("alpha_scale", "dms_alpha_scale"),
                 "dms_initial_alpha_offset": ("alpha_offset", "dms_alpha_offset", "dms_initial_alpha_offset"),
                 "dms_cr": ("target_cr", "dms_cr")}

def validate_dms_fields(f):
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
    _require(f["dms_decision_target"] in ("previous", "current"), "dms_decision_target", "'previous' or 'current'",
             f["dms_decision_target"])
    _require(isinstance(f["dms_zero_borrowed_after_rope"], bool), "dms_zero_borrowed_after_rope", "a bool",
             f["dms_zero_borrowed_after_rope"])
    from dms.cache import KV_CACHE_DTYPES

    _require(f["dms_kv_cache_dtype"] in KV_CACHE_DTYPES, "dms_kv_cache_dtype",
             f"one of {', '.join(map(repr, KV_CACHE_DTYPES))}", f["dms_kv_cache_dtype"])


def fastdms_metadata_fields(metadata):
    """The DMS fields a FastDMS `dms_metadata.json` (its dict, flat or under
    "config") stands for: its window, scale, offset and target CR, and the
    two conventions of that layout (see `DMSConfigMixin`)."""
    metadata = metadata.get("config", metadata) if isinstance(metadata, dict) else None
    if not isinstance(metadata, dict):
        raise ValueError(f"{FASTDMS_METADATA}: expected a JSON object (flat or under \"config\"), got "
                         f"{type(metadata).__name__}")
    fields = {"dms_separate_alpha": False, "dms_decision_target": "current", "dms_zero_borrowed_after_rope": False}
    for field, keys in _FASTDMS_KEYS.items():
        for key in keys:
            if metadata.get(key) is not None:
                fields[field] = metadata[key]
                break
    window = fields.get("dms_window_size")
    if _is_int(window) and window >= 2:
        # FastDMS has no page size of its own, and its usual window (256) is not above our
        # default pages (256): pages of the largest power of two below the window, at most 256.
        fields["dms_paged_attention_block_size"] = min(256, 1 << ((window - 1).bit_length() - 1))
    return fields


def _read_fastdms_metadata(name_or_path, kwargs):
    """The parsed dms_metadata.json beside a checkpoint's config (a local
    directory, or a hub repository through transformers' file cache), or None."""
    import json
    import os

    if not isinstance(name_or_path, (str, os.PathLike)):
        return None
    subfolder = kwargs.get("subfolder") or ""
    path = os.path.join(os.fspath(name_or_path), subfolder, FASTDMS_METADATA)
    if not os.path.isdir(os.fspath(name_or_path)):
        if os.path.isfile(os.fspath(name_or_path)):  # a config.json given by path: no directory to look in
            return None
        try:
            from transformers.utils import cached_file

            path = cached_file(name_or_path, FASTDMS_METADATA, subfolder=subfolder,
                               cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision"),
                               token=kwargs.get("token"), local_files_only=kwargs.get("local_files_only", False),
                               _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except Exception:  # no hub access, or no such repository: no metadata
            return None
    if path is None or not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise ValueError(f"{FASTDMS_METADATA}: not valid JSON ({path}): {e}") from None


class DMSConfigMixin:
    """The DMS fields of SPEC.md §1–§7, in front of a transformers config.

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
            component of the first query head of each group, after the q-norm
            where the family has one, before RoPE (default False, as in the
            reference and the published checkpoints). Loading a config.json
            without any `dms_*` field (a plain checkpoint) defaults to True
            instead: a fresh, zero adapter that keeps everything until it is
            retrofitted (see `from_dict`).
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
        dms_decision_target: which token a decision flags for eviction:
            "previous" (default; SPEC §3, the reference's rule: the decision
            made at token t flags token t-1) or "current" (it flags token t
            itself: the rule of FastDMS and of the checkpoints trained for
            it, such as shisa-ai/Llama-3.2-1B-DMS-8x). Either way a flagged
            key stays visible for dms_window_size more positions.
        dms_zero_borrowed_after_rope: with the borrowed neuron, zero the
            borrowed component in the rotated query too (default True, SPEC
            §1 and the published NVIDIA checkpoints); False zeroes it before
            RoPE only, as FastDMS does.
        dms_kv_cache_dtype: how the inference cache's pages store keys and
            values (default "auto": the model's dtype); "fp8_e4m3" (or
            "fp8", vLLM's name) / "fp8_e5m2": one byte per element plus a
            float32 scale per (token, KV head) row of K and of V (see
            `dms.PagedLayerCache`): with DMS's 8x, ~16x less KV memory than
            a dense bfloat16 cache. Set it at load time
            (`from_pretrained(..., dms_kv_cache_dtype="fp8_e4m3")`, lm-eval
            `--model_args ...,dms_kv_cache_dtype=fp8_e4m3`).
        **kwargs: the fields of the family's transformers config.

    Each family's config has its own `model_type` (``"<family>_dms"``), so a
    directory saved by dms never loads silently as the dense family (which
    would drop the adapters): the Auto classes know it where dms is imported
    (see `dms.models`), and elsewhere its `auto_map` asks for
    `trust_remote_code=True`. Directories of the plain type
    (`base_model_type`: plain checkpoints, published DMS checkpoints) load
    through the DMS classes too.

    A checkpoint directory with a `dms_metadata.json` beside its weights is
    in FastDMS's layout (shisa-ai/Llama-3.2-1B-DMS-8x): its window, scale,
    offset and CR come from that file (over config.json's, as FastDMS reads
    them), with the borrowed neuron, dms_decision_target="current" and
    dms_zero_borrowed_after_rope=False, unless config.json sets those fields
    itself; arguments given to from_pretrained override all of it.
    """

    base_model_type = None
    """model_type of the plain checkpoints of this family ("qwen3", "llama", ...)."""

    def __init__(self, dms_alpha_scale=100.0, dms_initial_alpha_offset=5.0, dms_window_size=512,
                 dms_paged_attention_block_size=256, dms_cr=8, dms_disable_eviction=False, dms_separate_alpha=False,
                 dms_alpha_per="head", dms_tau=0.1, dms_compile_limit=72, dms_manual_inference_mode=False,
                 dms_chunked_prefill=None, dms_preallocate_for_tokens=4096, dms_decision_target="previous",
                 dms_zero_borrowed_after_rope=True, dms_kv_cache_dtype="auto", **kwargs):
        validate_dms_fields(dict(
            dms_alpha_scale=dms_alpha_scale, dms_initial_alpha_offset=dms_initial_alpha_offset,
            dms_window_size=dms_window_size, dms_paged_attention_block_size=dms_paged_attention_block_size,
            dms_cr=dms_cr, dms_disable_eviction=dms_disable_eviction, dms_separate_alpha=dms_separate_alpha,
            dms_alpha_per=dms_alpha_per, dms_tau=dms_tau, dms_compile_limit=dms_compile_limit,
            dms_manual_inference_mode=dms_manual_inference_mode, dms_chunked_prefill=dms_chunked_prefill,
            dms_preallocate_for_tokens=dms_preallocate_for_tokens, dms_decision_target=dms_decision_target,
            dms_zero_borrowed_after_rope=dms_zero_borrowed_after_rope, dms_kv_cache_dtype=dms_kv_cache_dtype))
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
        self.dms_decision_target = dms_decision_target
        self.dms_zero_borrowed_after_rope = dms_zero_borrowed_after_rope
        self.dms_kv_cache_dtype = dms_kv_cache_dtype
        super().__init__(**kwargs)

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        """transformers' reader of config.json; a directory of the plain
        family type (a plain or published DMS checkpoint) is read as this
        type without transformers' "model of another type" warning: it is
        one of ours."""
        from dms.models.auto import FAMILIES

        hub_kwargs = dict(kwargs)
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        found = config_dict.get("model_type")
        family = found[:-len("_dms")] if isinstance(found, str) and found.endswith("_dms") else found
        if family in FAMILIES and family != cls.base_model_type:
            # transformers would only warn and build this family's layout over another's weights.
            raise ValueError(f"model_type: {cls.__name__} reads {cls.base_model_type!r} and {cls.model_type!r} "
                             f"checkpoints, this one is {found!r}; load it with "
                             "dms.AutoModelForCausalLMDMS.from_pretrained, which picks the family")
        if cls.base_model_type is not None and config_dict.get("model_type") == cls.base_model_type:
            config_dict = dict(config_dict, model_type=cls.model_type)
        metadata = _read_fastdms_metadata(args[0], hub_kwargs) if args else None
        if metadata is not None:
            fields = fastdms_metadata_fields(metadata)
            for name in ("dms_separate_alpha", "dms_decision_target", "dms_zero_borrowed_after_rope",
                         "dms_paged_attention_block_size"):
                if name in config_dict:  # config.json's own choice wins over the layout's
                    fields.pop(name)
            config_dict = dict(config_dict, **fields)
        return config_dict, kwargs

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """The config of a config.json (what `from_pretrained` reads), with
        `kwargs` as overrides.

        A config.json with DMS fields (a DMS checkpoint: the published hub
        layout, or a reference or dms training output) keeps the reference's
        defaults, so `nvidia/Qwen3-8B-DMS-8x`, which has no adapter weights
        and no `dms_separate_alpha`, decides with the borrowed query neuron.
        One without any (a plain checkpoint) gets the separate, zero adapter,
        which keeps every token: the model then computes exactly what the
        checkpoint did. Asking for the borrowed neuron on a plain checkpoint
        (`dms_separate_alpha=False`) works, with a warning that such a model
        evicts by an untrained query component."""
        unknown = [key for key in kwargs if key.startswith("dms_") and key not in DMS_FIELDS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], DMS_FIELDS, n=1)
            raise ValueError(f"{unknown[0]}: not a DMS field" + (f"; did you mean {close[0]}?" if close else "")
                             + f" (the DMS fields: {', '.join(DMS_FIELDS)})")
        if not any(key.startswith("dms_") for key in config_dict):
            if kwargs.get("dms_separate_alpha", True) is False:
                warnings.warn(f"{cls.__name__}: dms_separate_alpha=False on a checkpoint without DMS fields: "
                              "eviction decisions come from a query component that was never trained for it, "
                              "so the model evicts arbitrary tokens until it is retrofitted "
                              "(python -m models.train)", UserWarning, stacklevel=2)
            else:
                config_dict = dict(config_dict, dms_separate_alpha=True)
        out = super().from_dict(config_dict, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        validate_dms_fields({name: getattr(config, name) for name in DMS_FIELDS})  # overrides are set after __init__
        return out
