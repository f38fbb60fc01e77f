"""dms.training.data: blend parsing and validation, local JSONL/Parquet of
chat and text, the chat template and its kwargs, packing, blend proportions,
determinism, the token cache, the hub path offline and the named-dataset
converter on local files, and the shipped sample set.

Expected token streams come from an independent encoder: the tiny
tokenizer is byte-level (id = byte value) with specials 256..260, and its
chat template is Qwen3's layout, written out by hand below."""

import dataclasses
import json
import os
import pickle
import re
import runpy
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dms.tiny import tiny_tokenizer
from dms.training import data
from dms.training.data import (SAMPLE_DATA, DataConfig, DataSource, DatasetUnreachableError, build_dataset,
                               dataset_cache_path, prepare_dataset)

SPECIAL_IDS = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258, "<think>": 259, "</think>": 260}
EOS = 256
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_IDS) + ")")


def encode(text):
    """Reference byte-level encoding with the tiny tokenizer's special tokens."""
    ids = []
    for part in _SPECIAL_RE.split(text):
        ids += [SPECIAL_IDS[part]] if part in SPECIAL_IDS else list(part.encode("utf-8"))
    return ids


def render(messages, enable_thinking=None):
    """Qwen3's layout, as the tiny template writes it; a conversation that
    does not end with the assistant gets the generation prompt."""
    out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    if messages[-1]["role"] != "assistant":
        out += "<|im_start|>assistant\n"
        if enable_thinking is False:
            out += "<think>\n\n</think>\n\n"
    return out


def expected_doc(record, enable_thinking=None):
    if "messages" in record:
        return encode(render(record["messages"], enable_thinking))
    return encode(record["text"])


def chat_record(i):
    return {"messages": [{"role": "user", "content": f"What is {i} + {i}? (q{i})"},
                         {"role": "assistant", "content": f"<think>\n{i} + {i} = {2 * i}\n</think>\n\n{2 * i}"}]}


def text_record(i, tag="t"):
    return {"text": f"{tag}{i}: the number {i} written twice is {i}{i}. ünïcode ✓"}


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def write_parquet(path, records):
    pq.write_table(pa.Table.from_pylist(records), str(path))
    return str(path)


def stream_of(dataset):
    """The real tokens of a packed dataset, in order."""
    parts = []
    for i in range(len(dataset)):
        item = dataset[i]
        parts.append(item["input_ids"][item["attention_mask"].bool()].numpy())
    return np.concatenate(parts).tolist()


def split_docs(stream):
    """Documents of a stream (every one ends with EOS)."""
    assert stream[-1] == EOS
    docs, cur = [], []
    for t in stream:
        if t == EOS:
            docs.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    return docs


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def cfg(tmp_path):
    def make(**kw):
        kw.setdefault("cache_dir", str(tmp_path / "cache"))
        kw.setdefault("max_length", 64)
        return DataConfig(**kw)
    return make


# ---------------------------------------------------------------- parsing

def test_blend_string_and_mapping_forms():
    blend = DataConfig.from_dict({"blend": "OpenR1Math220k:1.0, sample:0.5,local:/x/y.jsonl:2,hub:org/ds,"
                                           "local:/z/data"}).blend
    assert blend == (DataSource("OpenR1Math220k", 1.0), DataSource("sample", 0.5),
                     DataSource("local", 2.0, path="/x/y.jsonl"), DataSource("hub", 1.0, hub_id="org/ds"),
                     DataSource("local", 1.0, path="/z/data"))
    blend = DataConfig.from_dict({"blend": [
        "sample", {"path": "/a.parquet", "weight": 3}, {"hub_id": "org/ds", "split": "test"},
        {"name": "OpenR1Math220k", "data_files": "/d/*.parquet", "max_documents": 10}]}).blend
    assert blend == (DataSource("sample"), DataSource("local", 3.0, path="/a.parquet"),
                     DataSource("hub", hub_id="org/ds", split="test"),
                     DataSource("OpenR1Math220k", data_files=("/d/*.parquet",), max_documents=10))
    config = DataConfig.from_dict({"blend": "sample:2,local:/q.jsonl", "max_length": 128, "seed": 3,
                                   "chat_template_kwargs": {"enable_thinking": False}, "num_sequences": 5})
    assert DataConfig.from_dict(config.to_dict()) == config
    assert DataConfig(blend="sample").max_length == 4096 and DataConfig(blend="sample").seed == 42


