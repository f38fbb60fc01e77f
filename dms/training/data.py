"""Training data for DMS retrofitting: a weighted blend of sources (named hub
datasets, any hub dataset, local JSONL/Parquet files), rendered with the
tokenizer's chat template, tokenised once into an on-disk cache and packed
into fixed-length sequences.

    config = DataConfig.from_dict({"blend": "OpenR1Math220k:1.0", "max_length": 4096,
                                   "chat_template_kwargs": {"enable_thinking": True}})
    path = prepare_dataset(config, tokenizer)   # once, before `accelerate launch`
    dataset = build_dataset(config, tokenizer)  # every rank: reads the cache

Sources (`DataConfig.blend`, a string or a list):

    "OpenR1Math220k:1.0,sample:0.5"                  # NAME[:WEIGHT], comma separated
    "local:/data/chats.jsonl:2,local:/data/books/:1"  # local:PATH[:WEIGHT] (file, folder or glob)
    "hub:org/some-dataset:1"                         # any hub dataset of `messages` or `text` rows
    [{"name": "OpenR1Math220k", "weight": 1.0, "data_files": "/data/openr1/*.parquet"},
     {"path": "/data/chats.jsonl", "weight": 0.5}]

A record is a chat conversation when it has `messages` (a list of
`{"role", "content"}`), else plain text when it has `text` (a string).
Conversations go through `tokenizer.apply_chat_template(...,
**chat_template_kwargs)`: one that ends with an assistant turn is rendered
whole; one that ends otherwise is a prompt and gets the generation prompt
(`add_generation_prompt=True`). Qwen3's template reads `enable_thinking`
only in the generation prompt, so with Qwen3 it changes prompt-only documents
and leaves complete conversations as they are.

Weights are proportions of documents. With N_i documents in source i and
p_i = w_i / sum(w), the blend holds D = sum(N_i) documents, source i
contributing c_i = p_i * D of them (rounded by largest remainder so the c_i
add up to D). A source with c_i <= N_i gives a seeded random subset of its
documents; one with c_i > N_i gives each document floor(c_i / N_i) times and
a seeded random subset of the rest once more. The D documents are then
shuffled (seeded), each is followed by the tokenizer's EOS, and the token
stream is cut into `max_length` sequences; the last one is padded
(attention_mask 0) when the stream runs out. With `num_sequences` only the
first num_sequences * max_length tokens of that stream are kept (and only the
documents they need are tokenised), so a capped dataset is a prefix of the
uncapped one.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

__all__ = [
    "DataConfig", "DataSource", "NamedDataset", "NAMED_DATASETS", "SAMPLE_DATA", "DEFAULT_CACHE_DIR",
    "DatasetUnreachableError", "PackedDataset", "build_dataset", "prepare_dataset", "dataset_cache_path",
]

SAMPLE_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_data", "arithmetic.jsonl")
"""The shipped sample set: a few hundred short arithmetic word problems as
chat conversations (worked steps in a think block) and arithmetic fact texts,
made by `sample_data/generate.py`; blend name `sample`."""

DEFAULT_CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "dms", "datasets")
"""Where tokenised datasets go when `DataConfig.cache_dir` is None (`~` is
expanded when used)."""

# Bumped whenever the cache's layout or the packing rules change, so old
# caches are never read as new ones.
_CACHE_FORMAT = 1

# Arguments of apply_chat_template that this module decides itself.
_RESERVED_TEMPLATE_KWARGS = ("conversation", "tokenize", "add_generation_prompt", "continue_final_message",
                             "return_dict", "return_tensors", "padding", "truncation", "max_length")

_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")

# Documents tokenised per tokenizer call.
_TOKENIZE_BATCH = 256


class DatasetUnreachableError(ConnectionError):
    """A hub dataset of the blend could not be loaded (offline, no network,
    not cached); the message says how to point the blend at local files."""


# --------------------------------------------------------------------------
# Records -> documents. A document is ("chat", [messages]) or ("text", str).

def _generic_document(record, where):
    """A `messages` conversation, else a `text` string; anything else is an
    error naming `where` (source and row)."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object / table row with 'messages' or 'text', "
                         f"got {type(record).__name__}")
    messages = record.get("messages")
    if messages is not None:
        return ("chat", _check_messages(messages, where))
    text = record.get("text")
    if text is not None:
        if not isinstance(text, str):
            raise ValueError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        return ("text", text)
    raise ValueError(f"{where}: expected a 'messages' list (chat) or a 'text' string, found keys "
                     f"{sorted(record)}")


