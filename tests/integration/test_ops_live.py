"""The ops stack against a live swarm: docker-compose's own node commands, a real Prometheus, status/doctor/report.

No Docker engine runs here, so the swarm is what docker-compose would start, run as local
processes: `docker-compose config` (the real compose implementation) renders the file; each
node service's command and environment (the image's ENV from ops/Dockerfile, then the service's)
are run as-is, with only what a container gives for free replaced: its own network namespace
(ports -> free ports on 127.0.0.1), its volumes (-> directories) and its host name.

A real Prometheus (Debian package) scrapes the three nodes with ops/prometheus's rules, and
every dashboard query and alert expression runs against it through the HTTP API.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from node.cli.main import build_parser
from node.ops.report import png_size  # tests/unit/test_report.py checks PNGs with an independent parser
from node.tools.procs import stop_processes
from node.tools.swarm import scrape
from node.workdir import candidates
from tests.integration.conftest import poll, rounds_done

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]  # the module fixture starts a swarm

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
INSTALL_HINT = "run `bash ops/install-test-deps.sh` (Debian packages prometheus and docker-compose)"
# what Grafana would put in for its variables (the scrape interval here is 2 s)
GRAFANA_VARIABLES = {"instance": ".+", "__rate_interval": "20s", "__range": "5m", "__interval": "2s"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: {INSTALL_HINT}")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def compose_config() -> dict:
    result = subprocess.run([tool("docker-compose"), "-f", str(ROOT / "docker-compose.yml"), "config"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in (OPS / "Dockerfile").read_text().splitlines():
        if raw.strip().startswith("#") and not current:
            continue
        current += raw.rstrip("\\").strip() + " " if raw.rstrip().endswith("\\") else raw.strip()
        if not raw.rstrip().endswith("\\"):
            if current.strip():
                keyword, _, rest = current.strip().partition(" ")
                lines.append((keyword.upper(), rest.strip()))
            current = ""
    return lines


def image_env() -> dict[str, str]:
    env = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ENV":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def image_json_instruction(name: str) -> list[str]:
    for keyword, rest in dockerfile_instructions():
        if keyword == name:
            return json.loads(rest)
    raise AssertionError(f"ops/Dockerfile has no {name}")


@dataclass
class LocalContainer:
    name: str
    command: list[str]
    env: dict[str, str]
    metrics_port: int
    work_dir_template: str
    process: subprocess.Popen | None = None
    log: Path | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def work_dir(self) -> Path:
        """The dir this node claimed (a `{slot}` template: the slot whose node.json names its pid)."""
        for directory in candidates(self.work_dir_template):
            status = directory / "node.json"
            if status.exists() and json.loads(status.read_text()).get("pid") == self.process.pid:
                return directory
        raise AssertionError(f"{self.name} holds no dir of {self.work_dir_template}")


PATH_VARIABLES = ("GOSSIPTRAIN_WORK_DIR", "GOSSIPTRAIN_IDENTITY", "GOSSIPTRAIN_INITIAL_PEERS_FILE")


def as_local(service: dict, name: str, base: Path) -> LocalContainer:
    """A compose service's node, as the container would run it, on this host."""
    entrypoint = image_json_instruction("ENTRYPOINT")
    assert entrypoint[-1] == "gossiptrain", entrypoint
    mounts = {}
    for spec in service["volumes"]:
        source, target = (spec["source"], spec["target"]) if isinstance(spec, dict) else spec.split(":")[:2]
        mounts[target] = base / "volumes" / source  # a named volume: shared by every container mounting it
        mounts[target].mkdir(parents=True, exist_ok=True)

    def local_path(value: str) -> str:
        if not value.startswith("/"):
            return value
        for target, directory in sorted(mounts.items(), key=lambda item: -len(item[0])):
            if value == target or value.startswith(target + "/"):
                return str(directory) + value[len(target):]
        return str(base / "containers" / name) + value  # the container's own file system

    metrics_port = free_port()
    env = {**image_env(), **{k: str(v) for k, v in service.get("environment", {}).items()}}
    env = {k: (local_path(v) if k in PATH_VARIABLES else v) for k, v in env.items()}
    # a container has its own network namespace; here every node shares 127.0.0.1
    env.update(GOSSIPTRAIN_HOST="127.0.0.1", GOSSIPTRAIN_PORT="0", GOSSIPTRAIN_METRICS_HOST="127.0.0.1",
               GOSSIPTRAIN_METRICS_PORT=str(metrics_port))
    command = [sys.executable, "-m", "node", *(local_path(arg) for arg in service["command"])]
    return LocalContainer(name, command, env, metrics_port, env["GOSSIPTRAIN_WORK_DIR"])


