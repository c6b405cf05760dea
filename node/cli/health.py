"""`gossiptrain health`: is the node in this work dir alive? (the container HEALTHCHECK)

Healthy means: its node.json says joining or running, its process exists, and its /metrics
endpoint answers with this node's identity. With a `{slot}` work dir, the slot claimed by the
node running on this host (container) is checked. Exit 0 healthy, 1 not.
"""

from __future__ import annotations

import argparse
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

from protocol.records import NodeStatus

from node.cli.run import add_config_flags, load_config_or_exit
from node.workdir import STATUS_FILE, StatusUnreadable, existing_work_dirs, is_locked, pid_namespace, read_status

METRICS_TIMEOUT = 5.0


def add_parser(verbs: argparse._SubParsersAction) -> None:
    parser = verbs.add_parser("health", help="exit 0 if the node in --work-dir is alive (container healthcheck)",
                              description=__doc__)
    parser.add_argument("--config", default=os.environ.get("GOSSIPTRAIN_CONFIG"), help="TOML config file")
    add_config_flags(parser)
    parser.set_defaults(handler=main)


def _read_status(directory: Path) -> NodeStatus | str:
    path = directory / STATUS_FILE
    try:
        return read_status(directory)
    except FileNotFoundError:
        return f"{path} does not exist (the node has not started yet)"
    except StatusUnreadable as error:
        return f"cannot read {path}: {error}"


def node_dirs(template: str) -> list[Path]:
    """The work dir to check; for a `{slot}` template, the slots claimed by a node in this container (same host
    name and PID namespace: replicas may share a host name under network_mode: host)."""
    if "{slot}" not in template:
        return [Path(template)]
    mine = []
    for directory in existing_work_dirs(template):
        status = _read_status(directory)
        if isinstance(status, str) or not is_locked(directory):
            continue
        if status.hostname == socket.gethostname() and status.pid_namespace == pid_namespace():
            mine.append(directory)
    return mine


def check_dir(directory: Path) -> tuple[bool, str]:
    status = _read_status(directory)
    if isinstance(status, str):
        return False, status
    if status.status not in ("joining", "running"):
        return False, f"node status is {status.status!r}"
    pid = status.pid
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False, f"node process {pid} is gone (killed without a clean leave?)"
    except PermissionError:
        pass  # exists, owned by someone else
    port = status.metrics_port
    if not port:
        return True, f"{directory}: round {status.round} (metrics disabled)"
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT) as response:
            text = response.read().decode(errors="replace")
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        return False, f"{url} does not answer: {error}"
    if f'peer_id="{status.peer_id}"' not in text:
        return False, f"{url} answers but is not this node's metrics endpoint"
    rounds = [int(float(line.split()[-1])) for line in text.splitlines() if line.startswith("gossiptrain_round ")]
    return True, f"{status.status}, round {rounds[0] if rounds else '?'}, peer {status.peer_id}, {directory}"


def check(template: str) -> tuple[bool, str]:
    directories = node_dirs(template)
    if not directories:
        return False, f"no node of this host holds a work dir matching {template}"
    results = [check_dir(directory) for directory in directories]
    return next((result for result in results if result[0]), results[0])


def main(args: argparse.Namespace) -> int:
    # a config error exits 1, not EXIT_CONFIG: a HEALTHCHECK must exit 0 or 1 (2 is reserved by Docker)
    cfg = load_config_or_exit(args, "unhealthy: config error: ", code=1)
    if isinstance(cfg, int):
        return cfg
    healthy, detail = check(cfg.work_dir)
    print(f"{'healthy' if healthy else 'unhealthy'}: {detail}", flush=True)
    return 0 if healthy else 1
