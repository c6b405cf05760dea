"""A real model, tokenizer and dataset in a 3-node swarm: the `llama-test` preset (a transformers Llama), a BPE
tokenizer trained by `gossiptrain tokenizer train`, and JSONL data.

Every node builds the same random weights from the swarm seed (nothing downloaded), tokenizes the JSONL into the
shared token cache, agrees on one manifest (model config hash, tokenizer fingerprint, data fingerprint), pairs,
exchanges, verifies, and the held-out loss falls from about ln(vocab).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from node.tools.swarm import LocalSwarm
from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration

VOCAB = 1024
ROUNDS = 8


def write_jsonl(path: Path, min_bytes: int = 1_800_000) -> None:
    """Documents from this Python's standard library (always on disk), one JSON object per line, plus the odd
    bad row a real dataset has (skipped and counted)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    written = 0
    with path.open("w") as out:
        for source in sorted(stdlib.glob("*.py")):
            text = source.read_text(errors="replace")
            out.write(json.dumps({"text": text, "path": source.name}) + "\n")
            written += len(text)
            if written >= min_bytes:
                break
        out.write(json.dumps({"title": "a row without the text field"}) + "\n")


@pytest.fixture(scope="module")
def swarm_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("real-model")
    corpus, tokenizer = base / "corpus.jsonl", base / "tokenizer.json"
    write_jsonl(corpus)
    result = subprocess.run([sys.executable, "-m", "node", "tokenizer", "train", "--data", str(corpus), "--vocab",
                             str(VOCAB), "--out", str(tokenizer)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    args = ["--model", "llama-test", "--tokenizer", str(tokenizer), "--data", str(corpus), "--context", "64",
            "--batch-size", "8", "--eval-batches", "4", "--inner-steps", "10", "--warmup-steps", "10", "--lr", "3e-3",
            "--rounds", str(ROUNDS), "--sync-timeout", "4", "--checkpoint-every", "0", "--seed", "5",
            "--verify-rate", "0.25"]
    swarm = LocalSwarm(3, base / "swarm", args, env={"GOSSIPTRAIN_CACHE_DIR": str(base / "cache")})
    try:
        swarm.start()
        codes = swarm.wait_finished(timeout=400)
        logs = [node.log_path.read_text() for node in swarm.nodes]
        assert codes == [0, 0, 0], [log[-3000:] for log in logs]
        return {"summaries": swarm.summaries(), "logs": logs, "statuses": [n.poll_status() for n in swarm.nodes]}
    finally:
        swarm.stop()


def test_three_nodes_train_a_transformers_llama_on_bpe_tokens_from_jsonl(swarm_run):
    for summary, log in zip(swarm_run["summaries"], swarm_run["logs"]):
        assert summary["rounds_done"] == ROUNDS, summary
        assert summary["exchanges"]["ok"] >= 2, summary
        assert summary["initial_eval_loss"] == pytest.approx(math.log(VOCAB), abs=0.5), summary
        assert summary["eval_loss"] < summary["initial_eval_loss"] - 1.0, summary
        assert "Traceback" not in log and "FLAGGED" not in log, log[-3000:]


def test_every_node_built_the_same_model_and_agreed_on_one_manifest(swarm_run):
    statuses = swarm_run["statuses"]
    assert len({s["manifest"] for s in statuses}) == 1
    assert len({s["parameters"] for s in statuses}) == 1 and statuses[0]["parameters"] > 100_000
