"""A local swarm of real node processes on 127.0.0.1: used by `gossiptrain swarm` and the integration tests.

Each node is a separate `python -m node run` process with its own p2pd, work dir and
metrics port. The launcher learns each node's address from the node.json it writes,
and its progress from its real /metrics endpoint. With `hosts` (NodeHost: a command prefix
and an address, e.g. node/tools/netns.py's emulated network) node i runs on host i instead,
listening on and announcing that address, its /metrics served there too.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from node.metrics import FAILED_RESULTS
from node.tools import procs
from node.workdir import StatusUnreadable, read_status

START_TIMEOUT = 90.0
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class NodeHost:
    """Where a node runs: the address it listens on, announces and serves /metrics at, and the command prefix that
    puts its process there (e.g. `ip netns exec NS`, from node/tools/netns.py). Default: this machine's loopback."""

    address: str = LOOPBACK
    prefix: tuple[str, ...] = ()


class SwarmError(RuntimeError):
    """A node of the local swarm failed to start or exited badly."""


@dataclass
class NodeProcess:
    index: int
    work_dir: Path
    process: subprocess.Popen
    log_path: Path
    status: dict[str, Any] = field(default_factory=dict)
    address: str = LOOPBACK  # its metrics are served there

    @property
    def metrics_url(self) -> str:
        return f"http://{self.address}:{self.status['metrics_port']}/metrics"

    @property
    def maddr(self) -> str:
        return self.status["maddrs"][0]

    def poll_status(self) -> dict[str, Any]:
        """Its node.json (the NodeStatus fields); the last one read while the file is missing or unreadable."""
        try:
            self.status = read_status(self.work_dir).to_wire()
        except (FileNotFoundError, StatusUnreadable):
            pass
        return self.status

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def scrape(url: str, timeout: float = 2.0) -> dict[str, float]:
    """Flatten a /metrics page into {'name{label="v"}': value}; {} if the node does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError, TimeoutError):
        return {}
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def rounds_done(samples: dict[str, float]) -> int:
    """Rounds a node has computed (paired + local) according to one scrape; 0 if it did not answer."""
    return int(sum(v for k, v in samples.items() if k.startswith("gossiptrain_outer_rounds_total{")))


def exchange_count(samples: dict[str, float], result: str) -> int:
    """Pair exchanges that ended with `result` (ok, rejected, no_partner, ...) according to one scrape."""
    return int(samples.get(f'gossiptrain_exchanges_total{{result="{result}"}}', 0))


def exchange_counts(samples: dict[str, float]) -> tuple[int, int]:
    """(ok, failed) pair exchanges in one scrape; failed: every result in FAILED_RESULTS."""
    return exchange_count(samples, "ok"), sum(exchange_count(samples, r) for r in FAILED_RESULTS)


class LocalSwarm:
    def __init__(
        self,
        num_nodes: int,
        base_dir: str | Path,
        node_args: list[str] | None = None,
        metrics_base_port: int = 0,
        threads_per_node: int = 1,
        env: dict[str, str] | None = None,
        node_env: dict[int, dict[str, str]] | None = None,
        hosts: Sequence[NodeHost] | None = None,
    ) -> None:
        self.num_nodes = num_nodes
        self.base_dir = Path(base_dir)
        self.node_args = list(node_args or [])
        self.metrics_base_port = metrics_base_port
        self.threads_per_node = threads_per_node
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.node_env = node_env or {}  # extra environment of single nodes (tests: fault injection)
        self.hosts = list(hosts or [])  # node i runs on hosts[i] (an emulated network); none: all on loopback
        if self.hosts and len(self.hosts) < num_nodes:
            raise ValueError(f"{num_nodes} nodes need {num_nodes} hosts, not {len(self.hosts)}")
        self.nodes: list[NodeProcess] = []

    def host(self, index: int) -> NodeHost:
        return self.hosts[index] if self.hosts else NodeHost()

    def command(self, index: int, initial_peers: list[str], extra: list[str] | None = None) -> list[str]:
        """The exact node command line (the same one docker-compose and the README use)."""
        port = self.metrics_base_port + index if self.metrics_base_port else 0
        host = self.host(index)
        cmd = [*host.prefix, sys.executable, "-m", "node", "run",
               "--work-dir", str(self.base_dir / f"node{index}"), "--metrics-port", str(port),
               "--threads", str(self.threads_per_node), "--shard", str(index % self.num_nodes),
               "--num-shards", str(self.num_nodes), "--min-peers", str(self.num_nodes - 1)]
        if host.address != LOOPBACK:
            cmd += ["--host", host.address, "--metrics-host", host.address]
        for peer in initial_peers:
            cmd += ["--initial-peer", peer]
        return cmd + self.node_args + list(extra or [])

    def start_node(self, index: int, initial_peers: list[str], extra: list[str] | None = None) -> NodeProcess:
        work_dir = self.base_dir / f"node{index}"
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / "node.json").unlink(missing_ok=True)
        log_path = work_dir / "node.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                self.command(index, initial_peers, extra), stdout=log, stderr=subprocess.STDOUT,
                env={**self.env, **self.node_env.get(index, {})},
                start_new_session=True,  # a Ctrl-C in the launcher's terminal reaches the launcher only
            )
        node = NodeProcess(index, work_dir, process, log_path, address=self.host(index).address)
        if index < len(self.nodes):
            self.nodes[index] = node
        else:
            self.nodes.append(node)
        return node

    def wait_until_up(self, node: NodeProcess, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.poll_status().get("status") == "running":
                return
            if node.process.poll() is not None:
                raise SwarmError(f"node {node.index} exited with {node.process.returncode}:\n{node.log_tail()}")
            time.sleep(0.2)
        raise SwarmError(f"node {node.index} did not come up within {timeout:.0f}s:\n{node.log_tail()}")

    def start(self) -> None:
        """Start node 0, then the others bootstrapping from it."""
        first = self.start_node(0, [])
        self.wait_until_up(first)
        for index in range(1, self.num_nodes):
            self.start_node(index, [first.maddr])
        for node in self.nodes[1:]:
            self.wait_until_up(node)

    def metrics(self, index: int) -> dict[str, float]:
        node = self.nodes[index]
        return scrape(node.metrics_url) if node.status.get("metrics_port") else {}

    def wait_finished(self, timeout: float) -> list[int]:
        """Wait for every node process to exit by itself; returns exit codes (None if still running)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(n.process.poll() is None for n in self.nodes):
            time.sleep(0.5)
        return [n.process.poll() for n in self.nodes]

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM every node (a clean leave), SIGKILL what is still running after `grace` seconds."""
        procs.stop_processes([node.process for node in self.nodes], grace)

    def summaries(self) -> list[dict[str, Any]]:
        result = []
        for node in self.nodes:
            path = node.work_dir / "summary.json"
            result.append(json.loads(path.read_text()) if path.exists() else {})
        return result


def progress_row(index: int, samples: dict[str, float]) -> dict[str, Any]:
    """One node's live progress from a scrape of its /metrics."""
    ok, failed = exchange_counts(samples)
    return {
        "node": index, "round": int(samples.get("gossiptrain_round", 0)),
        "loss": samples.get("gossiptrain_train_loss", math.nan), "eval": samples.get("gossiptrain_eval_loss", math.nan),
        "tok/s": samples.get("gossiptrain_tokens_per_second", math.nan),
        "util": samples.get("gossiptrain_utilisation", math.nan), "ex ok": ok, "ex failed": failed,
        "refused": exchange_count(samples, "rejected"), "alone": exchange_count(samples, "no_partner"),
        "peers": int(samples.get("gossiptrain_peers_live", 0)),
    }
