"""The Prometheus config, the alert rules and their promtool unit tests (ops/prometheus/) are valid and consistent.

promtool checks the config and the rules and runs the rule unit tests; the rest checks that every alert is
exercised by the unit tests and that every metric the rules read is one a real node exports.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "ops" / "prometheus"
CONFIG = PROM_DIR / "prometheus.yml"
RULES = PROM_DIR / "rules" / "gossiptrain.yml"
RULE_TESTS = PROM_DIR / "tests" / "gossiptrain.test.yml"


def _promtool(*args: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not on PATH: run `bash ops/install-test-deps.sh` to install it")
    cmd = [promtool, *args]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )


def _alert_rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    rules = [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]
    assert rules, f"no alert rules in {RULES}"
    return rules


def test_promtool_check_config() -> None:
    _promtool("check", "config", str(CONFIG.relative_to(ROOT)))


def test_promtool_check_rules() -> None:
    _promtool("check", "rules", str(RULES.relative_to(ROOT)))


def test_promtool_rule_unit_tests_pass() -> None:
    _promtool("test", "rules", str(RULE_TESTS.relative_to(ROOT)))


def test_rule_test_file_loads_the_rules_file() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    loaded = {(RULE_TESTS.parent / path).resolve() for path in doc["rule_files"]}
    assert RULES.resolve() in loaded, f"{RULE_TESTS} does not load {RULES} (rule_files: {doc['rule_files']})"


def test_every_alert_has_a_firing_and_a_quiet_test_case() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    cases = [case for test in doc["tests"] for case in test.get("alert_rule_test", [])]
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    alerts = {rule["alert"] for rule in _alert_rules()}
    assert not alerts - firing, f"alerts without a test case where they fire: {sorted(alerts - firing)}"
    assert not alerts - quiet, f"alerts without a test case where they stay quiet: {sorted(alerts - quiet)}"
    unknown = {case["alertname"] for case in cases} - alerts
    assert not unknown, f"test cases for alerts the rules file does not define: {sorted(unknown)}"


def test_alerts_have_for_severity_and_annotations() -> None:
    for rule in _alert_rules():
        name = rule["alert"]
        assert "for" in rule, f"{name}: no `for`"
        assert rule.get("labels", {}).get("severity") in ("warning", "critical"), f"{name}: bad severity"
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), f"{name}: no summary"
        description = annotations.get("description", "")
        assert "$value" in description, f"{name}: the description must give the value: {description!r}"
        if "count(" not in rule["expr"]:  # swarm-wide alerts (a count over nodes) have no instance
            assert "$labels.instance" in description, f"{name}: the description must name the instance"
        assert annotations.get("runbook"), f"{name}: no runbook hint"


_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def _metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are no function, keyword, label or label value."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, label_replace args)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subquery steps
    text = re.sub(r"\b(?:on|ignoring|by|without|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        if word.lower() in _KEYWORDS or text[match.end():].lstrip().startswith("("):
            continue  # a keyword or a function call
        names.add(word)
    return names


def test_metric_name_extraction() -> None:
    expr = ('label_replace(a_b{job="x"} != a_b{job="x"} or c == -Inf, "l", "v", "", "")\n'
            'or increase(d_total{r="ok"}[15m]) > 0 and on(job, instance) (time() - e) > 900 unless f[1h:1m]')
    assert _metric_names(expr) == {"a_b", "c", "d_total", "e", "f"}


def test_rules_only_use_metrics_a_node_exports(exported_metric_names) -> None:
    exported = exported_metric_names  # `up` included: written by Prometheus for every target
    used: dict[str, set[str]] = {}
    for rule in _alert_rules():
        for name in _metric_names(rule["expr"]):
            used.setdefault(name, set()).add(rule["alert"])
    assert used, "no metric names found in the rule expressions"
    missing = {name: sorted(alerts) for name, alerts in used.items() if name not in exported}
    assert not missing, f"metrics used by alert rules but not exported by a node: {missing}"
