"""Alert rules under promtool: they load, every group's unit tests pass, every alert is
tested both firing and silent, and the rules only use metrics watchdogd exports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import need, which
from watchdogd.metrics import Metrics

pytestmark = pytest.mark.integration

CONFIG = Path(__file__).resolve().parents[2] / "config"
RULES = CONFIG / "alerts.yml"


def promtool() -> str:
    return need("promtool (Debian package prometheus)", which("promtool"))


def groups() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    result: list[dict[str, Any]] = data["groups"]
    return result


def unit_test_file(group: str) -> Path:
    return CONFIG / f"alerts-test-{group.removeprefix('watchdogd-')}.yml"


def test_rules_pass_promtool_check() -> None:
    proc = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    count = sum(len(g["rules"]) for g in groups())
    assert f"SUCCESS: {count} rules found" in proc.stdout


@pytest.mark.parametrize("group", [g["name"] for g in groups()])
def test_group_unit_tests_pass(group: str) -> None:
    path = unit_test_file(group)
    assert path.exists(), f"{group}: no promtool test file {path.name}"
    proc = subprocess.run(
        [promtool(), "test", "rules", path.name],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=CONFIG,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@pytest.mark.parametrize("group", [g["name"] for g in groups()])
def test_every_alert_is_tested_firing_and_silent(group: str) -> None:
    rules = next(g for g in groups() if g["name"] == group)["rules"]
    tests = yaml.safe_load(unit_test_file(group).read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    fired: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {r["alert"] for r in rules}
    assert names - fired == set(), "alerts never shown firing"
    assert names - silent == set(), "alerts never shown staying silent"


def test_rules_are_labelled_annotated_and_use_real_metrics() -> None:
    families = list(Metrics("c", fleet=True).registry.collect())
    exported = {m.name for m in families} | {s.name for m in families for s in m.samples}
    seen = set()
    for group in groups():
        for rule in group["rules"]:
            name = rule["alert"]
            assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
            annotations = rule["annotations"]
            assert set(annotations) == {"summary", "description", "runbook"}, name
            assert all(v.strip() for v in annotations.values()), name
            used = set(re.findall(r"\bwatchdogd_[a-z_]+", rule["expr"]))
            missing = {m for m in used if m not in exported}
            assert missing == set(), f"{name} uses metrics watchdogd does not export: {missing}"
            seen |= used
    assert {"watchdogd_primary_down_seconds", "watchdogd_failovers_total"} <= seen
