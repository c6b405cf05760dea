"""node.train.checkpoint: bit-exact round trips, numbering/pruning, damage detection, crash safety."""

from __future__ import annotations

import logging
import os
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import node.train.checkpoint as ckpt_mod
from node.train.checkpoint import (
    CHECKPOINT_SUFFIX,
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    save_checkpoint,
    verify_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]
DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool,
]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-exact: dtype, shape, and every byte (so NaN payloads and -0.0 count too)."""
    assert (a.dtype, a.shape, a.device.type) == (b.dtype, b.shape, "cpu")
    assert torch.equal(_bits(a), _bits(b))
    if not (a.is_floating_point() and a.isnan().any()):
        assert torch.equal(a, b)


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 1000).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=dtype)


def header_len(path: Path) -> int:
    return struct.unpack(">I", path.read_bytes()[8:12])[0]


# --------------------------------------------------------------------------- round trips


def test_round_trip_every_dtype_bit_exact(tmp_path: Path) -> None:
    tensors = {}
    for dt in DTYPES:
        name = str(dt).removeprefix("torch.")
        tensors[f"{name}/matrix"] = sample(dt, (7, 5))
        tensors[f"{name}/scalar"] = sample(dt, ())
        tensors[f"{name}/empty"] = torch.empty(0, dtype=dt)
        tensors[f"{name}/empty2d"] = torch.empty(3, 0, dtype=dt)
    tensors["special"] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45])
    tensors["bf16_special"] = torch.tensor([float("nan"), -0.0, 3.0e38], dtype=torch.bfloat16)
    tensors["int64_extremes"] = torch.tensor([-(2**63), 2**63 - 1, 0])
    tensors["transposed"] = sample(torch.float32, (4, 6)).t()  # non-contiguous input
    tensors["grad"] = torch.ones(3, requires_grad=True)
    meta = {
        "round": 12,
        "big": 2**127 + 12345,
        "neg_big": -(2**100) - 1,
        "nested": {"a": {"b": [1, 2.5, "x", None, True]}, "empty": {}},
        "unicode": "ϕ θ δ",
    }
    path = save_checkpoint(tmp_path, meta, tensors)
    ck = load_checkpoint(path)
    assert ck.path == path and ck.sequence == 1
    assert ck.meta == meta and type(ck.meta["big"]) is int
    assert list(ck.tensors) == list(tensors)
    for name, t in tensors.items():
        assert_same(t.detach(), ck.tensors[name])
    verify_checkpoint(path)


def test_round_trip_with_tiny_chunks_exercises_chunk_boundaries(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(ckpt_mod, "_CHUNK", 7)
    tensors = {"a": sample(torch.float64, (13, 3)), "b": sample(torch.uint8, (29,)), "c": sample(torch.bfloat16, ())}
    path = save_checkpoint(tmp_path, {}, tensors)
    verify_checkpoint(path)
    ck = load_checkpoint(path)
    for name, t in tensors.items():
        assert_same(t, ck.tensors[name])


def test_no_tensors_and_empty_meta(tmp_path: Path) -> None:
    ck = load_checkpoint(save_checkpoint(tmp_path, {}, {}))
    assert (ck.meta, ck.tensors) == ({}, {})


@settings(max_examples=30, deadline=None)
@given(
    specs=st.lists(
        st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 4), max_size=3), st.integers(0, 2**31)),
        max_size=5,
    ),
    meta=st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5) | st.none(), max_size=4),
)
def test_round_trip_property(specs, meta) -> None:
    tensors = {f"t{i}": sample(dt, tuple(shape), seed) for i, (dt, shape, seed) in enumerate(specs)}
    with tempfile.TemporaryDirectory() as d:
        ck = load_checkpoint(save_checkpoint(d, meta, tensors))
    assert ck.meta == meta
    for name, t in tensors.items():
        assert_same(t, ck.tensors[name])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_tensors_come_back_on_cpu(tmp_path: Path) -> None:
    t = sample(torch.bfloat16, (5, 5)).cuda()
    ck = load_checkpoint(save_checkpoint(tmp_path, {}, {"w": t}))
    assert_same(t.cpu(), ck.tensors["w"])


def test_save_rejects_bad_input_before_writing(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    with pytest.raises(ValueError, match="unsupported dtype"):
        save_checkpoint(d, {}, {"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(d, {}, {}, keep=0)
    with pytest.raises(TypeError):
        save_checkpoint(d, {"x": object()}, {})
    assert not d.exists()


def test_loading_a_pickle_file_is_refused_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / f"ckpt-0000000001{CHECKPOINT_SUFFIX}"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="bad magic"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- numbering, pruning, cleanup


def test_sequence_numbering_and_keep_pruning(tmp_path: Path) -> None:
    d = tmp_path / "nested" / "dir"  # created on demand
    assert list_checkpoints(d) == [] and load_latest(d) == (None, [])
    paths = [save_checkpoint(d, {"i": i}, {"x": torch.tensor(i)}, keep=3) for i in range(5)]
    assert [p.name for p in paths] == [f"ckpt-{s:010d}.gtc" for s in range(1, 6)]
    assert list_checkpoints(d) == paths[:1:-1]  # newest first: 5, 4, 3
    ck, skipped = load_latest(d)
    assert ck is not None and (ck.sequence, ck.meta, skipped) == (5, {"i": 4}, [])
    save_checkpoint(d, {}, {}, keep=1)
    assert [p.name for p in list_checkpoints(d)] == ["ckpt-0000000006.gtc"]


def test_sequence_follows_highest_number_not_count(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, {}, {})
    os.rename(tmp_path / "ckpt-0000000001.gtc", tmp_path / "ckpt-0000000041.gtc")
    assert save_checkpoint(tmp_path, {}, {}).name == "ckpt-0000000042.gtc"
    assert load_checkpoint(tmp_path / "ckpt-0000000042.gtc").sequence == 42


def test_stale_tmp_removed_and_unrelated_files_ignored(tmp_path: Path) -> None:
    first = save_checkpoint(tmp_path, {}, {})
    stale = [tmp_path / "ckpt-0000000002.gtc.tmp", tmp_path / "ckpt-0000000009.gtc.tmp"]
    for p in stale:
        p.write_bytes(b"GTCKPT\x00\x01 half written")
    unrelated = ["notes.txt", "ckpt-abc.gtc", "ckpt-0000000099.gtc.bak", "other.tmp", "xckpt-0000000050.gtc"]
    for name in unrelated:
        (tmp_path / name).write_text("not mine")
    (tmp_path / "ckpt-0000000077.gtc").mkdir()  # a directory with a checkpoint-like name
    assert list_checkpoints(tmp_path) == [first]
    second = save_checkpoint(tmp_path, {}, {}, keep=1)
    assert second.name == "ckpt-0000000002.gtc"  # the tmp of a crashed save does not count
    assert not any(p.exists() for p in stale) and not first.exists()
    assert all((tmp_path / name).read_text() == "not mine" for name in unrelated)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*unrelated, second.name, "ckpt-0000000077.gtc"])


# --------------------------------------------------------------------------- damage detection


def _damage_cases(path: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (damaged file contents, expected reason substring), computed from a good file."""
    raw = path.read_bytes()
    hlen = header_len(path)
    data = 12 + hlen
    size = len(raw)
    flipped = bytearray(raw)
    flipped[data + 1000] ^= 0x10
    garbage = raw[:12] + b"{not json" + b"!" * (hlen - 9) + raw[data:]
    not_utf8 = raw[:12] + b"\xff" * hlen + raw[data:]
    wrong_nbytes = raw[12:data].replace(b'"nbytes":16000', b'"nbytes":16004')
    assert wrong_nbytes != raw[12:data]
    inconsistent = raw[:8] + struct.pack(">I", hlen) + wrong_nbytes + raw[data:]
    bad_end = raw[:-8] + b"GTCKEN\x00\x00"
    return {
        "empty": (b"", "empty file"),
        "cut_in_preamble": (raw[:5], "truncated"),
        "cut_in_header": (raw[: 12 + hlen // 2], "truncated"),
        "cut_in_data": (raw[: data + 777], "truncated: file is"),
        "cut_in_trailer": (raw[: size - 20], "truncated: file is"),
        "cut_last_byte": (raw[:-1], "truncated: file is"),
        "trailing_bytes": (raw + b"\x00", "trailing bytes"),
        "bit_flip_in_data": (bytes(flipped), "checksum mismatch"),
        "bit_flip_in_digest": (raw[:-40] + bytes([raw[-40] ^ 1]) + raw[-39:], "checksum mismatch"),
        "garbage_header": (garbage, "bad header"),
        "header_not_utf8": (not_utf8, "bad header"),
        "inconsistent_nbytes": (inconsistent, "bad header"),
        "wrong_magic": (b"NOTACKPT" + raw[8:], "bad magic"),
        "wrong_version": (b"GTCKPT\x00\x02" + raw[8:], "unsupported format version"),
        "huge_header_len": (raw[:8] + struct.pack(">I", 2**32 - 1) + raw[12:], "truncated"),
        "bad_end_magic": (bad_end, "bad end magic"),
    }


CASE_NAMES = [
    "empty", "cut_in_preamble", "cut_in_header", "cut_in_data", "cut_in_trailer", "cut_last_byte", "trailing_bytes",
    "bit_flip_in_data", "bit_flip_in_digest", "garbage_header", "header_not_utf8", "inconsistent_nbytes",
    "wrong_magic", "wrong_version", "huge_header_len", "bad_end_magic",
]


@pytest.fixture
def two_good(tmp_path: Path) -> tuple[Path, Path]:
    """Two valid checkpoints; the newer one's 'w' tensor is 16000 bytes of data."""
    old = save_checkpoint(tmp_path, {"n": 1}, {"w": torch.zeros(4000)})
    new = save_checkpoint(tmp_path, {"n": 2}, {"w": torch.arange(4000, dtype=torch.float32), "b": torch.ones(3)})
    verify_checkpoint(old)
    verify_checkpoint(new)
    return old, new


@pytest.mark.parametrize("case", CASE_NAMES)
def test_damage_is_detected_and_load_latest_falls_back(two_good, case: str, caplog) -> None:
    old, new = two_good
    cases = _damage_cases(new)
    assert sorted(cases) == sorted(CASE_NAMES)
    content, reason = cases[case]
    new.write_bytes(content)
    for check in (load_checkpoint, verify_checkpoint):
        with pytest.raises(CheckpointError, match=reason) as info:
            check(new)
        assert str(new) in str(info.value) and info.value.path == new
    with caplog.at_level(logging.WARNING, logger="node.train.checkpoint"):
        ck, skipped = load_latest(new.parent)
    assert ck is not None and ck.path == old and ck.meta == {"n": 1}
    assert [p for p, _ in skipped] == [new] and reason in skipped[0][1]
    assert any(str(new) in r.getMessage() and reason in r.getMessage() for r in caplog.records)


def test_all_damaged_gives_none_and_every_reason(two_good) -> None:
    old, new = two_good
    old.write_bytes(old.read_bytes()[:-3])
    new.write_bytes(b"")
    ck, skipped = load_latest(new.parent)
    assert ck is None
    assert skipped == [(new, "empty file"), (old, skipped[1][1])] and skipped[1][1].startswith("truncated")


def test_missing_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path / "ckpt-0000000001.gtc")


# --------------------------------------------------------------------------- crash safety


CRASHER = textwrap.dedent(
    """
    import sys, torch
    from node.train.checkpoint import save_checkpoint
    d = sys.argv[1]
    save_checkpoint(d, {"i": -1}, {"w": torch.full((1000,), -1.0)}, keep=2)
    big = torch.empty(64 * 2**20, dtype=torch.float32)
    for i in range(1000):
        big.fill_(float(i))
        save_checkpoint(d, {"i": i}, {"w": big}, keep=2)
    """
)


def _kill_mid_write(d: Path, deadline_s: float = 60.0) -> list[Path]:
    """Run CRASHER until it is writing past a good checkpoint, SIGKILL it, return the .tmp files left behind."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, str(d)], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + deadline_s
        while not (list_checkpoints(d) and list(d.glob("*.tmp"))):  # the small one is done, a big one under way
            assert proc.poll() is None, f"writer exited early: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "writer never started a save"
            time.sleep(0.002)  # polling interval, not a wait-for-effect
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return list(d.glob("*.tmp"))


def test_kill_9_mid_write_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    leftovers: list[Path] = []
    for attempt in range(3):  # the save can, rarely, finish between seeing the .tmp and the kill
        d = tmp_path / f"attempt{attempt}"
        d.mkdir()
        leftovers = _kill_mid_write(d)
        if leftovers:
            break
    assert leftovers, "never managed to kill the writer mid-save"
    ck, skipped = load_latest(d)
    assert ck is not None and skipped == []
    expected = float(ck.meta["i"])
    assert ck.tensors["w"].min().item() == expected == ck.tensors["w"].max().item()
    assert ck.path == list_checkpoints(d)[0]
    assert leftovers == [d / f"ckpt-{ck.sequence + 1:010d}.gtc.tmp"]  # the save that was cut short
    path = save_checkpoint(d, {"after": True}, {"x": torch.arange(5)})
    assert path == list_checkpoints(d)[0] and path.name == f"ckpt-{ck.sequence + 1:010d}.gtc"
    assert not list(d.glob("*.tmp"))
    assert load_checkpoint(path).meta == {"after": True}


def test_failed_save_leaves_no_trace_and_keeps_old_checkpoints(tmp_path: Path, monkeypatch) -> None:
    old = save_checkpoint(tmp_path, {"n": 1}, {"w": torch.ones(3)}, keep=1)

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(tmp_path, {"n": 2}, {"w": torch.zeros(3)}, keep=1)
    assert list(tmp_path.iterdir()) == [old]
    assert load_checkpoint(old).meta == {"n": 1}


def test_verify_builds_no_tensors(tmp_path: Path, monkeypatch) -> None:
    path = save_checkpoint(tmp_path, {}, {"w": torch.ones(100), "s": torch.tensor(True)})

    def no_alloc(*args, **kwargs):
        raise AssertionError("verify_checkpoint allocated a tensor")

    monkeypatch.setattr(torch, "empty", no_alloc)
    verify_checkpoint(path)
