"""Training data in four formats (text, JSONL, Parquet, `datasets` folders) through the token cache: the same
documents give the same tokens; shards, held-out split and sampler resume hold for each; the cache is reused
and written atomically; bad rows are counted or refused; byte-level text keeps its raw bytes and fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from node.config import NodeConfig
from node.train import data
from node.train.data import DataError, ShardSampler, heldout_batches, load_corpus, load_run_corpus
from node.train.tokenizer import load_tokenizer, train_bpe, write_atomically

BLOCK = 512  # tokens per block in these tests (the real 16384 would need megabytes of text)
FORMATS = ("text", "jsonl", "parquet", "datasets")
WORDS = ("gossip", "round", "peer", "average", "momentum", "shard", "token", "über", "naïve", "节点", "a", "the", "of",
         "slow", "weights", "outer", "step", "replay", "vote", "commitment")


def make_documents(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    documents = []
    for _ in range(count):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(rng.randint(1, 8))]
        documents.append("\n".join(lines) + ".")
    return documents


def write_format(kind: str, folder: Path, rows: dict[str, list]) -> Path:
    """Write `rows` (column -> values) in format `kind` under `folder`; the path to pass as --data."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = rows["text"]
    if kind == "text":
        for index, text in enumerate(texts):
            (folder / f"doc-{index:04d}.txt").write_text(text, encoding="utf-8")
        return folder
    if kind == "jsonl":
        path = folder / "rows.jsonl"
        with open(path, "w", encoding="utf-8") as file:
            for index in range(len(texts)):
                file.write(json.dumps({name: values[index] for name, values in rows.items()}) + "\n")
        return path
    if kind == "parquet":
        path = folder / "rows.parquet"
        pq.write_table(pa.table(rows), path, row_group_size=50)  # several row groups: read batch by batch
        return path
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset.from_dict(rows).save_to_disk(str(folder / "ds"), num_shards=3)
    return folder / "ds"


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "BLOCK_TOKENS", BLOCK)


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return make_documents(400)


@pytest.fixture(scope="module")
def tokenizer_path(documents: list[str], tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_atomically(tmp_path_factory.mktemp("tok") / "tokenizer.json", train_bpe(documents, 320)))


@pytest.fixture(scope="module")
def sources(documents: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("formats")
    rows = {"text": documents, "id": list(range(len(documents)))}
    return {kind: str(write_format(kind, root / kind, rows)) for kind in FORMATS}


def test_every_format_gives_the_same_tokens_joined_by_end_of_document(sources, documents, tokenizer_path, tmp_path):
    tokenizer = load_tokenizer(tokenizer_path)
    corpora = {kind: load_corpus([path], tokenizer=tokenizer_path, cache_dir=tmp_path) for kind, path in sources.items()}
    reference = corpora["jsonl"]
    for kind, corpus in corpora.items():
        assert isinstance(corpus.data, np.memmap), kind  # mapped from the cache file, not read into memory
        assert corpus.data.dtype == np.uint16 and corpus.vocab_size == tokenizer.vocab_size
        assert corpus.tokenizer == tokenizer.fingerprint
        assert np.array_equal(corpus.data, reference.data), kind
    assert len({corpus.fingerprint for corpus in corpora.values()}) == len(FORMATS)  # the format is part of it
    ids = np.asarray(reference.data)
    ends = np.flatnonzero(ids == tokenizer.separator[0])
    assert len(ends) == len(documents) and ends[-1] == len(ids) - 1  # one end-of-document after each
    assert tokenizer.decode(ids[: ends[0]]) == documents[0]
    assert tokenizer.decode(ids[ends[-2] + 1: ends[-1]]) == documents[-1]


@pytest.mark.parametrize("kind", FORMATS)
def test_shards_are_deterministic_and_disjoint_and_apart_from_heldout(kind, sources, tokenizer_path, tmp_path):
    first = load_corpus([sources[kind]], tokenizer=tokenizer_path, cache_dir=tmp_path)
    again = load_corpus([sources[kind]], tokenizer=tokenizer_path, cache_dir=tmp_path)
    assert first.num_blocks >= 3 * data.HELDOUT_EVERY
    shards = [set(first.train_blocks(i, 3)) for i in range(3)]
    assert shards == [set(again.train_blocks(i, 3)) for i in range(3)]
    assert all(not (shards[i] & shards[j]) for i in range(3) for j in range(i + 1, 3))
    heldout = set(first.heldout_blocks())
    assert heldout and not (set().union(*shards) & heldout)
    assert len(set().union(*shards)) + len(heldout) == first.num_blocks


@pytest.mark.parametrize("kind", FORMATS)
def test_sampler_resumes_exactly_from_its_checkpointed_state(kind, sources, tokenizer_path, tmp_path):
    corpus = load_corpus([sources[kind]], tokenizer=tokenizer_path, cache_dir=tmp_path)
    sampler = ShardSampler(corpus, 1, 3, 32, 4, seed=7)
    for _ in range(3):
        sampler.next_batch()
    state = json.loads(json.dumps(sampler.state_dict()))  # as a checkpoint header stores it
    expected = [sampler.next_batch() for _ in range(4)]
    restarted = load_corpus([sources[kind]], tokenizer=tokenizer_path, cache_dir=tmp_path)  # from the cache
    resumed = ShardSampler(restarted, 1, 3, 32, 4, seed=0)
    resumed.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, (resumed.next_batch() for _ in range(4))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert int(x1.max()) < corpus.vocab_size and torch.equal(x1[:, 1:], y1[:, :-1])
    a, b = heldout_batches(corpus, 32, 4, 2), heldout_batches(restarted, 32, 4, 2)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))


