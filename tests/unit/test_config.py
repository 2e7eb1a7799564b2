"""The config contract: the issue's example parses; every bad input is one path-named line."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from watchdogd import config
from watchdogd.config import ConfigError, parse_duration, parse_size

EXAMPLE = Path(__file__).parents[2] / "config" / "example.yml"


def base() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return data


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.parse(data)
    return info.value.problems


def test_example_parses_with_contract_names() -> None:
    cfg = config.parse(base())
    assert cfg.cluster == "orders" and cfg.primary.name == "main"
    assert cfg.standby.database.dsn.endswith(":5433/postgres")
    assert cfg.probe.interval == 1.0 and cfg.probe.timeout == 0.5
    assert cfg.failover.outage_threshold == 5.0 and cfg.failover.max_lag == 16_000_000
    assert cfg.failover.cooldown == 3600.0
    assert [s.name for s in cfg.failover.steps] == [
        "primary_maintenance_on",
        "stop_replication",
        "promote_standby",
        "standby_maintenance_off",
        "switch_traffic",
    ]
    first = cfg.failover.steps[0]
    assert (first.required, first.timeout, first.retries) == (False, 5.0, 2)
    assert first.params["json"] == {"enabled": True}
    assert cfg.failover.steps[2].timeout == 30.0 and cfg.failover.steps[2].required
    assert (cfg.metrics.host, cfg.metrics.port) == ("127.0.0.1", 9644)


def test_default_steps_when_omitted() -> None:
    data = base()
    del data["failover"]["steps"]
    assert [s.action for s in config.parse(data).failover.steps] == ["stop_replication", "promote"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: d["failover"]["steps"][2].update(timeout="soon"),
            "failover.steps[2].timeout: expected a duration like 5s, got 'soon'",
        ),
        (lambda d: d.update(colour="blue"), "colour: unknown key"),
        (
            lambda d: d["primary"]["database"].update(engine="oracle"),
            "primary.database.engine: unknown engine 'oracle'",
        ),
        (
            lambda d: d["failover"].update(max_lag="lots"),
            "failover.max_lag: expected a size like 16MB, got 'lots'",
        ),
        (
            lambda d: d["failover"].update(mode="yolo"),
            "failover.mode: expected one of automatic, manual, got 'yolo'",
        ),
        (
            lambda d: d["failover"]["steps"][0].update(action="teleport"),
            "failover.steps[0].action: unknown action 'teleport'",
        ),
        (
            lambda d: d["failover"]["steps"][4].update(argv=["x", "{standby.nmae}"]),
            "failover.steps[4].argv[1]: unknown placeholder {standby.nmae}",
        ),
        (
            lambda d: d["failover"]["steps"][1].update(retires=2),
            "failover.steps[1].retires: unknown key",
        ),
        (
            lambda d: d["probe"].update(timeout="2s"),
            "probe.timeout: must be shorter than probe.interval (1s)",
        ),
        (lambda d: d["standby"].update(name="main"), "standby: must differ from primary.name"),
        (
            lambda d: d["control"].update(mode="0666"),
            "control.mode: must not give rights to others",
        ),
        (lambda d: d["metrics"].update(listen="nowhere"), "metrics.listen: expected host:port"),
        (lambda d: d.pop("cluster"), "cluster: is required"),
        (
            lambda d: d["failover"]["steps"][3].update(name="promote_standby"),
            "failover.steps[3].name: duplicate step name 'promote_standby'",
        ),
    ],
)
def test_each_problem_is_one_path_named_line(mutate: Any, expected: str) -> None:
    data = base()
    mutate(data)
    found = problems(data)
    assert any(p.startswith(expected) for p in found), found
    assert all("\n" not in p for p in found)


def test_all_problems_reported_at_once() -> None:
    data = base()
    data["probe"]["interval"] = "fast"
    data["failover"]["cooldown"] = 5
    data["extra"] = 1
    found = problems(data)
    assert len(found) >= 3


def test_env_secrets_resolved_and_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPASS_T", "s3cret-pass")
    data = base()
    data["primary"]["database"]["dsn"] = "postgresql://postgres:${PGPASS_T}@127.0.0.1:5432/x"
    cfg = config.parse(data)
    assert "s3cret-pass" in cfg.primary.database.dsn and "s3cret-pass" in cfg.secrets
    assert cfg.mask(cfg.primary.database.dsn) == "postgresql://postgres:***@127.0.0.1:5432/x"
    data = copy.deepcopy(data)
    data["primary"]["database"]["dsn"] = "postgresql://postgres:${NOPE_NOT_SET}@h:1/x"
    assert "primary.database.dsn: environment variable NOPE_NOT_SET is not set" in problems(data)


def test_durations_and_sizes() -> None:
    assert parse_duration("250ms") == 0.25 and parse_duration("2m") == 120
    assert parse_size("16MB") == 16_000_000 and parse_size("1GiB") == 2**30
    for bad in ("5", 5, "5 parsecs", "", None):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_check_config_cli(tmp_path: Path) -> None:
    good = subprocess.run(
        [sys.executable, "-m", "watchdogd.cli", "check-config", "--config", str(EXAMPLE)],
        capture_output=True,
        text=True,
    )
    assert good.returncode == 0, good.stderr
    data = base()
    data["failover"]["steps"][2]["timeout"] = "soon"
    data["bogus"] = True
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(data))
    bad = subprocess.run(
        [sys.executable, "-m", "watchdogd.cli", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert "failover.steps[2].timeout: expected a duration like 5s, got 'soon'" in lines
    assert "bogus: unknown key" in lines
    (tmp_path / "broken.yml").write_text("cluster: [unclosed\n")
    broken = subprocess.run(
        [
            sys.executable,
            "-m",
            "watchdogd.cli",
            "check-config",
            "--config",
            str(tmp_path / "broken.yml"),
        ],
        capture_output=True,
        text=True,
    )
    assert broken.returncode == 2 and "not valid YAML" in broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 1


def test_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "watchdogd.cli", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("watchdogd ")
