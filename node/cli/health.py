"""`gossiptrain health`: is the node in this work dir alive? (the container HEALTHCHECK)

Healthy means: its node.json says joining or running, its process exists, and its /metrics
endpoint answers with this node's identity. Exit 0 healthy, 1 not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request

from node.cli.run import add_config_flags, config_from_args
from node.config import ConfigError, resolve_work_dir

METRICS_TIMEOUT = 5.0


def add_parser(verbs: argparse._SubParsersAction) -> None:
    parser = verbs.add_parser("health", help="exit 0 if the node in --work-dir is alive (container healthcheck)",
                              description=__doc__)
    parser.add_argument("--config", default=os.environ.get("GOSSIPTRAIN_CONFIG"), help="TOML config file")
    add_config_flags(parser)
    parser.set_defaults(handler=main)


def check(work_dir: str) -> tuple[bool, str]:
    path = resolve_work_dir(work_dir) / "node.json"
    try:
        status = json.loads(path.read_text())
    except FileNotFoundError:
        return False, f"{path} does not exist (the node has not started yet)"
    except (OSError, json.JSONDecodeError) as error:
        return False, f"cannot read {path}: {error}"
    if status.get("status") not in ("joining", "running"):
        return False, f"node status is {status.get('status')!r}"
    pid = status.get("pid")
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False, f"node process {pid} is gone (killed without a clean leave?)"
    except PermissionError:
        pass  # exists, owned by someone else
    port = status.get("metrics_port")
    if not port:
        return True, f"round {status.get('round')} (metrics disabled)"
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT) as response:
            text = response.read().decode(errors="replace")
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        return False, f"{url} does not answer: {error}"
    if f'peer_id="{status.get("peer_id")}"' not in text:
        return False, f"{url} answers but is not this node's metrics endpoint"
    rounds = [int(float(line.split()[-1])) for line in text.splitlines() if line.startswith("gossiptrain_round ")]
    return True, f"{status['status']}, round {rounds[0] if rounds else '?'}, peer {status.get('peer_id')}"


def main(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ConfigError as error:
        print(f"gossiptrain health: config error: {error}", file=sys.stderr)
        return 2
    healthy, detail = check(cfg.work_dir)
    print(f"{'healthy' if healthy else 'unhealthy'}: {detail}", flush=True)
    return 0 if healthy else 1