def _check_messages(messages, where):
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for j, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: messages[{j}] must be an object with string 'role' and 'content', "
                             f"got {message!r:.200}")
        # Parquet structs give every message every field; absent ones are None.
        out.append({k: v for k, v in message.items() if v is not None})
    return out


def _openr1_columns(available):
    if "messages" in available:
        return ["messages"]
    return [c for c in ("problem", "generations", "correctness_math_verify") if c in available]


def _openr1_document(record, where):
    """OpenR1-Math-220k rows carry `messages` (the problem, then one
    DeepSeek-R1 trace `<think>...</think>` + answer); without it, the problem
    and its first Math-Verify-correct generation (else its first)."""
    messages = record.get("messages")
    if messages:
        return ("chat", _check_messages(messages, where))
    problem, generations = record.get("problem"), record.get("generations") or []
    verified = list(record.get("correctness_math_verify") or [])
    if not isinstance(problem, str) or not generations:
        raise ValueError(f"{where}: an OpenR1-Math-220k row needs 'messages', or 'problem' and 'generations'; "
                         f"found keys {sorted(record)}")
    chosen = next((g for g, ok in zip(generations, verified) if ok), generations[0])
    return ("chat", [{"role": "user", "content": problem}, {"role": "assistant", "content": chosen}])


@dataclass(frozen=True)
class NamedDataset:
    """A blend name: where the data lives on the hub and how a row becomes a
    document. `columns(available)` picks the columns to read."""
    hub_id: str
    subset: str | None
    split: str
    to_document: Callable[[Mapping, str], tuple]
    columns: Callable[[Sequence[str]], list] | None
    description: str


NAMED_DATASETS: dict[str, NamedDataset] = {
    # Card (huggingface.co/datasets/open-r1/OpenR1-Math-220k): configs `default`
    # (94k problems, split `train`), `extended` and `all`; columns problem,
    # solution, answer, problem_type, question_type, source, uuid,
    # is_reasoning_complete, generations, correctness_math_verify,
    # correctness_llama, finish_reasons, correctness_count, messages.
    "OpenR1Math220k": NamedDataset(
        hub_id="open-r1/OpenR1-Math-220k", subset="default", split="train",
        to_document=_openr1_document, columns=_openr1_columns,
        description="DeepSeek-R1 reasoning traces for NuminaMath 1.5 problems (the DMS paper's data)"),
}

# Blend names handled here rather than through the registry.
_SPECIAL_NAMES = ("sample", "local", "hub")


# --------------------------------------------------------------------------
# Configuration.

