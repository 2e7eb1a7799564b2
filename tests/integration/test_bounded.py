"""A long run leaves nothing behind: hundreds of probe cycles against a real pair, with
the primary's link reset and refused through the fault proxy, a witness on a closed port
failing every cycle, control requests, pause/resume and reloads, end with as many asyncio
tasks, metric series and live objects as they started with. What ``bench/idle.py
--soak`` measures in RSS over tens of thousands of cycles, counted here."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import yaml

from tests.support.proxy import PASS, REFUSE, FaultProxy
from watchdogd import config
from watchdogd.control import request
from watchdogd.core.feed import RING
from watchdogd.daemon import Daemon
from watchdogd.demo.lab import PgPair

# Warm-up fills what is bounded but not empty at start: the live events' ring
# (watchdogd.core.feed, 100 events) holds about a third of its events at cycle 150 here
# and is full before cycle 500; counting from there, what still grows is a leak.
WARM, CYCLES = 500, 810  # not a multiple of 40: the last cycle reaches the primary


def write_config(path: Path, pair: PgPair, proxy: int, witness: int, flip: int) -> None:
    tmp = path.parent
    path.write_text(
        yaml.safe_dump(
            {
                "cluster": "bounded",
                "primary": {
                    "name": "main",
                    "database": {
                        "engine": "postgres",
                        # A new application name on each reload rebuilds the engine.
                        "dsn": f"postgresql://postgres@127.0.0.1:{proxy}/postgres"
                        f"?application_name=b{flip % 2}",
                    },
                },
                "standby": {
                    "name": "failover",
                    "database": {"engine": "postgres", "dsn": pair.standby.dsn},
                },
                "witnesses": [{"name": "w", "url": f"http://127.0.0.1:{witness}/primary"}],
                # One scheduled cycle at start, then the test drives them.
                "probe": {"interval": "1h", "timeout": "500ms"},
                "failover": {
                    "outage_threshold": "1h",
                    "steps": [{"name": "promote_standby", "action": "promote"}],
                },
                "metrics": {"enabled": False},
                "control": {"socket": str(tmp / "control.sock")},
                "log": {"format": "json", "level": "error"},
                "state_dir": str(tmp / "state"),
            }
        )
    )


def counts(d: Daemon) -> dict[str, Any]:
    gc.collect()
    series = sum(len(m.samples) for m in d.metrics.registry.collect())
    return {"tasks": len(asyncio.all_tasks()), "series": series, "objects": len(gc.get_objects())}


async def test_many_cycles_with_failures_and_reloads_leave_nothing_behind(
    pg_pair: PgPair, closed_port: int, tmp_path: Path
) -> None:
    path = tmp_path / "watchdogd.yml"
    async with FaultProxy(pg_pair.primary.port) as proxy:
        write_config(path, pg_pair, proxy.port, closed_port, 0)
        d = Daemon(config.load(str(path)))
        await d.start()
        sock = str(tmp_path / "control.sock")
        try:
            seen: dict[str, Any] = {}
            for n in range(1, CYCLES + 1):
                if n % 40 == 0:
                    proxy.set_mode(REFUSE)  # the probing connection is reset, reconnects refused
                elif n % 40 == 3:
                    proxy.set_mode(PASS)
                await d.cycle.run()
                if n % 10 == 0:
                    assert (await request(sock, "status"))["ok"]
                    assert (await request(sock, "history"))["ok"]
                if n % 50 == 0:
                    assert (await request(sock, "pause", {"reason": "bounded"}))["ok"]
                    assert (await request(sock, "resume"))["ok"]
                if n % 75 == 0:
                    write_config(path, pg_pair, proxy.port, closed_port, n // 75)
                    assert (await request(sock, "reload"))["ok"]
                if n == WARM:
                    assert len(d.feed.recent(RING)) == RING, "warm-up too short to fill the ring"
                    seen = counts(d)
            assert d.latest.primary_db is not None and d.latest.primary_db.ok
            after = counts(d)
        finally:
            await d.stop()
    assert after["tasks"] <= seen["tasks"], (seen, after)
    assert after["series"] == seen["series"], (seen, after)
    # One object kept per cycle would be 300 more; in-flight noise is a few dozen.
    assert after["objects"] - seen["objects"] < (CYCLES - WARM) // 2, (seen, after)
