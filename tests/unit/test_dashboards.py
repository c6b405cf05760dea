"""Structure of the Grafana provisioning and dashboards in ops/grafana (no network, no Grafana).

Every query must be well formed, use only the `instance` template variable or Grafana built-ins, and name
only metrics a node really exports (read from a fresh NodeMetrics registry), so a dashboard cannot silently
show "No data" because a metric was renamed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "ops" / "grafana"
DASHBOARDS = {"swarm-overview.json": "gossiptrain-swarm", "node-drilldown.json": "gossiptrain-node"}
DATASOURCE_UID = "prometheus"
MOUNT = "/var/lib/grafana/dashboards"  # where docker-compose mounts ops/grafana/dashboards
BUILTINS = {"__rate_interval", "__range", "__interval"}
VARIABLE_QUERY = "label_values(gossiptrain_info, instance)"
# values a live check substitutes for the variables (and what promtool gets below)
SUBSTITUTE = {"instance": ".+", "__rate_interval": "30s", "__range": "5m", "__interval": "5s"}

STRING = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'")
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
VARIABLE = re.compile(r"\$\{([A-Za-z0-9_]+)(?::[^}]*)?\}|\$([A-Za-z0-9_]+)")


def load(name: str) -> dict:
    return json.loads((GRAFANA / "dashboards" / name).read_text())


def panels(board: dict) -> list[dict]:
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return out


def exprs() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr) of every target of every panel of both dashboards."""
    return [(name, panel.get("title", ""), target.get("expr", ""))
            for name in DASHBOARDS for panel in panels(load(name)) for target in panel.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """Metric names an expr selects: identifiers gossiptrain_*, process_* or `up` outside string literals."""
    bare = STRING.sub('""', expr)
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # range durations ([30s], [$__rate_interval])
    bare = VARIABLE.sub("", bare)
    return {name for name in IDENT.findall(bare)
            if name.startswith(("gossiptrain_", "process_")) or name == "up"}


def test_dashboards_parse_and_have_the_expected_uids():
    uids = [load(name)["uid"] for name in DASHBOARDS]
    assert uids == list(DASHBOARDS.values())
    assert len(set(uids)) == len(uids)
    assert load("swarm-overview.json")["title"] == "gossiptrain / swarm overview"
    assert load("node-drilldown.json")["title"] == "gossiptrain / node"
    for name in DASHBOARDS:
        board = load(name)
        assert board["schemaVersion"] == 39
        assert board["panels"], name


def test_every_panel_is_placed_identified_and_uses_the_provisioned_datasource():
    for name in DASHBOARDS:
        seen_ids = set()
        for panel in panels(load(name)):
            where = f"{name}: {panel.get('title')!r}"
            assert panel.get("type"), where
            grid = panel.get("gridPos", {})
            assert {"h", "w", "x", "y"} <= grid.keys(), where
            assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, where
            assert isinstance(panel.get("id"), int) and panel["id"] not in seen_ids, where
            seen_ids.add(panel["id"])
            assert panel.get("datasource") == {"type": "prometheus", "uid": DATASOURCE_UID}, where
            targets = panel.get("targets", [])
            assert targets, where
            ref_ids = [target.get("refId") for target in targets]
            assert all(ref_ids) and len(set(ref_ids)) == len(ref_ids), where
            for target in targets:
                assert target.get("datasource") == {"type": "prometheus", "uid": DATASOURCE_UID}, where
                assert isinstance(target.get("expr"), str) and target["expr"].strip(), where


def test_panels_do_not_overlap():
    for name in DASHBOARDS:
        cells: dict[tuple[int, int], str] = {}
        for panel in panels(load(name)):
            g = panel["gridPos"]
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"{name}: {panel['title']!r} overlaps {cells[(x, y)]!r}"
                    cells[(x, y)] = panel["title"]


def test_instance_variable():
    for name, multi in (("swarm-overview.json", True), ("node-drilldown.json", False)):
        variables = load(name)["templating"]["list"]
        assert [v["name"] for v in variables] == ["instance"], name
        var = variables[0]
        assert var["type"] == "query"
        assert var["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        assert query == VARIABLE_QUERY and var["definition"] == VARIABLE_QUERY
        assert var["multi"] is multi and var["includeAll"] is multi, name
        if multi:
            assert var["allValue"] == ".+"


def test_queries_use_only_known_variables_and_filter_by_instance():
    for name, title, expr in exprs():
        used = {a or b for a, b in VARIABLE.findall(expr)}
        assert used <= {"instance"} | BUILTINS, f"{name}: {title!r}: {sorted(used)}"
        # every selector of a node's metric is narrowed to the selected node(s)
        for metric, labels in re.findall(r"\b(gossiptrain_\w+|process_\w+|up)\b(\{[^}]*\})?", expr):
            assert 'instance=~"$instance"' in labels, f"{name}: {title!r}: {metric} is not filtered by $instance"


def test_queries_name_only_exported_metrics(exported_metric_names):
    exported = exported_metric_names
    assert "gossiptrain_exchanges_total" in exported and "gossiptrain_round_seconds_bucket" in exported
    used = set()
    for name, title, expr in exprs():
        names = metric_names(expr)
        assert names, f"{name}: {title!r}: no metric in {expr!r}"
        unknown = names - exported
        assert not unknown, f"{name}: {title!r}: not exported by a node: {sorted(unknown)}"
        used |= names
    # the dashboards cover the node's main signals
    for metric in ("gossiptrain_round", "gossiptrain_eval_loss", "gossiptrain_exchanges_total",
                   "gossiptrain_audit_verdicts_total", "gossiptrain_checkpoint_last_success_timestamp",
                   "process_resident_memory_bytes", "process_cpu_seconds_total", "up"):
        assert metric in used, metric


def test_metric_name_parser():
    expr = ('histogram_quantile(0.9, sum by (le, instance) (rate(gossiptrain_sync_wait_seconds_bucket'
            '{instance=~"$instance", kind="gossiptrain_not_a_metric"}[$__rate_interval]))) + sum(up{job="x"})')
    assert metric_names(expr) == {"gossiptrain_sync_wait_seconds_bucket", "up"}


def test_drilldown_is_linked_from_the_overview():
    overview, node = load("swarm-overview.json"), load("node-drilldown.json")
    assert any("/d/gossiptrain-node" in link.get("url", "") for link in overview["links"])
    assert any("/d/gossiptrain-swarm" in link.get("url", "") for link in node["links"])


def test_queries_are_valid_promql():
    """promtool parses every expr (variables substituted as Grafana would)."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed: run `bash ops/install-test-deps.sh`"
    rules = []
    for i, (_name, _title, expr) in enumerate(exprs()):
        for variable, value in SUBSTITUTE.items():
            expr = expr.replace(f"${{{variable}}}", value).replace("$" + variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    with tempfile.TemporaryDirectory() as tmp:
        rule_file = Path(tmp) / "dashboards.yml"
        rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
        result = subprocess.run([promtool, "check", "rules", str(rule_file)], capture_output=True, text=True,
                                timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_datasource_provisioning_matches_the_dashboards():
    config = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert config["apiVersion"] == 1
    [source] = config["datasources"]
    assert source["name"] == "Prometheus" and source["uid"] == DATASOURCE_UID and source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090" and source["access"] == "proxy"
    assert source["isDefault"] is True and source["editable"] is False
    uids = {panel["datasource"]["uid"] for name in DASHBOARDS for panel in panels(load(name))}
    assert uids == {source["uid"]}


def test_dashboard_provider_reads_the_mounted_directory():
    config = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "gossiptrain.yml").read_text())
    assert config["apiVersion"] == 1
    [provider] = config["providers"]
    assert provider["type"] == "file" and provider["folder"] == "gossiptrain"
    assert provider["options"]["path"] == MOUNT


def test_compose_mounts_the_dashboards_where_the_provider_reads_them():
    compose_file = ROOT / "docker-compose.yml"
    services = yaml.safe_load(compose_file.read_text())["services"]
    mounts = []
    for service in services.values():
        for volume in service.get("volumes", []):
            if isinstance(volume, str):
                source, _, rest = volume.partition(":")
                mounts.append((source, rest.split(":")[0]))
            else:
                mounts.append((volume.get("source", ""), volume.get("target", "")))
    sources = [source for source, target in mounts if target.rstrip("/") == MOUNT]
    assert sources, f"{compose_file.name} mounts nothing at {MOUNT}"
    assert (compose_file.parent / sources[0]).resolve() == (GRAFANA / "dashboards").resolve()