@dataclass(frozen=True)
class DataSource:
    """One entry of a blend.

    name: a `NAMED_DATASETS` key, "sample" (the shipped `SAMPLE_DATA`),
        "local" (files at `path`) or "hub" (the hub dataset `hub_id`).
    weight: share of the blend's documents, relative to the other entries
        (default 1.0; > 0).
    path: local only: a .jsonl/.json/.parquet file, a folder (its files with
        those suffixes, sorted) or a glob.
    hub_id: hub only: the dataset id (`org/name`).
    subset, split, revision: the hub config name, split and git revision
        (defaults: the registry's for a named dataset; None, "train" and the
        latest for `hub`).
    data_files: named/hub only: local files (paths or globs) shaped like the
        hub dataset, read instead of the hub with the same converter
        (default None: the hub).
    max_documents: use at most this many documents of the source, its first
        ones, before blending (default None: all).
    """
    name: str
    weight: float = 1.0
    path: str | None = None
    hub_id: str | None = None
    subset: str | None = None
    split: str | None = None
    revision: str | None = None
    data_files: tuple | None = None
    max_documents: int | None = None

    def to_dict(self) -> dict:
        out = {"name": self.name, "weight": self.weight}
        for key in ("path", "hub_id", "subset", "split", "revision", "max_documents"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.data_files is not None:
            out["data_files"] = list(self.data_files)
        return out

    def describe(self) -> str:
        if self.name == "local":
            return f"local:{self.path}"
        if self.name == "hub":
            return f"hub:{self.hub_id}"
        return self.name


_SOURCE_KEYS = tuple(f.name for f in dataclasses.fields(DataSource))


def _parse_blend(value, where="data.blend") -> tuple:
    if isinstance(value, str):
        entries = [e.strip() for e in value.split(",")]
        if not any(entries):
            raise ValueError(f"{where}: expected at least one source, e.g. \"sample:1.0\", got {value!r}")
        if not all(entries):
            raise ValueError(f"{where}: empty entry in {value!r} (entries are separated by single commas)")
        sources = [_parse_source_string(e, f"{where}[{i}]") for i, e in enumerate(entries)]
    elif isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{where}: expected at least one source, got an empty list")
        sources = []
        for i, entry in enumerate(value):
            if isinstance(entry, DataSource):
                sources.append(_checked_source(entry, f"{where}[{i}]"))
            elif isinstance(entry, str):
                sources.append(_parse_source_string(entry.strip(), f"{where}[{i}]"))
            elif isinstance(entry, Mapping):
                sources.append(_parse_source_mapping(entry, f"{where}[{i}]"))
            else:
                raise ValueError(f"{where}[{i}]: expected a string like \"NAME:WEIGHT\" or a mapping with "
                                 f"name/path/hub_id and weight, got {type(entry).__name__}")
    else:
        raise ValueError(f"{where}: expected a string like \"OpenR1Math220k:1.0,sample:0.5\" or a list of "
                         f"sources, got {type(value).__name__}")
    return tuple(sources)


def _parse_source_string(entry, where):
    """`NAME[:WEIGHT]`, `local:PATH[:WEIGHT]` or `hub:ID[:WEIGHT]`."""
    spec, weight = entry, 1.0
    head, sep, tail = entry.rpartition(":")
    if sep:
        try:
            weight = float(tail)
        except ValueError:
            pass
        else:
            spec = head
    kind, sep, rest = spec.partition(":")
    if kind == "local":
        if not rest:
            raise ValueError(f"{where}: expected local:PATH[:WEIGHT], got {entry!r}")
        return _checked_source(DataSource(name="local", weight=weight, path=rest), where)
    if kind == "hub":
        if not rest:
            raise ValueError(f"{where}: expected hub:ORG/NAME[:WEIGHT], got {entry!r}")
        return _checked_source(DataSource(name="hub", weight=weight, hub_id=rest), where)
    if sep:
        raise ValueError(f"{where}: cannot parse {entry!r}; expected NAME[:WEIGHT], local:PATH[:WEIGHT] or "
                         f"hub:ORG/NAME[:WEIGHT] with NAME one of {_known_names()}")
    return _checked_source(DataSource(name=spec, weight=weight), where)


def _parse_source_mapping(entry, where):
    unknown = sorted(set(entry) - set(_SOURCE_KEYS))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key; expected some of {', '.join(_SOURCE_KEYS)}")
    fields_ = dict(entry)
    if "name" not in fields_:
        if "path" in fields_:
            fields_["name"] = "local"
        elif "hub_id" in fields_:
            fields_["name"] = "hub"
        else:
            raise ValueError(f"{where}: expected 'name' (one of {_known_names()}), 'path' (local files) or "
                             f"'hub_id' (a hub dataset)")
    if isinstance(fields_.get("data_files"), (list, tuple)):
        fields_["data_files"] = tuple(fields_["data_files"])
    elif isinstance(fields_.get("data_files"), str):
        fields_["data_files"] = (fields_["data_files"],)
    return _checked_source(DataSource(**fields_), where)


def _known_names():
    return ", ".join(list(NAMED_DATASETS) + ["sample"])


def _checked_source(src: DataSource, where) -> DataSource:
    if not isinstance(src.name, str) or (src.name not in NAMED_DATASETS and src.name not in _SPECIAL_NAMES):
        raise ValueError(f"{where}.name: unknown dataset {src.name!r}; expected one of {_known_names()}, "
                         f"or local:PATH / hub:ORG/NAME")
    weight = src.weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"{where}.weight: expected a finite number > 0, got {weight!r}")
    for key in ("path", "hub_id", "subset", "split", "revision"):
        value = getattr(src, key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{where}.{key}: expected a non-empty string, got {value!r}")
    if src.data_files is not None:
        if not isinstance(src.data_files, tuple) or not src.data_files or \
                not all(isinstance(p, str) and p for p in src.data_files):
            raise ValueError(f"{where}.data_files: expected a path/glob or a non-empty list of them, "
                             f"got {src.data_files!r}")
    md = src.max_documents
    if md is not None and (isinstance(md, bool) or not isinstance(md, int) or md < 1):
        raise ValueError(f"{where}.max_documents: expected an integer >= 1 or null, got {md!r}")
    is_local, is_hub = src.name in ("local", "sample"), src.name == "hub"
    if src.name == "local" and src.path is None:
        raise ValueError(f"{where}.path: a local source needs a path (a .jsonl/.json/.parquet file, folder or glob)")
    if src.name != "local" and src.path is not None:
        raise ValueError(f"{where}.path: only for local sources (name 'local'); use data_files to read "
                         f"{src.name!r} from local files")
    if is_hub and src.hub_id is None:
        raise ValueError(f"{where}.hub_id: a hub source needs the dataset id, e.g. 'org/name'")
    if not is_hub and src.hub_id is not None:
        raise ValueError(f"{where}.hub_id: only for hub sources (name 'hub')")
    if is_local:
        for key in ("subset", "split", "revision", "data_files"):
            if getattr(src, key) is not None:
                raise ValueError(f"{where}.{key}: only for hub or named datasets, not for {src.name!r}")
    return src if type(weight) is float else dataclasses.replace(src, weight=float(weight))


def _expand_local(pattern, where):
    """The sorted files a local path names: a file, a folder's data files or a glob."""
    path = os.path.expanduser(pattern)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(_LOCAL_SUFFIXES))
    elif any(ch in path for ch in "*?["):
        files = sorted(f for f in glob.glob(path) if os.path.isfile(f))
    elif os.path.isfile(path):
        files = [path]
    else:
        raise ValueError(f"{where}: no such file or folder: {pattern!r}")
    if not files:
        raise ValueError(f"{where}: {pattern!r} holds no .jsonl/.json/.parquet files")
    bad = [f for f in files if not f.endswith(_LOCAL_SUFFIXES)]
    if bad:
        raise ValueError(f"{where}: {bad[0]!r} is not .jsonl, .json or .parquet")
    return [os.path.abspath(f) for f in files]


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class DataConfig:
    """What to train on and how to pack it (the `data:` section of a
    training config).

    blend: the sources and their weights (see the module docstring); a
        string, a list of strings / mappings, or DataSource objects.
    max_length: tokens per packed sequence (default 4096).
    chat_template_kwargs: extra arguments of `apply_chat_template`, e.g.
        {"enable_thinking": True} (default {}).
    cache_dir: where tokenised datasets are kept (default None:
        `DEFAULT_CACHE_DIR`, ~/.cache/dms/datasets).
    num_sequences: keep only the first this many packed sequences (default
        None: all).
    seed: seeds source subsampling and document shuffling (default 42).
    """
    blend: tuple
    max_length: int = 4096
    chat_template_kwargs: Mapping = field(default_factory=dict)
    cache_dir: str | None = None
    num_sequences: int | None = None
    seed: int = 42

    def __post_init__(self):
        object.__setattr__(self, "blend", _parse_blend(self.blend))
        if not _is_int(self.max_length) or self.max_length < 2:
            raise ValueError(f"data.max_length: expected an integer >= 2, got {self.max_length!r}")
        kwargs = self.chat_template_kwargs
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
            raise ValueError(f"data.chat_template_kwargs: expected a mapping of argument names to values, "
                             f"got {kwargs!r}")
        reserved = sorted(set(kwargs) & set(_RESERVED_TEMPLATE_KWARGS))
        if reserved:
            raise ValueError(f"data.chat_template_kwargs.{reserved[0]}: set by the data pipeline itself; "
                             f"pass template variables only (e.g. enable_thinking)")
        try:
            json.dumps(dict(kwargs), sort_keys=True)
        except (TypeError, ValueError) as err:
            raise ValueError(f"data.chat_template_kwargs: values must be plain data (strings, numbers, "
                             f"booleans, lists, mappings): {err}") from None
        object.__setattr__(self, "chat_template_kwargs", dict(kwargs))
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir):
            raise ValueError(f"data.cache_dir: expected a folder path or null, got {self.cache_dir!r}")
        if self.num_sequences is not None and (not _is_int(self.num_sequences) or self.num_sequences < 1):
            raise ValueError(f"data.num_sequences: expected an integer >= 1 or null, got {self.num_sequences!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"data.seed: expected an integer >= 0, got {self.seed!r}")

    @classmethod
    def from_dict(cls, d: Mapping) -> "DataConfig":
        """From the `data:` mapping of a YAML config; an unknown key or a bad
        value raises ValueError naming it as `data.<key>`."""
        if not isinstance(d, Mapping):
            raise ValueError(f"data: expected a mapping with keys {', '.join(_CONFIG_KEYS)}, "
                             f"got {type(d).__name__}")
        unknown = sorted(set(d) - set(_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"data.{unknown[0]}: unknown key; expected some of {', '.join(_CONFIG_KEYS)}")
        if "blend" not in d:
            raise ValueError("data.blend: required, e.g. \"OpenR1Math220k:1.0\" or \"local:/path/file.jsonl:1.0\"")
        return cls(**dict(d))

    def to_dict(self) -> dict:
        """Plain data that `from_dict` turns back into this config."""
        return {"blend": [s.to_dict() for s in self.blend], "max_length": self.max_length,
                "chat_template_kwargs": dict(self.chat_template_kwargs), "cache_dir": self.cache_dir,
                "num_sequences": self.num_sequences, "seed": self.seed}


_CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(DataConfig))


# --------------------------------------------------------------------------
# Loading sources: each becomes a random-access table of rows plus a
# row -> document converter. A table (_ListRows, _ArrowRows, _HubRows,
# _ChainRows) has len() and rows(indices) -> list of dicts.

class _ListRows:
    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def rows(self, indices):
        return [self.records[i] for i in indices]


class _ArrowRows:
    def __init__(self, table):
        self.table = table

    def __len__(self):
        return self.table.num_rows

    def rows(self, indices):
        return self.table.take(np.asarray(indices, dtype=np.int64)).to_pylist()


class _HubRows:
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def rows(self, indices):
        batch = self.dataset[[int(i) for i in indices]]
        names = list(batch)
        return [dict(zip(names, values)) for values in zip(*(batch[n] for n in names))]


class _ChainRows:
    """Several files' rows, one after another (`names[k]`: part k's file)."""

    def __init__(self, parts, names):
        self.parts, self.names = parts, names
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self):
        return int(self.starts[-1])

    def locate(self, i):
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return part, int(i - self.starts[part])

    def rows(self, indices):
        located = [self.locate(i) for i in indices]
        out = [None] * len(located)
        for part in sorted({p for p, _ in located}):
            slots = [k for k, (p, _) in enumerate(located) if p == part]
            for k, row in zip(slots, self.parts[part].rows([located[k][1] for k in slots])):
                out[k] = row
        return out