@pytest.mark.parametrize("d, key", [
    ({"blend": "sample", "max_lenght": 5}, "data.max_lenght"),
    ({"max_length": 5}, "data.blend"),
    ({"blend": "sample", "max_length": 1}, "data.max_length"),
    ({"blend": "sample", "max_length": True}, "data.max_length"),
    ({"blend": "sample", "max_length": "4096"}, "data.max_length"),
    ({"blend": "sample", "seed": -1}, "data.seed"),
    ({"blend": "sample", "num_sequences": 0}, "data.num_sequences"),
    ({"blend": "sample", "cache_dir": 3}, "data.cache_dir"),
    ({"blend": "sample", "chat_template_kwargs": ["enable_thinking"]}, "data.chat_template_kwargs"),
    ({"blend": "sample", "chat_template_kwargs": {"tokenize": True}}, "data.chat_template_kwargs.tokenize"),
    ({"blend": "sample", "chat_template_kwargs": {"x": object()}}, "data.chat_template_kwargs"),
    ({"blend": ""}, "data.blend"),
    ({"blend": 5}, "data.blend"),
    ({"blend": []}, "data.blend"),
    ({"blend": "sample,,sample"}, "data.blend"),
    ({"blend": "NoSuchSet:1.0"}, "data.blend[0].name"),
    ({"blend": "sample:1,foo:bar:1"}, "data.blend[1]"),
    ({"blend": "sample:0"}, "data.blend[0].weight"),
    ({"blend": "sample:-1"}, "data.blend[0].weight"),
    ({"blend": "sample:nan"}, "data.blend[0].weight"),
    ({"blend": "local:"}, "data.blend[0]"),
    ({"blend": ["sample", {"name": "sample", "wieght": 1}]}, "data.blend[1].wieght"),
    ({"blend": [{"weight": 1}]}, "data.blend[0]"),
    ({"blend": [{"name": "local"}]}, "data.blend[0].path"),
    ({"blend": [{"name": "sample", "split": "train"}]}, "data.blend[0].split"),
    ({"blend": [{"name": "OpenR1Math220k", "path": "/x"}]}, "data.blend[0].path"),
    ({"blend": [{"name": "OpenR1Math220k", "data_files": []}]}, "data.blend[0].data_files"),
    ({"blend": [{"name": "OpenR1Math220k", "max_documents": 0}]}, "data.blend[0].max_documents"),
    ({"blend": [{"name": "hub"}]}, "data.blend[0].hub_id"),
    ({"blend": [3]}, "data.blend[0]"),
])
def test_bad_config_names_the_key(d, key):
    with pytest.raises(ValueError) as err:
        DataConfig.from_dict(d)
    assert str(err.value).startswith(key + ":") or str(err.value).startswith(key + " "), str(err.value)


def test_from_dict_needs_a_mapping():
    with pytest.raises(ValueError, match=r"^data: expected a mapping"):
        DataConfig.from_dict(["sample"])