def test_cache_is_reused_and_written_atomically(sources, tokenizer_path, tmp_path, monkeypatch):
    path = sources["jsonl"]
    built = load_corpus([path], tokenizer=tokenizer_path, cache_dir=tmp_path / "cache")
    key = next((tmp_path / "cache").glob("*.bin")).stem
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"{key}.bin", f"{key}.json"]
    meta = json.loads((tmp_path / "cache" / f"{key}.json").read_text())
    assert meta["sha256"] == hashlib.sha256((tmp_path / "cache" / f"{key}.bin").read_bytes()).hexdigest()
    assert built.fingerprint == hashlib.sha256(f"{key}:{meta['sha256']}".encode()).hexdigest()  # inputs and output
    real_tokenize = data._tokenize_into

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(data, "_tokenize_into", must_not_run)
    assert np.array_equal(load_corpus([path], tokenizer=tokenizer_path, cache_dir=tmp_path / "cache").data, built.data)

    def crash_midway(file, *args, **kwargs):
        file.write(b"\x01\x00" * 1000)
        raise RuntimeError("killed while tokenizing")

    monkeypatch.setattr(data, "_tokenize_into", crash_midway)
    with pytest.raises(RuntimeError, match="killed"):
        load_corpus([path], tokenizer=tokenizer_path, cache_dir=tmp_path / "crash")
    assert list((tmp_path / "crash").iterdir()) == []  # no half-written cache, no temporary

    monkeypatch.setattr(data, "_tokenize_into", real_tokenize)
    stale = tmp_path / "crash" / f"{key}.bin.tmp-999999999-dead"  # a writer killed with -9 left this
    stale.write_bytes(b"junk")
    os.utime(stale, (time.time() - 120, time.time() - 120))
    growing = tmp_path / "crash" / f"{key}.json.tmp-999999998-live"  # recent: maybe a writer in another container
    growing.write_bytes(b"{")
    assert np.array_equal(load_corpus([path], tokenizer=tokenizer_path, cache_dir=tmp_path / "crash").data, built.data)
    assert not stale.exists() and growing.exists()

    cached = tmp_path / "crash" / f"{key}.bin"
    with open(cached, "r+b") as file:  # damaged: shorter than its metadata says
        file.truncate(cached.stat().st_size // 2)
    assert np.array_equal(load_corpus([path], tokenizer=tokenizer_path, cache_dir=tmp_path / "crash").data, built.data)


def test_bad_jsonl_rows_are_skipped_and_counted(documents, tokenizer_path, tmp_path):
    bad = ["not json", "[1, 2]", '{"body": "x"}', '{"text": 5}', '{"text": null}', '\xff{"text": "x"}']
    lines = [json.dumps({"text": text}) for text in documents]
    for index, line in enumerate(bad):
        lines.insert(index * 50, line)
    path = tmp_path / "mixed.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8").replace("\xff".encode(), b"\xff") + b"\n\n")
    corpus = load_corpus([str(path)], tokenizer=tokenizer_path, cache_dir=tmp_path / "cache")
    assert corpus.skipped_rows == len(bad)
    assert load_corpus([str(path)], tokenizer=tokenizer_path, cache_dir=tmp_path / "cache").skipped_rows == len(bad)
    path.write_text("\n".join(bad[:5]) + "\n")
    with pytest.raises(DataError, match=r"no usable text .*rows without 'text'"):
        load_corpus([str(path)], tokenizer=tokenizer_path, cache_dir=tmp_path / "cache")


