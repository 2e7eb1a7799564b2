"""Issue 13: a daemon pays only for what its config uses. A PostgreSQL-only config (no
app, no HTTP step, no webhook, metrics on) starts, probes, serves /metrics and stops
without loading an HTTP client, the other engines' drivers, the unused action modules or
rich; a config with an app probe does load aiohttp (so the check can see it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

MUST_NOT_LOAD = (
    "aiohttp",
    "redis",
    "aiomysql",
    "pymysql",
    "dns",
    "rich",
    "colorama",
    "watchdogd.engines.redis",
    "watchdogd.engines.mysql",
    "watchdogd.actions.http",
    "watchdogd.actions.command",
    "watchdogd.actions.dns",
    "watchdogd.actions.haproxy",
    "watchdogd.actions.cloud66",
    "watchdogd.probes.app",
    "watchdogd.probes.witness",
    "watchdogd.daemon.page",  # the status page: loaded by its first visit
)

# Build the daemon from the config, start it, let one probe cycle run (the databases are
# a closed port: the probes fail), scrape /metrics, stop; report what was loaded.
SCRIPT = """
import asyncio, json, sys
from watchdogd import config
from watchdogd.daemon import Daemon
from watchdogd.metrics import bound_port

async def main():
    d = Daemon(config.load(sys.argv[1]))
    await d.start()
    try:
        while d.last_cycle_wall is None:
            await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", bound_port(d._http))
        writer.write(b"GET /metrics HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
        reply = await reader.read()
        writer.close()
    finally:
        await d.stop()
    return reply.split(b"\\r\\n", 1)[0].decode()

status = asyncio.run(main())
print(json.dumps({"status": status, "modules": sorted(sys.modules)}))
"""


def start_and_report(tmp: Path, port: int, **extra: Any) -> dict[str, Any]:
    db = f"postgresql://watchdogd@127.0.0.1:{port}/postgres"
    cfg: dict[str, Any] = {
        "cluster": "c",
        "primary": {"name": "a", "database": {"engine": "postgres", "dsn": db}},
        "standby": {"name": "b", "database": {"engine": "postgres", "dsn": db}},
        "probe": {"interval": "1s", "timeout": "200ms"},
        "metrics": {"listen": "127.0.0.1:0"},
        "control": {"socket": str(tmp / "run" / "control.sock")},
        "log": {"format": "json", "level": "warning"},
        "state_dir": str(tmp / "state"),
    }
    for role, keys in extra.items():
        cfg[role].update(keys)
    path = tmp / "watchdogd.yml"
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def loaded(report: dict[str, Any], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in report["modules"])


def test_a_postgres_only_daemon_loads_no_http_client_nor_unused_drivers(
    tmp_path: Path, closed_port: int
) -> None:
    report = start_and_report(tmp_path, closed_port)
    assert report["status"] == "HTTP/1.1 200 OK"
    assert "watchdogd.engines.postgres" in report["modules"]
    assert "watchdogd.actions.builtin" in report["modules"]  # the default steps' module
    assert [m for m in MUST_NOT_LOAD if loaded(report, m)] == []


def test_an_app_probe_loads_the_http_client_it_needs(tmp_path: Path, closed_port: int) -> None:
    app = {"app": {"health_url": f"http://127.0.0.1:{closed_port}/health"}}
    report = start_and_report(tmp_path, closed_port, primary=app)
    assert loaded(report, "aiohttp") and loaded(report, "watchdogd.probes.app")
    assert not loaded(report, "watchdogd.actions.http")  # no http step configured