def _read_files(files, columns, where):
    """JSONL/JSON records or Parquet tables of `files`, chained; `columns`
    (a function of the available column names) trims Parquet reads."""
    parts = []
    for path in files:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            try:
                schema_names = pq.read_schema(path).names
                wanted = columns(schema_names) if columns else None
                parts.append(_ArrowRows(pq.read_table(path, columns=wanted or None)))
            except OSError as err:
                raise ValueError(f"{where}: cannot read Parquet file {path!r}: {err}") from None
        else:
            parts.append(_ListRows(_read_json_records(path, where)))
    return _ChainRows(parts, files)


def _read_json_records(path, where):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if path.endswith(".json") and stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: {path!r} is not valid JSON: {err}") from None
        return records
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: {path}:{lineno} is not a JSON object: {err}") from None
    return records


def _env_true(name):
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


class _OfflineAsEnvironmentSays:
    """datasets and huggingface_hub read HF_HUB_OFFLINE / HF_DATASETS_OFFLINE
    once, at import; this honours the variables as they are now, so a
    process that sets them late still gets no network access (and the
    cached copy of a dataset, if there is one)."""

    def __enter__(self):
        import datasets.config
        import huggingface_hub.constants

        self.saved = None
        if (_env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE")) and \
                not (datasets.config.HF_HUB_OFFLINE and huggingface_hub.constants.HF_HUB_OFFLINE):
            self.saved = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
            datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            import datasets.config
            import huggingface_hub.constants

            datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = self.saved


def _hub_target(src):
    """(hub_id, subset, split, revision, converter, columns) of a named or hub source."""
    if src.name == "hub":
        return src.hub_id, src.subset, src.split or "train", src.revision, _generic_document, None
    spec = NAMED_DATASETS[src.name]
    return (spec.hub_id, src.subset or spec.subset, src.split or spec.split, src.revision, spec.to_document,
            spec.columns)


def _load_hub(src, where):
    hub_id, subset, split, revision, _, columns = _hub_target(src)
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"{where}: loading {hub_id!r} needs the `datasets` package "
                          f"(pip install 'dms[train]')") from err
    how_local = (f"To train without the hub, point the blend at local JSONL/Parquet files of chat "
                 f"'messages' or 'text' rows, e.g. data: {{blend: \"local:/path/to/file.jsonl:1.0\"}}, or keep this "
                 f"dataset's converter on a local copy of its files: data: {{blend: [{{name: {src.name}, "
                 f"data_files: /path/to/{hub_id.split('/')[-1]}/*.parquet, weight: 1.0}}]}}.")
    if src.name == "hub":
        how_local = how_local.replace(f"name: {src.name},", f"hub_id: {hub_id},")
    try:
        with _OfflineAsEnvironmentSays():
            dataset = datasets.load_dataset(hub_id, subset, split=split, revision=revision)
    except (OSError, datasets.exceptions.DatasetNotFoundError) as err:
        offline = _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE") or \
            datasets.config.HF_HUB_OFFLINE
        why = "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and it is not cached" if offline \
            else f"{type(err).__name__}: {err}"
        raise DatasetUnreachableError(
            f"{where}: could not reach dataset {hub_id!r} (subset {subset!r}, split {split!r}) on the Hugging "
            f"Face Hub: {why}. {how_local}") from err
    if columns is not None:
        dataset = dataset.select_columns(columns(dataset.column_names))
    return _HubRows(dataset)