def test_columnar_data_without_a_text_column_is_refused(documents, tokenizer_path, tmp_path):
    cache = tmp_path / "cache"
    pq.write_table(pa.table({"body": documents}), tmp_path / "body.parquet")
    with pytest.raises(DataError, match="has no column 'text' .*--text-field"):
        load_corpus([str(tmp_path / "body.parquet")], tokenizer=tokenizer_path, cache_dir=cache)
    body = load_corpus([str(tmp_path / "body.parquet")], tokenizer=tokenizer_path, text_field="body", cache_dir=cache)
    assert body.skipped_rows == 0 and body.num_blocks > data.HELDOUT_EVERY
    pq.write_table(pa.table({"text": list(range(10))}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match="holds int64, not text"):
        load_corpus([str(tmp_path / "ints.parquet")], tokenizer=tokenizer_path, cache_dir=cache)
    pq.write_table(pa.table({"text": [*documents, None, None]}), tmp_path / "nulls.parquet")
    assert load_corpus([str(tmp_path / "nulls.parquet")], tokenizer=tokenizer_path, cache_dir=cache).skipped_rows == 2
    (tmp_path / "junk.parquet").write_bytes(os.urandom(2000))
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_corpus([str(tmp_path / "junk.parquet")], tokenizer=tokenizer_path, cache_dir=cache)
    few = write_format("jsonl", tmp_path / "few", {"text": documents[:5]})
    with pytest.raises(DataError, match="need at least"):
        load_corpus([str(few)], tokenizer=tokenizer_path, cache_dir=cache)
    assert not list(cache.glob("*.tmp-*"))


def test_dataset_dict_folders_train_on_their_train_split(documents, tokenizer_path, tmp_path):
    import datasets

    datasets.disable_progress_bars()
    train = datasets.Dataset.from_dict({"text": documents})
    datasets.DatasetDict({"train": train, "test": train.select(range(5))}).save_to_disk(str(tmp_path / "dd"))
    whole = load_corpus([str(tmp_path / "dd")], tokenizer=tokenizer_path, cache_dir=tmp_path / "cache")
    split = load_corpus([str(tmp_path / "dd" / "train")], tokenizer=tokenizer_path, cache_dir=tmp_path / "cache")
    assert np.array_equal(whole.data, split.data)
    datasets.DatasetDict({"validation": train}).save_to_disk(str(tmp_path / "novalid"))
    with pytest.raises(DataError, match="no train split: pass the folder of the split"):
        load_corpus([str(tmp_path / "novalid")], tokenizer=tokenizer_path, cache_dir=tmp_path / "cache")
    # a folder holding a `datasets` folder and notes: the shards count once, the metadata JSON is not text
    train.save_to_disk(str(tmp_path / "outer" / "ds"))
    (tmp_path / "outer" / "notes.txt").write_text("notes")
    found = data._collect([str(tmp_path / "outer")])
    assert [(s.path.parent.name, s.format) for s in found] == [("ds", "arrow"), ("outer", "text")]


def test_byte_level_text_keeps_raw_bytes_and_fingerprint(documents, tmp_path, monkeypatch):
    folder = tmp_path / "texts"
    folder.mkdir()
    blobs = [("\n".join(documents[i::3]) + "\n").encode() for i in range(3)]
    for index, blob in enumerate(blobs):
        (folder / f"part{index}.txt").write_bytes(blob)
    expected = b"".join(blobs)
    small = load_corpus([str(folder)], cache_dir=tmp_path / "cache")
    assert small.fingerprint == hashlib.sha256(expected).hexdigest()
    assert small.data.tobytes() == expected and not isinstance(small.data, np.memmap)  # in memory, as always
    assert (small.vocab_size, small.tokenizer) == (256, "bytes")
    assert not (tmp_path / "cache").exists()
    monkeypatch.setattr(data, "MAX_BUILTIN_BYTES", 1000)  # "large" user data: mapped, never read whole
    large = load_corpus([str(folder)], cache_dir=tmp_path / "cache")
    assert isinstance(large.data, np.memmap) and large.fingerprint == small.fingerprint
    assert np.array_equal(large.data, small.data)
    one = load_corpus([str(folder / "part0.txt")], cache_dir=tmp_path / "cache")
    assert isinstance(one.data, np.memmap) and Path(one.data.filename) == (folder / "part0.txt").resolve()
    assert one.fingerprint == hashlib.sha256(blobs[0]).hexdigest()


def test_structured_data_without_a_tokenizer_is_bytes_joined_by_blank_lines(sources, documents, tmp_path):
    corpus = load_corpus([sources["parquet"]], cache_dir=tmp_path)
    assert (corpus.vocab_size, corpus.data.dtype, corpus.tokenizer) == (256, np.uint8, "bytes")
    assert isinstance(corpus.data, np.memmap)
    assert corpus.data.tobytes() == "".join(text + "\n\n" for text in documents).encode()


def test_fingerprint_covers_text_field_and_tokenizer(documents, tokenizer_path, tmp_path, monkeypatch):
    path = write_format("jsonl", tmp_path / "two", {"text": documents, "copy": documents})
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "env-cache"))  # what a node uses (no cache_dir argument)
    by_text = load_run_corpus(NodeConfig(data=[str(path)], tokenizer=tokenizer_path))
    by_copy = load_run_corpus(NodeConfig(data=[str(path)], tokenizer=tokenizer_path, text_field="copy"))
    as_bytes = load_run_corpus(NodeConfig(data=[str(path)]))
    assert np.array_equal(by_text.data, by_copy.data)
    assert len({by_text.fingerprint, by_copy.fingerprint, as_bytes.fingerprint}) == 3
    assert {p.suffix for p in (tmp_path / "env-cache").iterdir()} == {".bin", ".json"}
    manifest = NodeConfig().manifest(by_text.fingerprint, 1, by_text.vocab_size, by_text.tokenizer)
    assert manifest["tokenizer"] == load_tokenizer(tokenizer_path).fingerprint


def test_long_documents_are_streamed_in_pieces_cut_at_line_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SEGMENT_CHARS", 64)
    text = "".join(f"line {i}: naïve 节点 ☃\n" for i in range(40)) + "x" * 150  # multi-byte characters across reads
    (tmp_path / "long.txt").write_text(text, encoding="utf-8")
    counts = data.RowCount()
    pieces = list(data.iter_documents([data.Source(tmp_path / "long.txt", "text")], "text", counts))
    assert "".join(piece for piece, _ in pieces) == text and counts.documents == 1
    assert [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True]
    assert all(len(piece) <= 64 for piece, _ in pieces)
    assert all(piece.endswith("\n") for piece, _ in pieces[:-4])  # only the 150 x's have no line end to cut at
    row = list(data._segments(text))
    assert "".join(piece for piece, _ in row) == text and all(len(piece) <= 64 for piece, _ in row)
