"""Tokenizers: byte-level default, `tokenizers` JSON files (fingerprint, end-of-document), deterministic BPE training."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from node.cli.main import main as cli_main
from node.config import ConfigError, NodeConfig
from node.train.data import DataError
from node.train.tokenizer import EOS_TOKEN, ByteTokenizer, TokenizerError, load_tokenizer, train_bpe, write_atomically

REPO_ROOT = Path(__file__).resolve().parents[2]
WORDS = ("gossip", "round", "peer", "average", "momentum", "shard", "token", "über", "naïve", "节点", "a", "the", "of")


def write_jsonl(path: Path, count: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as file:
        for _ in range(count):
            file.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))), "id": 1}) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    texts = (json.loads(line)["text"] for line in open(write_jsonl(folder / "c.jsonl", 2000), encoding="utf-8"))
    return write_atomically(folder / "tokenizer.json", train_bpe(texts, 320))


def test_training_is_byte_identical_across_processes(tmp_path):
    data = write_jsonl(tmp_path / "corpus.jsonl", 1500, seed=3)
    runs = []
    for index, hash_seed in enumerate(("1", "2")):  # other str hashes: dict/set order may not leak into the file
        out = tmp_path / f"tok{index}.json"
        command = [sys.executable, "-m", "node.cli.main", "tokenizer", "train", "--data", str(data), "--vocab", "300",
                   "--out", str(out)]
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "RAYON_NUM_THREADS": str(index + 1)}
        runs.append((out, subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True)))
    for out, process in runs:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        assert f"wrote {out}: 300 tokens, fingerprint " in stdout
    first, second = (out.read_bytes() for out, _ in runs)
    assert first == second
    assert load_tokenizer(runs[0][0]).fingerprint == load_tokenizer(runs[1][0]).fingerprint


def test_trained_tokenizer_loads_with_its_vocab_and_end_of_document(tokenizer_file):
    tokenizer = load_tokenizer(str(tokenizer_file))
    assert 257 < tokenizer.vocab_size <= 320  # 256 bytes + EOS + merges (a small corpus may run out of pairs)
    assert tokenizer.separator == (0,)  # EOS_TOKEN is the first special token
    assert tokenizer.backend.token_to_id(EOS_TOKEN) == 0
    text = "gossip über peers, 节点 — and bytes it never saw: \x7f ☃"
    ids = tokenizer.encode_batch([text, ""])
    assert len(ids[0]) < len(text.encode()) and len(ids[1]) == 0  # merges shorten known words
    assert ids[0].max() < tokenizer.vocab_size
    assert tokenizer.decode(ids[0]) == text  # byte-level: every string round-trips


def test_byte_tokenizer_is_the_default():
    assert load_tokenizer("") == load_tokenizer(None) == ByteTokenizer()
    tokenizer = ByteTokenizer()
    assert (tokenizer.fingerprint, tokenizer.vocab_size) == ("bytes", 256)
    assert list(tokenizer.encode_batch(["hé"])[0]) == [104, 195, 169]


def test_fingerprint_ignores_formatting_but_not_content(tokenizer_file, tmp_path):
    original = load_tokenizer(tokenizer_file)
    parsed = json.loads(tokenizer_file.read_text())
    compact = tmp_path / "compact.json"
    compact.write_text(json.dumps(parsed, separators=(",", ":")))
    assert load_tokenizer(compact).fingerprint == original.fingerprint
    parsed["model"]["merges"] = parsed["model"]["merges"][:-1]  # one merge fewer: another tokenizer
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(parsed))
    assert load_tokenizer(changed).fingerprint != original.fingerprint
    assert len(original.fingerprint) == 64


def test_bad_tokenizer_files_raise_a_typed_error(tmp_path):
    cases = {
        "missing.json": (None, "does not exist"),
        "not-json.json": ("{ nope", "is not JSON"),
        "list.json": ("[1, 2]", "not a `tokenizers` tokenizer.json"),
        "broken.json": (json.dumps({"model": {"type": "BPE", "vocab": 5}}), "cannot be loaded by `tokenizers`"),
    }
    for name, (content, message) in cases.items():
        if content is not None:
            (tmp_path / name).write_text(content)
        with pytest.raises(TokenizerError, match=message):
            load_tokenizer(tmp_path / name)
    assert issubclass(TokenizerError, DataError)  # the daemon turns it into a clean start-up error


def test_training_refuses_bad_arguments_and_data(tmp_path, capsys):
    with pytest.raises(TokenizerError, match="vocab must be"):
        train_bpe(["text"], 100)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "no text field here"}\n' * 3)
    code = cli_main(["tokenizer", "train", "--data", str(rows), "--vocab", "300", "--out", str(tmp_path / "t.json")])
    assert code == 2
    assert "no usable text" in capsys.readouterr().err and not (tmp_path / "t.json").exists()
    code = cli_main(["tokenizer", "train", "--data", str(rows), "--vocab", "300", "--out", str(tmp_path / "t.json"),
                     "--text-field", "body"])
    assert code == 0 and load_tokenizer(tmp_path / "t.json").vocab_size <= 300


def test_cli_info_prints_the_fingerprint(tokenizer_file, capsys):
    assert cli_main(["tokenizer", "info", str(tokenizer_file)]) == 0
    assert load_tokenizer(tokenizer_file).fingerprint in capsys.readouterr().out
    assert cli_main(["tokenizer", "info", str(tokenizer_file.parent / "nope.json")]) == 2


def test_config_validates_tokenizer_and_text_field_and_manifest_names_the_tokenizer(tokenizer_file, tmp_path):
    with pytest.raises(ConfigError, match="tokenizer file .* does not exist"):
        NodeConfig(tokenizer=str(tmp_path / "missing.json")).validate()
    with pytest.raises(ConfigError, match="text_field"):
        NodeConfig(text_field=" ").validate()
    NodeConfig(tokenizer=str(tokenizer_file), text_field="body").validate()
    plain = NodeConfig().manifest("d", 1)
    assert "tokenizer" not in plain  # byte-level runs keep the manifest (and checkpoints) they had
    assert NodeConfig().manifest("d", 1, 256, "bytes") == plain
    assert NodeConfig().manifest("d", 1, 320, "f" * 64)["tokenizer"] == "f" * 64