class _Source:
    """A loaded blend entry: its rows and how a row becomes a document."""

    def __init__(self, src: DataSource, index: int):
        self.src, self.where = src, f"data.blend[{index}] ({src.describe()})"
        if src.name in ("local", "sample"):
            files = _expand_local(SAMPLE_DATA if src.name == "sample" else src.path, f"data.blend[{index}].path")
            self.table, self.convert, self.files = _read_files(files, None, self.where), _generic_document, files
        elif src.data_files is not None:
            files = [f for p in src.data_files for f in _expand_local(p, f"data.blend[{index}].data_files")]
            _, _, _, _, convert, columns = _hub_target(src)
            self.table, self.convert, self.files = _read_files(files, columns, self.where), convert, files
        else:
            self.table, self.convert, self.files = _load_hub(src, self.where), _hub_target(src)[4], None
        if src.name in ("local", "sample"):
            self._check_local()
        self.size = len(self.table) if src.max_documents is None else min(len(self.table), src.max_documents)
        if self.size == 0:
            raise ValueError(f"{self.where}: holds no documents")

    def _check_local(self):
        """Local files are read whole anyway: check every row up front so a
        bad line is reported before any tokenising."""
        for part, name in zip(self.table.parts, self.table.names):
            if isinstance(part, _ArrowRows):
                if not {"messages", "text"} & set(part.table.column_names):
                    raise ValueError(f"{self.where}: {name} has neither a 'messages' nor a 'text' column "
                                     f"(columns: {part.table.column_names})")
            else:
                for j, record in enumerate(part.records):
                    _generic_document(record, f"{self.where}: {name} row {j}")

    def documents(self, indices):
        rows = self.table.rows(indices)
        return [self.convert(row, f"{self.where} row {i}") for row, i in zip(rows, indices)]


