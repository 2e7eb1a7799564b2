"""The systemd unit and sysusers snippet: systemd's own tools accept them without a single
warning, the hardening scores well, and the settings the daemon relies on are there."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REQUIRE, need, which
from watchdogd.core.units import parse_duration
from watchdogd.systemd import SystemdNotifier

pytestmark = pytest.mark.integration

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
UNIT = SYSTEMD / "watchdogd.service"
SYSUSERS = SYSTEMD / "watchdogd.sysusers"
EXEC = "/usr/local/bin/watchdogd"
# Overall exposure as systemd-analyze security rates it: 0 (locked down) .. 10 (unsafe).
MAX_EXPOSURE = 2.0


def settings(text: str) -> dict[str, list[str]]:
    """[Service]/[Unit]/[Install] keys -> values, keeping repeated keys in order."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key}", []).append(value)
    return found


def one(found: dict[str, list[str]], key: str) -> str:
    values = found.get(key, [])
    assert len(values) == 1, f"{key}: expected one value, got {values}"
    return values[0]


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at a binary that exists here (verify checks it)."""
    local = Path(sys.executable).parent / "watchdogd"
    binary = local if local.exists() else Path(need("true(1)", which("true")))
    text = UNIT.read_text()
    assert f"ExecStart={EXEC} " in text
    path = tmp_path / "watchdogd.service"
    path.write_text(text.replace(f"ExecStart={EXEC} ", f"ExecStart={binary} "))
    return path


def verify(path: Path) -> list[str]:
    analyze = need("systemd-analyze", which("systemd-analyze"))
    proc = subprocess.run(
        [analyze, "verify", "--man=no", str(path)], capture_output=True, text=True, timeout=60
    )
    # Exit status stays 0 on unknown keys and bad values: the messages are what count.
    messages = [line for line in (proc.stdout + proc.stderr).splitlines() if path.name in line]
    if proc.returncode != 0 and not messages:
        messages = [f"exit {proc.returncode}: {proc.stderr.strip()}"]
    return messages


def test_systemd_analyze_verify_has_nothing_to_say(unit_copy: Path) -> None:
    assert verify(unit_copy) == []


def test_verify_check_does_catch_warnings(unit_copy: Path) -> None:
    # The check above could pass by not seeing anything; a broken copy proves it sees.
    unit_copy.write_text(
        unit_copy.read_text().replace("NoNewPrivileges=yes", "NoNewPrivileges=maybe\nBogus=1")
    )
    messages = verify(unit_copy)
    assert any("Failed to parse boolean value" in m for m in messages), messages
    assert any("Unknown key" in m and "Bogus" in m for m in messages), messages


def test_hardening_exposure_score(unit_copy: Path) -> None:
    analyze = need("systemd-analyze", which("systemd-analyze"))
    proc = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit_copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    if match is None:
        message = f"systemd-analyze security --offline unsupported here: {proc.stderr.strip()}"
        if REQUIRE:
            pytest.fail(message + " [WATCHDOGD_REQUIRE_INTEGRATION=1]")
        pytest.skip(message)
    score = float(match.group(1))
    print(f"systemd-analyze security exposure: {score}")
    assert score <= MAX_EXPOSURE, proc.stdout


def test_unit_settings_the_daemon_relies_on() -> None:
    s = settings(UNIT.read_text())
    assert one(s, "Service.Type") == "notify"
    assert one(s, "Service.NotifyAccess") == "main"
    assert one(s, "Service.ExecStart") == f"{EXEC} run --config /etc/watchdogd/watchdogd.yml"
    assert one(s, "Service.ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(s, "Service.Restart") == "on-failure"
    assert (one(s, "Service.User"), one(s, "Service.Group")) == ("watchdogd", "watchdogd")
    assert one(s, "Service.RuntimeDirectory") == "watchdogd"
    assert one(s, "Service.RuntimeDirectoryMode") == "0750"
    assert one(s, "Service.StateDirectory") == "watchdogd"
    # Long enough for a step (30s default timeout, with retries) to finish on stop.
    assert parse_duration(one(s, "Service.TimeoutStopSec")) >= 300
    assert one(s, "Service.KillMode") == "mixed"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RestrictNamespaces": "yes",
    }.items():
        assert one(s, f"Service.{key}") == value, key
    assert s["Service.SystemCallFilter"][0] == "@system-service"
    # PrivateUsers would map every watchdogctl peer to "nobody", defeating the control
    # socket's SO_PEERCRED allow lists.
    assert "Service.PrivateUsers" not in s
    assert one(s, "Install.WantedBy") == "multi-user.target"


def test_watchdog_interval_matches_the_unit() -> None:
    seconds = parse_duration(one(settings(UNIT.read_text()), "Service.WatchdogSec"))
    # What systemd puts in the environment for this unit, and what the daemon derives.
    env = {"WATCHDOG_USEC": str(int(seconds * 1_000_000))}
    interval = SystemdNotifier(environ=env).watchdog_interval()
    assert interval == seconds / 2
    assert 1 <= interval <= 30


def test_sysusers_snippet_creates_the_service_user(tmp_path: Path) -> None:
    sysusers = need("systemd-sysusers", which("systemd-sysusers"))
    proc = subprocess.run(
        [sysusers, "--dry-run", f"--root={tmp_path}", str(SYSUSERS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Creating user 'watchdogd'" in output
    assert SYSUSERS.name not in output  # no parse complaints about our file


TMPFILES = SYSTEMD / "watchdogd.tmpfiles"


def test_secrets_come_as_credentials_and_operators_get_their_own_group() -> None:
    # Issue 15: read-only operators must not need group watchdogd (it can read the
    # config), and secrets reach the daemon only, through systemd credentials.
    s = settings(UNIT.read_text())
    assert one(s, "Service.LoadCredential") == "secret:/etc/watchdogd/credentials"
    assert one(s, "Service.SupplementaryGroups") == "watchdogctl"
    assert one(s, "Service.Group") == "watchdogd"


def test_sysusers_snippet_creates_the_operators_group(tmp_path: Path) -> None:
    sysusers = need("systemd-sysusers", which("systemd-sysusers"))
    proc = subprocess.run(
        [sysusers, "--dry-run", f"--root={tmp_path}", str(SYSUSERS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Creating group 'watchdogctl'" in output
    assert SYSUSERS.name not in output


def test_tmpfiles_snippet_makes_a_root_only_credentials_directory(tmp_path: Path) -> None:
    tmpfiles = need("systemd-tmpfiles", which("systemd-tmpfiles"))
    proc = subprocess.run(
        [tmpfiles, "--create", f"--root={tmp_path}", str(TMPFILES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert TMPFILES.name not in proc.stdout + proc.stderr
    creds = tmp_path / "etc" / "watchdogd" / "credentials"
    assert creds.is_dir() and (creds.stat().st_mode & 0o777) == 0o700
