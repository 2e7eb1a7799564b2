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
from watchdogd.config import ConfigError
from watchdogd.core.secrets import mask
from watchdogd.core.units import parse_duration, parse_size

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


# --------------------------------------------------------------------------- issue 15


def test_problems_show_the_env_reference_not_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODE_T", "hunter2-mode")
    monkeypatch.setenv("TOKEN_T", "tok-9f8e7d")
    data = base()
    data["failover"]["mode"] = "${MODE_T}"
    data["primary"]["app"]["health_url"] = "ftp://u:${TOKEN_T}@example.com/health"
    found = problems(data)
    text = "\n".join(found)
    assert "hunter2-mode" not in text and "tok-9f8e7d" not in text, found
    assert "failover.mode: expected one of automatic, manual, got '${MODE_T}'" in found
    assert (
        "primary.app.health_url: expected an http(s) URL, got 'ftp://u:${TOKEN_T}@example.com/health'"
        in found
    )


def test_check_config_prints_references_not_secrets(tmp_path: Path) -> None:
    data = base()
    data["failover"]["mode"] = "${MODE_T}"
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(data))
    env = {"PATH": "/usr/bin:/bin", "MODE_T": "hunter2-mode"}
    bad = subprocess.run(
        [sys.executable, "-m", "watchdogd.cli", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2
    assert "hunter2-mode" not in bad.stderr + bad.stdout
    assert "got '${MODE_T}'" in bad.stderr


def test_secrets_too_short_to_mask_are_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SHORT_T", "ab")
    data = base()
    data["primary"]["database"]["dsn"] = "postgresql://postgres:${SHORT_T}@127.0.0.1:5432/x"
    found = problems(data)
    assert any(
        p.startswith("primary.database.dsn: environment variable SHORT_T is shorter than 3")
        for p in found
    ), found
    assert not any("'ab'" in p or ":ab@" in p for p in found)
    (tmp_path / "pw").write_text("x\n")
    data = base()
    data["primary"]["database"]["password_file"] = str(tmp_path / "pw")
    found = problems(data)
    assert any(
        p.startswith("primary.database.password_file: a secret shorter than 3 characters")
        for p in found
    ), found


def test_file_secret_from_systemd_credentials(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "pg-password").write_text("pg-s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    data = base()
    data["primary"]["database"]["password_file"] = "${CREDENTIALS_DIRECTORY}/pg-password"
    cfg = config.parse(data)
    assert cfg.primary.database.options["password"] == "pg-s3cret"
    # The directory is a path, not a secret: messages naming it stay readable.
    assert str(creds) not in cfg.secrets and "pg-s3cret" in cfg.secrets
    data["standby"]["database"]["password_file"] = "${CREDENTIALS_DIRECTORY}/missing"
    assert (
        f"standby.database.password_file: cannot read {creds}/missing: No such file or directory"
        in problems(data)
    )


def test_mask_covers_percent_encoded_and_json_escaped_forms() -> None:
    secret = 'p@ss w/rd"\\'
    text = (
        f"raw {secret} url http://x/?t=p%40ss%20w%2Frd%22%5C "
        'form p%40ss+w%2Frd%22%5C json {"t": "p@ss w/rd\\"\\\\"}'
    )
    masked = mask(text, {secret})
    assert masked == 'raw *** url http://x/?t=*** form *** json {"t": "***"}', masked


def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    path = tmp_path / "bomb.yml"
    path.write_text("\n".join(lines) + "\ncluster: orders\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.problems == [
        f"{path}: config expands to more than 100000 values "
        "(YAML aliases repeating aliases?); write it out plainly"
    ]


def test_oversized_config_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yml"
    path.write_text("# " + "x" * (2 * 1024 * 1024) + "\ncluster: orders\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.problems == [f"{path}: config is larger than 1024 KiB"]


def test_control_group() -> None:
    data = base()
    data["control"]["group"] = "watchdogctl"
    assert config.parse(data).control.group == "watchdogctl"
    assert config.parse(base()).control.group is None
    data["control"]["group"] = "bad group;"
    assert "control.group: expected a group name, got 'bad group;'" in problems(data)


def test_a_step_secret_with_braces_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # It would be parsed as a placeholder: changed when rendered, then no longer masked.
    monkeypatch.setenv("BRACE_T", "p{w}d-s3cret")
    data = base()
    data["failover"]["steps"][0]["headers"] = {"Authorization": "Bearer ${BRACE_T}"}
    found = problems(data)
    assert found == [
        "failover.steps[0].headers.Authorization: environment variable BRACE_T contains a "
        "brace, which a step would read as a {placeholder}; use a value without braces"
    ]
    # Elsewhere a brace is just a character.
    data = base()
    data["primary"]["database"]["dsn"] = "postgresql://postgres:${BRACE_T}@127.0.0.1:5432/x"
    assert "p{w}d-s3cret" in config.parse(data).primary.database.dsn


def test_an_apps_maintenance_page_needs_a_url_and_the_text_it_shows() -> None:
    data = base()
    data["standby"]["app"] = {
        "health_url": "http://10.0.1.5/health",
        "maintenance": {"url": "http://10.0.1.5/maintenance", "contains": "down for maintenance"},
    }
    cfg = config.parse(data)
    assert cfg.standby.app is not None and cfg.standby.app.maintenance is not None
    assert cfg.standby.app.maintenance.contains == "down for maintenance"
    data["standby"]["app"]["maintenance"] = {"url": "10.0.1.5/maintenance", "contains": ""}
    assert problems(data) == [
        "standby.app.maintenance.url: expected an http(s) URL, got '10.0.1.5/maintenance'",
        "standby.app.maintenance.contains: must not be empty",
    ]