def test_bad_local_files_are_named(tmp_path, tok, cfg):
    with pytest.raises(ValueError, match=r"data\.blend\[0\]\.path: no such file"):
        build_dataset(cfg(blend=f"local:{tmp_path}/missing.jsonl"), tok, show_progress=False)
    bad = write_jsonl(tmp_path / "bad.jsonl", [text_record(0), {"prompt": "no text here"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl row 1.*'messages'.*'text'.*\['prompt'\]"):
        build_dataset(cfg(blend=f"local:{bad}"), tok, show_progress=False)
    bad = write_jsonl(tmp_path / "bad2.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(ValueError, match=r"bad2\.jsonl row 0: messages\[0\]"):
        build_dataset(cfg(blend=f"local:{bad}"), tok, show_progress=False)
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2 is not a JSON object"):
        build_dataset(cfg(blend=f"local:{tmp_path}/broken.jsonl"), tok, show_progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"holds no \.jsonl/\.json/\.parquet files"):
        build_dataset(cfg(blend=f"local:{empty}"), tok, show_progress=False)


def test_chat_needs_a_chat_template(tmp_path, tok, cfg):
    plain = tiny_tokenizer()
    plain.chat_template = None
    path = write_jsonl(tmp_path / "c.jsonl", [chat_record(1)])
    with pytest.raises(ValueError, match="no chat template"):
        build_dataset(cfg(blend=f"local:{path}"), plain, show_progress=False)


# ---------------------------------------------------------------- formats and packing

def test_jsonl_and_parquet_chat_and_text_pack_exactly(tmp_path, tok, cfg):
    records = [chat_record(i) if i % 3 else text_record(i) for i in range(40)]
    records.append({"text": "x" * 150})  # longer than two sequences
    jsonl = write_jsonl(tmp_path / "docs.jsonl", records)
    chats, texts = [r for r in records if "messages" in r], [r for r in records if "text" in r]
    (tmp_path / "pq").mkdir()
    parquet_chat = write_parquet(tmp_path / "pq" / "chat.parquet", chats)
    parquet_text = write_parquet(tmp_path / "pq" / "text.parquet", texts)
    # weights equal to the sizes keep every document exactly once
    two_sources = [{"path": parquet_chat, "weight": len(chats)}, {"path": parquet_text, "weight": len(texts)}]
    for blend in (f"local:{jsonl}", f"local:{tmp_path / 'pq'}", two_sources):
        config = cfg(blend=blend, max_length=64)
        ds = build_dataset(config, tok, show_progress=False)
        items = [ds[i] for i in range(len(ds))]
        assert all(it["input_ids"].shape == (64,) and it["attention_mask"].shape == (64,) for it in items)
        assert all(it["input_ids"].dtype == it["attention_mask"].dtype == torch.int64 for it in items)
        masks = np.stack([it["attention_mask"].numpy() for it in items])
        assert masks[:-1].all()  # only the last sequence is padded ...
        last = masks[-1]
        assert last[0] == 1 and (np.diff(last) <= 0).all()  # ... at its end
        assert (items[-1]["input_ids"].numpy()[last == 0] == ds.pad_token_id).all()
        stream = stream_of(ds)
        docs = split_docs(stream)
        expected = sorted(tuple(expected_doc(r)) for r in records)
        assert sorted(docs) == expected  # every document once, each exactly tokenised, EOS after each
        assert len(stream) == sum(len(d) + 1 for d in expected)
        assert len(ds) == -(-len(stream) // 64)
        assert ds.meta["num_tokens"] == len(stream)


def test_folder_and_glob_sources(tmp_path, tok, cfg):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [text_record(i, "a") for i in range(5)])
    write_parquet(folder / "b.parquet", [text_record(i, "b") for i in range(5)])
    (folder / "notes.txt").write_text("ignored")
    by_folder = build_dataset(cfg(blend=f"local:{folder}"), tok, show_progress=False)
    by_glob = build_dataset(cfg(blend=f"local:{folder}/*.[jp]*"), tok, show_progress=False)  # jsonl + parquet
    expected = sorted(tuple(expected_doc(text_record(i, t))) for t in "ab" for i in range(5))
    assert sorted(split_docs(stream_of(by_folder))) == expected
    assert stream_of(by_glob) == stream_of(by_folder)


def test_chat_template_kwargs_take_effect(tmp_path, tok, cfg):
    prompts = [{"messages": [{"role": "user", "content": f"Add {i} and {i + 1}."}]} for i in range(6)]
    full = [chat_record(i) for i in range(6)]
    path = write_jsonl(tmp_path / "p.jsonl", prompts + full)
    streams = {}
    for thinking in (True, False):
        ds = build_dataset(cfg(blend=f"local:{path}", chat_template_kwargs={"enable_thinking": thinking}), tok,
                           show_progress=False)
        streams[thinking] = stream_of(ds)
        expected = sorted(tuple(expected_doc(r, thinking)) for r in prompts + full)
        assert sorted(split_docs(streams[thinking])) == expected
    assert streams[True] != streams[False]
    assert encode("<think>\n\n</think>\n\n") == [259, 10, 10, 260, 10, 10]
    # the kwargs are part of the cache key
    a = dataset_cache_path(cfg(blend=f"local:{path}", chat_template_kwargs={"enable_thinking": True}), tok)
    b = dataset_cache_path(cfg(blend=f"local:{path}", chat_template_kwargs={"enable_thinking": False}), tok)
    assert a != b


# ---------------------------------------------------------------- blending

def classify(docs, a_docs, b_docs):
    a_set, b_set = {tuple(d) for d in a_docs}, {tuple(d) for d in b_docs}
    assert all(d in a_set or d in b_set for d in docs)
    return sum(d in a_set for d in docs), sum(d in b_set for d in docs)


def test_blend_proportions_exact_counts(tmp_path, tok, cfg):
    a = [text_record(i, "a") for i in range(60)]
    b = [text_record(i, "b") for i in range(30)]
    pa_, pb = write_jsonl(tmp_path / "a.jsonl", a), write_jsonl(tmp_path / "b.jsonl", b)
    a_docs, b_docs = [expected_doc(r) for r in a], [expected_doc(r) for r in b]
    # D = 90 documents; weights 1:3 give quotas 22.5 and 67.5 -> 23 and 67 (tie to the first)
    ds = build_dataset(cfg(blend=f"local:{pa_}:1,local:{pb}:3"), tok, show_progress=False)
    docs = split_docs(stream_of(ds))
    assert classify(docs, a_docs, b_docs) == (23, 67)
    b_counts = [docs.count(tuple(d)) for d in b_docs]
    assert sorted(b_counts) == [2] * 23 + [3] * 7  # 67 = 2 * 30 + 7: everyone twice, a random 7 thrice
    assert len({tuple(d) for d in docs if tuple(d) in {tuple(x) for x in a_docs}}) == 23  # a subset, no repeats
    assert [s["blend_documents"] for s in ds.meta["sources"]] == [23, 67]
    # 0.25 : 1 given in any units means the same
    same = build_dataset(cfg(blend=f"local:{pa_}:0.25,local:{pb}:0.75"), tok, show_progress=False)
    assert stream_of(same) == stream_of(ds)


def test_blend_proportions_with_a_cap(tmp_path, tok, cfg):
    a = [text_record(i, "a") for i in range(200)]
    b = [text_record(i, "b") for i in range(200)]
    pa_, pb = write_jsonl(tmp_path / "a.jsonl", a), write_jsonl(tmp_path / "b.jsonl", b)
    full = build_dataset(cfg(blend=f"local:{pa_}:3,local:{pb}:1"), tok, show_progress=False)
    capped = build_dataset(cfg(blend=f"local:{pa_}:3,local:{pb}:1", num_sequences=60), tok, show_progress=False)
    assert len(capped) == 60 and all(capped[i]["attention_mask"].all() for i in range(60))
    # a capped dataset is the prefix of the uncapped one
    assert all((capped[i]["input_ids"] == full[i]["input_ids"]).all() for i in range(60))
    stream = stream_of(capped)
    last_eos = len(stream) - 1 - stream[::-1].index(EOS)
    docs = split_docs(stream[:last_eos + 1])  # the whole documents of the capped stream
    n_a, n_b = classify(docs, [expected_doc(r) for r in a], [expected_doc(r) for r in b])
    n = n_a + n_b
    assert n > 50
    assert abs(n_a / n - 0.75) < 3 * np.sqrt(0.75 * 0.25 / n)


def test_max_documents_takes_the_first(tmp_path, tok, cfg):
    a = [text_record(i, "a") for i in range(20)]
    path = write_jsonl(tmp_path / "a.jsonl", a)
    ds = build_dataset(cfg(blend=[{"path": path, "max_documents": 5}]), tok, show_progress=False)
    assert sorted(split_docs(stream_of(ds))) == sorted(tuple(expected_doc(r)) for r in a[:5])


# ---------------------------------------------------------------- determinism and cache

def test_determinism_and_seed(tmp_path, tok):
    records = [text_record(i) for i in range(50)] + [chat_record(i) for i in range(50)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    one = build_dataset(DataConfig(blend=f"local:{path}", max_length=64, cache_dir=str(tmp_path / "c1")), tok,
                        show_progress=False)
    two = build_dataset(DataConfig(blend=f"local:{path}", max_length=64, cache_dir=str(tmp_path / "c2")),
                        tiny_tokenizer(), show_progress=False)
    assert os.path.basename(one.path) == os.path.basename(two.path)  # the key ignores cache_dir and instances
    assert np.array_equal(np.asarray(one.input_ids), np.asarray(two.input_ids))
    other = build_dataset(DataConfig(blend=f"local:{path}", max_length=64, seed=7, cache_dir=str(tmp_path / "c1")),
                          tok, show_progress=False)
    assert stream_of(other) != stream_of(one)
    assert sorted(split_docs(stream_of(other))) == sorted(split_docs(stream_of(one)))


def test_cache_written_once_and_reused(tmp_path, tok, cfg, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [text_record(i) for i in range(30)])
    calls = []
    real = data._tokenize
    monkeypatch.setattr(data, "_tokenize", lambda texts, t: calls.append(len(list(texts))) or real(texts, t))
    config = cfg(blend=f"local:{path}")
    cache = prepare_dataset(config, tok, show_progress=False)
    assert sum(calls) == 30 and cache == dataset_cache_path(config, tok)
    assert sorted(os.listdir(cache)) == ["input_ids.npy", "lengths.npy", "meta.json"]
    assert os.listdir(os.path.dirname(cache)) == [os.path.basename(cache)]  # no temporary left behind
    stamp = os.stat(os.path.join(cache, "input_ids.npy")).st_mtime_ns
    calls.clear()
    ds = build_dataset(config, tok, show_progress=False)
    assert calls == [] and ds.path == cache
    assert os.stat(os.path.join(cache, "input_ids.npy")).st_mtime_ns == stamp
    # an edited file is a new dataset
    time.sleep(0.01)
    write_jsonl(tmp_path / "d.jsonl", [text_record(i) for i in range(31)])
    assert dataset_cache_path(config, tok) != cache
    # a tokenizer with another template is a new dataset
    other = tiny_tokenizer()
    other.chat_template = other.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert dataset_cache_path(config, other) != dataset_cache_path(config, tok)


def test_cache_key_ignores_padding_state(tmp_path, tok):
    """A tokenizer once called with padding/truncation keeps that state in its
    backend; neither the cache key nor the tokens may depend on it."""
    path = write_jsonl(tmp_path / "d.jsonl", [text_record(i) for i in range(30)])
    used = tiny_tokenizer()
    used(["a", "bbb"], padding=True, truncation=True, max_length=2)
    config = DataConfig(blend=f"local:{path}", max_length=64, cache_dir=str(tmp_path / "c1"))
    assert dataset_cache_path(config, used) == dataset_cache_path(config, tok)
    fresh = build_dataset(config, tok, show_progress=False)
    again = build_dataset(dataclasses.replace(config, cache_dir=str(tmp_path / "c2")), used, show_progress=False)
    assert stream_of(again) == stream_of(fresh)


def test_num_sequences_tokenises_only_what_it_needs(tmp_path, tok, cfg, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [text_record(i) for i in range(2000)])
    calls = []
    real = data._tokenize
    monkeypatch.setattr(data, "_tokenize", lambda texts, t: calls.append(len(list(texts))) or real(texts, t))
    with pytest.warns(UserWarning, match="num_sequences"):
        small = build_dataset(cfg(blend=f"local:{path}", num_sequences=10 ** 6), tok, show_progress=False)
    assert sum(calls) == 2000 and len(small) == -(-small.meta["num_tokens"] // 64)
    calls.clear()
    ds = build_dataset(cfg(blend=f"local:{path}", num_sequences=3), tok, show_progress=False)
    assert len(ds) == 3 and sum(calls) <= data._TOKENIZE_BATCH


def test_dataset_pickles_for_workers(tmp_path, tok, cfg):
    path = write_jsonl(tmp_path / "d.jsonl", [text_record(i) for i in range(20)])
    ds = build_dataset(cfg(blend=f"local:{path}"), tok, show_progress=False)
    copy = pickle.loads(pickle.dumps(ds))
    assert len(copy) == len(ds) and all((copy[i]["input_ids"] == ds[i]["input_ids"]).all() for i in range(len(ds)))
    assert (ds[-1]["input_ids"] == ds[len(ds) - 1]["input_ids"]).all()
    with pytest.raises(IndexError):
        ds[len(ds)]


# ---------------------------------------------------------------- hub and named datasets

def test_unreachable_hub_dataset_says_how_to_use_local_files(tmp_path, tok, cfg, monkeypatch):
    import datasets.config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))  # nothing cached
    before = datasets.config.HF_HUB_OFFLINE
    for blend, name in (("OpenR1Math220k:1.0", "open-r1/OpenR1-Math-220k"), ("hub:org/absent-set", "org/absent-set")):
        start = time.monotonic()
        with pytest.raises(DatasetUnreachableError) as err:
            build_dataset(cfg(blend=blend, cache_dir=str(tmp_path / "c")), tok, show_progress=False)
        assert time.monotonic() - start < 20
        message = str(err.value)
        assert f"could not reach dataset '{name}'" in message and "offline" in message
        assert 'blend: "local:/path/to/file.jsonl:1.0"' in message and "data_files" in message
        assert isinstance(err.value, ConnectionError)
    assert datasets.config.HF_HUB_OFFLINE == before  # the library's own setting is restored


def openr1_row(i, with_messages=True):
    problem = f"Find x if x - {i} = {i}."
    good = f"<think>\nx = {i} + {i} = {2 * i}\n</think>\n\nx = \\boxed{{{2 * i}}}"
    bad = f"<think>\nguess\n</think>\n\nx = {i}"
    row = {"problem": problem, "solution": f"x = {2 * i}", "answer": str(2 * i), "problem_type": "Algebra",
           "question_type": "math-word-problem", "source": "synthetic", "uuid": f"id-{i}",
           "is_reasoning_complete": [True, True], "generations": [bad, good],
           "correctness_math_verify": [False, True], "correctness_llama": None, "finish_reasons": None,
           "correctness_count": 1}
    if with_messages:
        row["messages"] = [{"role": "user", "content": problem}, {"role": "assistant", "content": good}]
    return row


def test_named_dataset_converter_on_local_files(tmp_path, tok, cfg):
    with_messages = write_parquet(tmp_path / "train-00000-of-00002.parquet", [openr1_row(i) for i in range(12)])
    config = cfg(blend=[{"name": "OpenR1Math220k", "data_files": with_messages}])
    docs = split_docs(stream_of(build_dataset(config, tok, show_progress=False)))
    expected = sorted(tuple(encode(render(openr1_row(i)["messages"]))) for i in range(12))
    assert sorted(docs) == expected
    # rows without `messages`: the problem and its first verified generation
    bare = write_parquet(tmp_path / "bare.parquet", [openr1_row(i, with_messages=False) for i in range(12, 20)])
    config = cfg(blend=[{"name": "OpenR1Math220k", "data_files": [bare], "weight": 1.0}])
    docs = split_docs(stream_of(build_dataset(config, tok, show_progress=False)))
    assert sorted(docs) == sorted(tuple(encode(render(openr1_row(i)["messages"]))) for i in range(12, 20))
    # and a row it cannot convert is named
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"problem": "p"}])
    with pytest.raises(ValueError, match=r"OpenR1-Math-220k row needs"):
        build_dataset(cfg(blend=[{"name": "OpenR1Math220k", "data_files": broken}]), tok, show_progress=False)


def test_named_dataset_through_load_dataset(tmp_path, tok, cfg, monkeypatch):
    """The hub path with `datasets.load_dataset` answering from memory: the
    registry's id, subset and split are asked for, only the columns the
    converter needs are kept, rows become the same documents."""
    import datasets

    asked = []

    def fake_load_dataset(path, name=None, split=None, revision=None, **kw):
        asked.append((path, name, split, revision))
        return datasets.Dataset.from_list([openr1_row(i) for i in range(9)])

    selected = []
    real_select = datasets.Dataset.select_columns
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(datasets.Dataset, "select_columns",
                        lambda self, cols, **kw: selected.append(list(cols)) or real_select(self, cols, **kw))
    ds = build_dataset(cfg(blend="OpenR1Math220k:1.0"), tok, show_progress=False)
    assert asked == [("open-r1/OpenR1-Math-220k", "default", "train", None)] and selected == [["messages"]]
    assert sorted(split_docs(stream_of(ds))) == sorted(tuple(encode(render(openr1_row(i)["messages"])))
                                                       for i in range(9))
    asked.clear()
    build_dataset(cfg(blend=[{"name": "OpenR1Math220k", "subset": "extended", "revision": "abc"}]), tok,
                  show_progress=False)
    assert asked == [("open-r1/OpenR1-Math-220k", "extended", "train", "abc")]


def test_unreachable_hub_without_offline_mode(tok, cfg, monkeypatch):
    import datasets

    def no_network(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/set' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", no_network)
    with pytest.raises(DatasetUnreachableError, match=r"could not reach dataset 'org/set'.*LocalEntryNotFoundError"
                                                      r".*local:/path/to/file\.jsonl:1\.0.*hub_id: org/set"):
        build_dataset(cfg(blend="hub:org/set:1"), tok, show_progress=False)


# ---------------------------------------------------------------- the shipped sample

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b,
       "/": lambda a, b: a // b if a % b == 0 else float("nan")}


def test_sample_data_is_reproducible_and_correct(tok, cfg):
    with open(SAMPLE_DATA, encoding="utf-8") as f:
        text = f.read()
    generated = runpy.run_path(os.path.join(os.path.dirname(SAMPLE_DATA), "generate.py"))["records"]()
    assert text == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in generated)
    records = [json.loads(line) for line in text.splitlines()]
    assert len(records) >= 300
    assert sum("messages" in r for r in records) >= 200 and sum("text" in r for r in records) >= 50
    checked = 0
    for r in records:
        body = " ".join(m["content"] for m in r["messages"]) if "messages" in r else r["text"]
        for lhs, rhs in re.findall(r"(\d+(?: [-+x/] \d+)+) = (\d+)", body):
            tokens = lhs.split()
            value = int(tokens[0])
            for op, num in zip(tokens[1::2], tokens[2::2]):
                value = OPS[op](value, int(num))
            assert value == int(rhs), (lhs, rhs)
            checked += 1
        for x, y, s in re.findall(r"(\d+) \+ (\d+) plus carry 1 = (\d+)", body):
            assert int(x) + int(y) + 1 == int(s)
        for n, k, p in re.findall(r"(\d+) times (\d+) is (\d+)", body):
            assert int(n) * int(k) == int(p)
    assert checked > 300
    ds = build_dataset(cfg(blend="sample", max_length=256), tok, show_progress=False)
    assert sorted(split_docs(stream_of(ds))) == sorted(tuple(expected_doc(r)) for r in records)