# --------------------------------------------------------------------------
# Blending.

def _blend_counts(sizes, weights):
    """Documents per source: proportional to the weights, D = sum(sizes) in
    all, rounded by largest remainder (ties to the earlier source)."""
    total = int(sum(sizes))
    quotas = np.asarray(weights, dtype=np.float64) / float(sum(weights)) * total
    counts = np.floor(quotas).astype(np.int64)
    short = total - int(counts.sum())
    order = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[:short]:
        counts[i] += 1
    return counts


def _blend_order(sizes, weights, seed):
    """(source ids, document ids) of the blend in training order."""
    counts = _blend_counts(sizes, weights)
    streams = np.random.SeedSequence(seed).spawn(len(sizes) + 1)
    source_ids, doc_ids = [], []
    for i, (n, c) in enumerate(zip(sizes, counts)):
        rng = np.random.default_rng(streams[i])
        repeats, rest = divmod(int(c), int(n))
        picked = np.concatenate([np.tile(np.arange(n, dtype=np.int64), repeats),
                                 np.sort(rng.choice(n, size=rest, replace=False))])
        doc_ids.append(picked)
        source_ids.append(np.full(len(picked), i, dtype=np.int64))
    source_ids, doc_ids = np.concatenate(source_ids), np.concatenate(doc_ids)
    perm = np.random.default_rng(streams[-1]).permutation(len(doc_ids))
    return source_ids[perm], doc_ids[perm], counts


# --------------------------------------------------------------------------
# Tokenising and packing.

def _render(document, tokenizer, template_kwargs, where):
    kind, body = document
    if kind == "text":
        return body
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: holds chat conversations but the tokenizer has no chat template; "
                         f"set tokenizer.chat_template or use 'text' records")
    prompt_only = body[-1]["role"] != "assistant"
    return tokenizer.apply_chat_template(body, tokenize=False, add_generation_prompt=prompt_only,
                                         **template_kwargs)


def _tokenize(texts, tokenizer):
    """Token ids of each text, no special tokens added (the chat template
    already wrote its own)."""
    return tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]


def _eos_id(tokenizer):
    eos = getattr(tokenizer, "eos_token_id", None)
    if not _is_int(eos):
        raise ValueError("tokenizer: needs an eos_token_id (documents are separated by EOS), got "
                         f"{eos!r}")
    return eos