@dataclass
class OpsStack:
    nodes: list[LocalContainer]
    prometheus_url: str
    run_id: str
    bootstrap_maddr: str
    base: Path

    def query(self, expr: str) -> list[dict]:
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def api(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.prometheus_url}{path}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]


def start_node(node: LocalContainer, base: Path) -> None:
    node.log = base / f"{node.name}.log"
    with open(node.log, "ab") as log:
        node.process = subprocess.Popen(node.command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                        env={**os.environ, **node.env, "PYTHONUNBUFFERED": "1"},
                                        start_new_session=True)


def prometheus_config(targets: list[str], self_target: str) -> dict:
    """ops/prometheus/prometheus.yml with its DNS discovery (compose service names) replaced by the local targets."""
    config = yaml.safe_load((OPS / "prometheus" / "prometheus.yml").read_text())
    # 2 s: a scrape of a node busy training on a 2-core box must not time out (that would be a real "down")
    config["global"].update(scrape_interval="2s", evaluation_interval="2s", scrape_timeout="2s")
    config["rule_files"] = [str(OPS / "prometheus" / pattern) for pattern in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    node_job = jobs["gossiptrain"]
    assert node_job.pop("dns_sd_configs"), "the compose config discovers nodes by DNS"
    node_job["static_configs"] = [{"targets": targets}]
    jobs["prometheus"]["static_configs"] = [{"targets": [self_target]}]
    return config


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    base = tmp_path_factory.mktemp("ops")
    services = compose_config()["services"]
    bootstrap = as_local(services["bootstrap"], "bootstrap", base)
    # two trainer replicas (docker-compose --scale) on one shared checkpoints volume
    trainers = [as_local(services["trainer"], f"trainer-{i}", base) for i in (1, 2)]
    nodes = [bootstrap, *trainers]
    processes: list[subprocess.Popen] = []
    prometheus = None
    try:
        for node in nodes:  # trainers wait for the bootstrap's node.json by themselves
            start_node(node, base)
            processes.append(node.process)
        prometheus_port = free_port()
        config_path = base / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(prometheus_config(
            [f"127.0.0.1:{node.metrics_port}" for node in nodes], f"127.0.0.1:{prometheus_port}")))
        with open(base / "prometheus.log", "ab") as log:
            prometheus = subprocess.Popen(
                [tool("prometheus"), f"--config.file={config_path}", f"--storage.tsdb.path={base / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prometheus_port}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        processes.append(prometheus)
        status_path = Path(bootstrap.work_dir_template) / "node.json"
        maddr = poll(lambda: (json.loads(status_path.read_text())["maddrs"][0]
                              if status_path.exists() and "running" in status_path.read_text() else None),
                     timeout=90, what="the bootstrap node to run")
        result = OpsStack(nodes, f"http://127.0.0.1:{prometheus_port}",
                          bootstrap.env["GOSSIPTRAIN_RUN_ID"], maddr, base)

        def trained() -> bool:
            for node in nodes:
                if node.process.poll() is not None:
                    pytest.fail(f"{node.name} exited {node.process.returncode}:\n{node.log.read_text()[-3000:]}")
            samples = [scrape(node.metrics_url) for node in nodes]
            return all(rounds_done(s) >= 4 and s.get('gossiptrain_exchanges_total{result="ok"}', 0) >= 2
                       for s in samples)

        poll(trained, timeout=240, interval=1.0, what="every node to finish 4 rounds with 2 ok exchanges")
        # enough history for 20 s rate windows, and every target scraped as up
        poll(lambda: len(result.query('count_over_time(up{job="gossiptrain"}[30s]) >= 13')) == 3,
             timeout=60, interval=1.0, what="30 s of scrapes of all three nodes")
        yield result
    finally:
        stop_processes(processes, grace=30)


def test_compose_file_validates_and_wires_the_stack():
    config = compose_config()
    services = config["services"]
    assert {"bootstrap", "trainer", "prometheus", "grafana"} <= services.keys()
    for name in ("bootstrap", "trainer"):
        assert services[name]["build"]["dockerfile"] == "ops/Dockerfile"
        assert services[name]["command"][0] == "run"
        # the node command parses with the real CLI (the image's entrypoint is `gossiptrain`)
        build_parser().parse_known_args(services[name]["command"])
    assert any((v["target"] if isinstance(v, dict) else v.split(":")[1]) == "/data"
               for v in services["trainer"]["volumes"]), "trainer checkpoints live on a volume"
    assert {"checkpoints", "bootstrap-data"} <= config["volumes"].keys()
    prometheus_mounts = " ".join(str(v) for v in services["prometheus"]["volumes"])
    assert "ops/prometheus" in prometheus_mounts
    grafana_mounts = " ".join(str(v) for v in services["grafana"]["volumes"])
    assert "ops/grafana/provisioning" in grafana_mounts and "ops/grafana/dashboards" in grafana_mounts


def test_dockerfile_is_non_root_pid1_safe_and_has_a_healthcheck():
    instructions = dockerfile_instructions()
    keywords = [k for k, _ in instructions]
    user = [rest for k, rest in instructions if k == "USER"]
    assert user and user[-1] not in ("root", "0"), "the node runs as a non-root user"
    entrypoint = image_json_instruction("ENTRYPOINT")
    assert entrypoint[:2] == ["tini", "--"], "tini is PID 1 and forwards signals to the node"
    assert "HEALTHCHECK" in keywords
    healthcheck = next(rest for k, rest in instructions if k == "HEALTHCHECK")
    assert re.search(r'CMD \["gossiptrain", "health"\]', healthcheck)
    args = {rest.split("=")[0] for k, rest in instructions if k == "ARG"}
    assert {"BASE_IMAGE", "TORCH_INDEX_URL"} <= args, "CPU by default, CUDA by build argument"


def test_compose_nodes_form_one_swarm_and_train(stack):
    for node in stack.nodes:
        samples = scrape(node.metrics_url)
        assert samples["gossiptrain_peers_live"] == 2, node.name
        assert samples['gossiptrain_exchanges_total{result="ok"}'] >= 2, node.name
        assert 0 < samples["gossiptrain_eval_loss"] < 5.5, node.name
    for trainer in stack.nodes[1:]:
        assert "initial peers from" in trainer.log.read_text(), "trainers found the bootstrap through its node.json"
        assert (trainer.work_dir / "history.jsonl").exists()
    # the replicas share one volume and claimed the two lowest slots of the image's {slot} work dir
    assert sorted(t.work_dir.name for t in stack.nodes[1:]) == ["node-1", "node-2"]
    assert stack.nodes[1].work_dir.parent == stack.nodes[2].work_dir.parent


def test_container_healthcheck_command(stack):
    for node in stack.nodes:  # the image's HEALTHCHECK, with the container's environment
        result = subprocess.run([sys.executable, "-m", "node", "health"], capture_output=True, text=True,
                                timeout=60, env={**os.environ, **node.env}, cwd=ROOT)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.startswith("healthy: running, round ")
    missing = subprocess.run([sys.executable, "-m", "node", "health", "--work-dir", str(stack.base / "nowhere")],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert missing.returncode == 1 and "unhealthy" in missing.stdout


def test_prometheus_scrapes_every_node_and_loads_the_rules(stack):
    targets = stack.api("/api/v1/targets")["activeTargets"]
    nodes = [t for t in targets if t["labels"]["job"] == "gossiptrain"]
    assert len(nodes) == 3 and all(t["health"] == "up" for t in nodes), nodes
    rules_yaml = yaml.safe_load((OPS / "prometheus" / "rules" / "gossiptrain.yml").read_text())
    expected = {rule["alert"] for group in rules_yaml["groups"] for rule in group["rules"] if "alert" in rule}
    loaded = {rule["name"]: rule for group in stack.api("/api/v1/rules")["groups"] for rule in group["rules"]}
    assert expected <= loaded.keys()
    assert all(loaded[name]["health"] == "ok" for name in expected), {n: loaded[n].get("lastError") for n in expected}
    # a healthy, training swarm has no alert firing or pending
    assert stack.api("/api/v1/alerts")["alerts"] == []


def alert_rules() -> list[dict]:
    rules_yaml = yaml.safe_load((OPS / "prometheus" / "rules" / "gossiptrain.yml").read_text())
    return [rule for group in rules_yaml["groups"] for rule in group["rules"] if "alert" in rule]


def test_every_alert_expression_evaluates_to_nothing_on_a_healthy_swarm(stack):
    rules = alert_rules()
    assert len(rules) >= 7
    for rule in rules:
        # valid PromQL over the live series, and not true for any node of a healthy swarm
        assert stack.query(rule["expr"]) == [], rule["alert"]


def dashboard_queries() -> list[tuple[str, str, str]]:
    found = []
    for path in sorted((OPS / "grafana" / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        panels = [p for top in board["panels"] for p in (top, *top.get("panels", []))]
        for panel in panels:
            for target in panel.get("targets", []):
                found.append((path.name, panel.get("title", ""), target["expr"]))
    return found


def substitute(expr: str) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in GRAFANA_VARIABLES, f"unknown dashboard variable ${name}"
        return GRAFANA_VARIABLES[name]
    return re.sub(r"\$\{([A-Za-z0-9_]+)(?::[^}]*)?\}|\$([A-Za-z0-9_]+)", value, expr)


def test_every_dashboard_panel_query_returns_data(stack):
    queries = dashboard_queries()
    assert len(queries) >= 40
    empty = [(board, title, expr) for board, title, expr in queries if not stack.query(substitute(expr))]
    assert empty == [], "dashboard queries without data on a live swarm:\n" + "\n".join(map(str, empty))
    # the dashboards' node picker (label_values(gossiptrain_info, instance)) lists the three nodes
    values = stack.api("/api/v1/label/instance/values?" + urllib.parse.urlencode({"match[]": "gossiptrain_info"}))
    assert sorted(values) == sorted(f"127.0.0.1:{node.metrics_port}" for node in stack.nodes)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def test_status_lists_the_live_swarm(stack):
    result = run_cli("status", "--initial-peer", stack.bootstrap_maddr, "--run-id", stack.run_id, "--json")
    assert result.returncode == 0, result.stderr
    swarm = json.loads(result.stdout)
    peer_ids = {json.loads((node.work_dir / "node.json").read_text())["peer_id"] for node in stack.nodes}
    assert swarm["run_id"] == stack.run_id and swarm["live_peers"] == 3
    assert {p["peer_id"] for p in swarm["peers"]} == peer_ids
    for peer in swarm["peers"]:
        assert peer["round"] >= 4 and 0 < peer["eval_loss"] < 5.5 and peer["train_loss"] > 0
        assert peer["exchanges"]["ok"] >= 2 and peer["last_exchange_partner"] in peer_ids - {peer["peer_id"]}
        assert peer["tokens_per_second"] > 0 and peer["flagged_by"] == []
    assert swarm["flagged"] == {}
    table = run_cli("status", "--initial-peer", stack.bootstrap_maddr, "--run-id", stack.run_id)
    assert table.returncode == 0 and "live peers 3" in table.stdout and "flagged peers: none" in table.stdout
    other = run_cli("status", "--initial-peer", stack.bootstrap_maddr, "--run-id", "no-such-run")
    assert other.returncode == 1 and "no live peers" in other.stdout


def test_doctor_passes_for_a_joining_node_and_names_fixes_for_problems(stack):
    joiner = {**stack.nodes[1].env, "GOSSIPTRAIN_WORK_DIR": str(stack.base / "joiner"),
              "GOSSIPTRAIN_METRICS_PORT": str(free_port())}
    result = run_cli("doctor", "--initial-peer", stack.bootstrap_maddr, "--json", env=joiner)
    assert result.stdout.startswith("{"), result.stderr
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert result.returncode == 0 and report["verdict"] in ("ok", "warn"), result.stdout
    assert {"python", "packages", "p2pd", "listen port", "reachable", "metrics port", "device", "disk", "swarm",
            "clock skew"} <= checks.keys()
    assert all(checks[name]["verdict"] == "ok" for name in ("p2pd", "swarm", "clock skew", "disk", "reachable")), checks
    assert "3 live peer(s)" in checks["swarm"]["detail"] and "manifest" in checks["swarm"]["detail"]
    # problems: a taken metrics port, CUDA on a CPU-only box, another model than the swarm's
    broken = {**joiner, "GOSSIPTRAIN_METRICS_PORT": str(stack.nodes[0].metrics_port), "GOSSIPTRAIN_DEVICE": "cuda",
              "GOSSIPTRAIN_D_MODEL": "96"}
    result = run_cli("doctor", "--initial-peer", stack.bootstrap_maddr, "--json", env=broken)
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert result.returncode == 1
    assert checks["metrics port"]["verdict"] == "fail" and "--metrics-port" in checks["metrics port"]["fix"]
    assert checks["swarm"]["verdict"] == "fail" and "manifest" in checks["swarm"]["detail"]
    if not shutil.which("nvidia-smi"):
        assert checks["device"]["verdict"] == "fail" and checks["device"]["fix"]


LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def test_doctor_measures_a_skewed_clock(stack):
    """doctor run with its clock 8 s ahead of the swarm (libfaketime shifts this process's clock, not the
    swarm's): it still joins as a client, measures about -8 s by DHT ping, and fails the check with the fix."""
    if not LIBFAKETIME.exists():
        pytest.fail(f"libfaketime is not installed: {INSTALL_HINT}")
    env = {**stack.nodes[1].env, "GOSSIPTRAIN_WORK_DIR": str(stack.base / "skewed"),
           "GOSSIPTRAIN_METRICS_PORT": str(free_port()), "LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": "+8s"}
    result = run_cli("doctor", "--initial-peer", stack.bootstrap_maddr, "--json", env=env)
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    skew = checks["clock skew"]
    assert result.returncode == 1 and skew["verdict"] == "fail", skew
    offset = float(re.search(r"largest offset ([-+][0-9.]+)s", skew["detail"]).group(1))
    assert -9.0 < offset < -7.0 and "by DHT ping" in skew["detail"], skew
    assert "ntp" in skew["fix"].lower()
    assert checks["swarm"]["verdict"] != "fail", checks["swarm"]  # the skew is named as such, not as an unreachable swarm


def test_report_renders_the_swarms_recorded_history(stack):
    out = stack.base / "report.png"
    result = run_cli("report", *(str(node.work_dir) for node in stack.nodes), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert png_size(out) == (1600, 1000)
    assert out.stat().st_size > 40_000, "a plot of real curves, not an empty canvas"
    for node in stack.nodes:
        lines = (node.work_dir / "history.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert len(records) >= 5 and records[-1]["rounds_done"] >= 4
        assert records[-1]["eval_loss"] < records[0]["eval_loss"], "the recorded loss went down"


def test_a_frozen_node_turns_node_down_pending(stack):
    """The positive case on live data: SIGSTOP a trainer; its scrapes time out and NodeDown goes pending."""
    node = stack.nodes[2]
    expr = next(rule["expr"] for rule in alert_rules() if rule["alert"] == "GossiptrainNodeDown")
    os.kill(node.process.pid, signal.SIGSTOP)
    try:
        down = poll(lambda: stack.query(expr), timeout=30, interval=0.5, what="up == 0 for the frozen node")
        assert [series["metric"]["instance"] for series in down] == [f"127.0.0.1:{node.metrics_port}"]
        pending = poll(lambda: [a for a in stack.api("/api/v1/alerts")["alerts"]
                                if a["labels"]["alertname"] == "GossiptrainNodeDown"],
                       timeout=30, interval=0.5, what="the NodeDown alert to go pending")
        assert pending[0]["state"] == "pending" and pending[0]["labels"]["severity"] == "critical"
    finally:
        os.kill(node.process.pid, signal.SIGCONT)
    poll(lambda: not stack.query(expr), timeout=30, interval=0.5, what="the node to answer scrapes again")