def _pack(config, sources, tokenizer, show_progress):
    """Tokenise the blend in order and cut it into max_length rows:
    (input_ids [n, max_length] int32, lengths [n] int32, meta)."""
    from tqdm.auto import tqdm

    eos = _eos_id(tokenizer)
    pad = tokenizer.pad_token_id if _is_int(getattr(tokenizer, "pad_token_id", None)) else eos
    sizes = [s.size for s in sources]
    source_ids, doc_ids, counts = _blend_order(sizes, [s.src.weight for s in sources], config.seed)
    length = config.max_length
    target = None if config.num_sequences is None else config.num_sequences * length
    repeated = {i for i, (n, c) in enumerate(zip(sizes, counts)) if c > n}
    memo = {}  # token arrays of documents that come back (repeated sources only)
    pieces, total = [], 0
    used_docs = np.zeros(len(sources), dtype=np.int64)
    used_tokens = np.zeros(len(sources), dtype=np.int64)
    bar = tqdm(total=target if target else len(doc_ids), unit="tok" if target else "doc", unit_scale=bool(target),
               desc="tokenising", disable=not show_progress)
    try:
        for start in range(0, len(doc_ids), _TOKENIZE_BATCH):
            if target is not None and total >= target:
                break
            batch = list(zip(source_ids[start:start + _TOKENIZE_BATCH].tolist(),
                             doc_ids[start:start + _TOKENIZE_BATCH].tolist()))
            todo = sorted({key for key in batch if key not in memo})
            texts = {}
            for s in sorted({s for s, _ in todo}):
                wanted = [d for t, d in todo if t == s]
                for d, doc in zip(wanted, sources[s].documents(wanted)):
                    texts[(s, d)] = _render(doc, tokenizer, config.chat_template_kwargs, sources[s].where)
            tokens = dict(zip(texts, _tokenize(texts.values(), tokenizer))) if texts else {}
            batch_tokens = 0
            for key in batch:
                if key in memo:
                    ids = memo[key]
                else:
                    ids = np.asarray(tokens[key] + [eos], dtype=np.int32)
                    if key[0] in repeated:
                        memo[key] = ids
                pieces.append(ids)
                total += len(ids)
                batch_tokens += len(ids)
                used_docs[key[0]] += 1
                used_tokens[key[0]] += len(ids)
                if target is not None and total >= target:
                    break
            bar.update(min(batch_tokens, target - bar.n) if target else len(batch))
    finally:
        bar.close()
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    n_rows = -(-len(stream) // length)
    if config.num_sequences is not None:
        if n_rows < config.num_sequences:
            warnings.warn(f"data.num_sequences is {config.num_sequences} but the blend holds only {n_rows} "
                          f"sequences of {length} tokens; using {n_rows}", stacklevel=3)
        n_rows = min(n_rows, config.num_sequences)
    stream = stream[:n_rows * length]
    input_ids = np.full((n_rows, length), pad, dtype=np.int32)
    input_ids.reshape(-1)[:len(stream)] = stream
    lengths = np.clip(len(stream) - np.arange(n_rows, dtype=np.int64) * length, 0, length).astype(np.int32)
    meta = {
        "format": _CACHE_FORMAT, "num_sequences": int(n_rows), "max_length": length,
        "num_tokens": int(len(stream)), "eos_token_id": int(eos), "pad_token_id": int(pad),
        "config": config.to_dict(),
        "sources": [{"source": s.src.describe(), "weight": s.src.weight, "available_documents": int(s.size),
                     "blend_documents": int(c), "documents_used": int(u), "tokens_used": int(t)}
                    for s, c, u, t in zip(sources, counts, used_docs, used_tokens)],
    }
    return input_ids, lengths, meta


# --------------------------------------------------------------------------
# Cache.

def _tokenizer_fingerprint(tokenizer):
    """What decides token ids: the tokenizer's full definition (a fast
    tokenizer's JSON without its padding/truncation state, else its
    vocabulary and special tokens), chat template, EOS and pad."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        definition = json.loads(backend.to_str())
        definition.pop("padding", None)
        definition.pop("truncation", None)
        h.update(json.dumps(definition, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(json.dumps(getattr(tokenizer, "all_special_tokens", []) or []).encode())
    template = getattr(tokenizer, "chat_template", None)
    h.update(json.dumps(template, sort_keys=True).encode())
    h.update(json.dumps([getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "pad_token_id", None)]).encode())
    return h.hexdigest()


def _source_fingerprint(src, index):
    """The source's settings plus, for files, their paths, sizes and
    modification times (an edited file is tokenised again)."""
    out = src.to_dict()
    if src.name in NAMED_DATASETS or src.name == "hub":
        hub_id, subset, split, revision, _, _ = _hub_target(src)
        out.update(hub_id=hub_id, subset=subset, split=split, revision=revision)
    if src.name in ("local", "sample"):
        files = _expand_local(SAMPLE_DATA if src.name == "sample" else src.path, f"data.blend[{index}].path")
    elif src.data_files is not None:
        files = [f for p in src.data_files for f in _expand_local(p, f"data.blend[{index}].data_files")]
    else:
        files = []
    out["files"] = [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]
    return out


def dataset_cache_path(config: DataConfig, tokenizer) -> str:
    """The folder that holds (or will hold) this config's tokenised dataset:
    `cache_dir/<hash>`, the hash covering everything that changes the tokens
    (sources and their files, weights, max_length, template kwargs,
    num_sequences, seed, tokenizer). `cache_dir` itself is not part of it."""
    key = {"format": _CACHE_FORMAT, "blend": [_source_fingerprint(s, i) for i, s in enumerate(config.blend)],
           "max_length": config.max_length, "chat_template_kwargs": config.chat_template_kwargs,
           "num_sequences": config.num_sequences, "seed": config.seed,
           "tokenizer": _tokenizer_fingerprint(tokenizer)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    root = os.path.expanduser(config.cache_dir if config.cache_dir is not None else DEFAULT_CACHE_DIR)
    return os.path.join(root, digest)


def _cache_complete(path):
    return os.path.isfile(os.path.join(path, "meta.json"))


def prepare_dataset(config: DataConfig, tokenizer, *, show_progress: bool = True) -> str:
    """Tokenise and pack the blend into the on-disk cache unless it is there
    already; returns the cache folder. Run once before starting several
    processes; `build_dataset` then only reads."""
    path = dataset_cache_path(config, tokenizer)
    if _cache_complete(path):
        return path
    sources = [_Source(src, i) for i, src in enumerate(config.blend)]
    input_ids, lengths, meta = _pack(config, sources, tokenizer, show_progress)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Written beside the final folder and renamed into place: a reader sees a
    # whole cache or none, and of two processes racing, one rename wins.
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        np.save(os.path.join(tmp, "input_ids.npy"), input_ids)
        np.save(os.path.join(tmp, "lengths.npy"), lengths)
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        try:
            os.rename(tmp, path)
        except OSError:
            if not _cache_complete(path):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


class PackedDataset(torch.utils.data.Dataset):
    """The packed sequences of a cache folder, memory-mapped.

    Item i: {"input_ids": LongTensor [max_length], "attention_mask":
    LongTensor [max_length]} with attention_mask 1 on real tokens (EOS
    separators included) and 0 on the padding that ends the last sequence.
    `meta` holds the counts per source; `eos_token_id` and `pad_token_id`
    are the separator and the padding."""

    def __init__(self, path: str):
        self.path = path
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            self.meta = json.load(f)
        if self.meta.get("format") != _CACHE_FORMAT:
            raise ValueError(f"{path}: cache format {self.meta.get('format')!r}, expected {_CACHE_FORMAT}; "
                             f"delete the folder to rebuild it")
        self.max_length = self.meta["max_length"]
        self.eos_token_id, self.pad_token_id = self.meta["eos_token_id"], self.meta["pad_token_id"]
        self._open()

    def _open(self):
        self.input_ids = np.load(os.path.join(self.path, "input_ids.npy"), mmap_mode="r")
        self.lengths = np.load(os.path.join(self.path, "lengths.npy"))

    def __getstate__(self):  # workers reopen the memory map instead of copying it
        state = dict(self.__dict__)
        del state["input_ids"], state["lengths"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def __len__(self):
        return int(self.lengths.shape[0])

    def __getitem__(self, index):
        if not _is_int(index) and not isinstance(index, np.integer):
            raise TypeError(f"index: expected an integer, got {type(index).__name__}")
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} sequences")
        input_ids = torch.from_numpy(np.array(self.input_ids[index], dtype=np.int64))
        attention_mask = (torch.arange(self.max_length) < int(self.lengths[index])).long()
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def build_dataset(config: DataConfig, tokenizer, *, show_progress: bool = True) -> PackedDataset:
    """The packed training set of `config` (a torch Dataset); read from the
    cache when present, else built (and cached) first. Deterministic for a
    given config and tokenizer."""
    return PackedDataset(prepare_dataset(config, tokenizer, show_progress=show_progress))
