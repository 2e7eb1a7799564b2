"""A watcher fleet for end-to-end tests (issue 12): three etcd members on loopback, a real
PostgreSQL pair from the lab, and three ``watchdogd run`` processes (dc1, dc2, dc3)
sharing one config apart from ``instance``, ``state_dir``, the control socket and the
metrics port.

Promotions are counted from the database itself (``timeline``: the standby's timeline
id, 1 until a promotion, 2 after one, 3 after a second) and from the journal in etcd
(``store_journal``), never from a watcher's own word.
"""

from __future__ import annotations

import asyncio
import copy
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from tests.support import timing
from tests.support.cluster import PG_TABLE, POSTGRES, PROFILES, Load, PgCluster
from tests.support.daemon import DaemonProcess, lab_config
from tests.support.etcd import EtcdCluster, etcd_cluster
from tests.support.redis import _die_with_parent
from watchdogd.demo.lab import PgPair, PgServer
from watchdogd.state.etcd import EtcdClient
from watchdogd.state.etcd_store import EtcdStore

NAMES = ("dc1", "dc2", "dc3")
PREFIX = "/watchdogd"
CLUSTER = "orders"

# Server profile x write load, as in the chaos matrix (tests/chaos/test_matrix.py): a
# scenario that depends on how the replication link behaves runs on the servers'
# shipped defaults (``stock``) as well as on the docs' settings (``tuned``), idle and
# under load. ``pg_pair`` takes the profile by indirect parametrization, e.g.
# ``@pytest.mark.parametrize(("pg_pair", "load"), CELLS, indirect=["pg_pair"])``;
# ids read ``[stock-idle]``.
IDLE, LOADED = "idle", "load"
CELLS = [
    pytest.param(profile, load, id=f"{profile}-{load}")
    for profile in PROFILES
    for load in (IDLE, LOADED)
]


def cells(*ids: str) -> list[Any]:
    """The CELLS named ``ids`` (e.g. ``"stock-idle"``), in that order."""
    by_id = {c.id: c for c in CELLS}
    return [by_id[i] for i in ids]


def write_load(pair: PgPair) -> Load:
    """The chaos matrix's steady write load (tests/support/cluster.py ``Load``: a small
    insert every 75 ms, each bounded) on ``pair``'s primary; ``running(enabled)`` runs
    it. Never closes the pair (the pair's fixture does)."""
    pair.primary.execute(f"CREATE TABLE IF NOT EXISTS {PG_TABLE} (note text PRIMARY KEY)")
    return Load(PgCluster(engine=POSTGRES, profile=pair.profile, pair=pair))


def reply_interval(pair: PgPair) -> float:
    """The standby's ``wal_receiver_status_interval`` in seconds (10 on ``stock``, 1 on
    ``tuned``): how often an idle standby replies, read from the standby."""
    raw = pair.standby.execute("SELECT setting FROM pg_settings "
                               "WHERE name = 'wal_receiver_status_interval'")  # fmt: skip
    return float(raw)


def fleet_config(
    pair: PgPair,
    tmp: Path,
    etcd: EtcdCluster,
    *,
    ttl: str = "5s",
    steps: list[dict[str, Any]] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """The shared config: fast probes (0.5 s, threshold 2 s), a 5 s lease, 300 ms per
    etcd attempt (3 endpoints: a 0.9 s retry budget; 1.7 + 1.8 + 0.5 <= 5), and steps
    short enough to fit in the leader's authority."""
    cfg = lab_config(pair, tmp, interval="500ms", timeout="300ms", threshold="2s", **overrides)
    cfg["failover"]["steps"] = steps or [
        {"name": "stop_replication", "action": "stop_replication", "timeout": "2s"},
        {"name": "promote_standby", "action": "promote", "timeout": "2s"},
    ]
    cfg["failover"]["rejoin_steps"] = [{"name": "rejoin", "action": "rejoin", "timeout": "2s"}]
    cfg["failover"]["rejoin_timeout"] = "2s"
    cfg["store"] = {
        "etcd": {"endpoints": etcd.endpoints, "prefix": PREFIX, "ttl": ttl, "timeout": "300ms"},
        "voters": list(NAMES),
    }
    return cfg


GUARD_ALIVE = f"{PREFIX}/{CLUSTER}/guard/alive"
# The guard's log line whenever the set of watchers vouching for its primary changes
# (``vouching``: their names, ``counted``: a strict majority it counts as a sign of life).
VOUCHING = "guard: the watchers vouching for its primary changed"


def vouch_urls(watchers: dict[str, DaemonProcess]) -> dict[str, str]:
    """``guard.watchers`` for ``watchers``: each one's metrics base URL as it runs now."""
    return {name: "http://{}".format(d.cfg["metrics"]["listen"]) for name, d in watchers.items()}


def vouched_by(shared: dict[str, Any], watchers: dict[str, DaemonProcess]) -> dict[str, str]:
    """Set ``guard.watchers`` to ``watchers``' metrics addresses in the shared config
    (before ``add_guard``) and in each watcher's own config file (the same file on
    every host: the fleet's digest covers the names listed); the map set."""
    urls = vouch_urls(watchers)
    shared["guard"]["watchers"] = dict(urls)
    for d in watchers.values():
        d.cfg["guard"]["watchers"] = dict(urls)
        d.write_config(d.cfg)
    return urls


@dataclass
class GuardProcess:
    """``watchdogd guard --config FILE --node NODE`` as its own process, with its own
    config file (the fleet's, its etcd endpoints possibly through fault proxies); its
    JSON log in ``log_path``. Dies with the test process (PDEATHSIG). ``prefix``: an argv
    prefix it is started through (``ip netns exec NS``: tests/support/netns.py)."""

    cfg: dict[str, Any]
    node: str
    base: Path
    proc: subprocess.Popen[bytes] | None = None
    prefix: tuple[str, ...] = ()

    @property
    def config_path(self) -> Path:
        return self.base / "guard.yml"

    @property
    def log_path(self) -> Path:
        return self.base / "guard.log"

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.cfg))
        with self.log_path.open("ab") as log:
            argv = [*self.prefix, sys.executable, "-m", "watchdogd.cli", "guard"]
            argv += ["--config", str(self.config_path), "--node", self.node]
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def restart_if_watchers_moved(self, watchers: dict[str, DaemonProcess]) -> bool:
        """A watcher whose metrics port was taken when it started listens elsewhere
        (``DaemonProcess.start``): a guard started before them asks the old address.
        Then it is restarted on where they listen now (True)."""
        urls = vouch_urls(watchers)
        if self.cfg["guard"].get("watchers") == urls:
            return False
        self.kill()
        self.cfg["guard"]["watchers"] = urls
        self.start()
        return True

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Its JSON log lines (``event``, ``ts`` in ISO UTC, ...), only ``name``'s if given."""
        out = []
        for line in self.logs().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and (name is None or event.get("event") == name):
                out.append(event)
        return out


@dataclass
class FleetRig:
    etcd: EtcdCluster
    pair: PgPair
    tmp: Path
    watchers: dict[str, DaemonProcess] = field(default_factory=dict)
    guards: list[GuardProcess] = field(default_factory=list)

    def add_guard(
        self,
        shared: dict[str, Any],
        *,
        node: str = "main",
        endpoints: list[str] | None = None,
        **database_options: Any,
    ) -> GuardProcess:
        """A guard for ``node`` from the shared config (which must have ``guard:``);
        ``endpoints``: its etcd endpoints instead of the members' (fault proxies);
        ``database_options``: added to the node's database config (``data_dir``)."""
        assert "guard" in shared, "the fleet's config has no guard: section"
        cfg = copy.deepcopy(shared)
        # The config loader wants the instance among the voters; the guard ignores it
        # (the fleet's file as deployed on a watcher's host).
        cfg["instance"] = NAMES[0]
        cfg["log"] = {"format": "json", "level": "info"}
        if endpoints is not None:
            cfg["store"]["etcd"]["endpoints"] = list(endpoints)
        role = "primary" if cfg["primary"]["name"] == node else "standby"
        cfg[role]["database"].update(database_options)
        guard = GuardProcess(cfg, node, self.tmp / f"guard-{node}")
        self.guards.append(guard)
        return guard

    async def guard_alive(self) -> bool:
        """The guard's ``guard/alive`` key is in the store (read from the members)."""
        async with EtcdClient(self.etcd.endpoints, timeout=2.0) as client:
            return await client.get(GUARD_ALIVE) is not None

    def add(self, name: str, shared: dict[str, Any], **dsn_ports: int) -> DaemonProcess:
        """Watcher ``name`` from the shared config; ``primary_port``/``standby_port`` point
        its DSNs elsewhere (a fault proxy)."""
        from tests.support import free_port

        base = self.tmp / name
        (base / "run").mkdir(parents=True, exist_ok=True)
        cfg = copy.deepcopy(shared)
        cfg["instance"] = name
        cfg["state_dir"] = str(base / "state")
        cfg["control"] = {"socket": str(base / "run" / "control.sock")}
        cfg["metrics"] = {"listen": f"127.0.0.1:{free_port()}"}
        for role, server in (("primary", self.pair.primary), ("standby", self.pair.standby)):
            port = dsn_ports.get(f"{role}_port")
            if port is not None:
                dsn = cfg[role]["database"]["dsn"]
                cfg[role]["database"]["dsn"] = dsn.replace(f":{server.port}/", f":{port}/")
        d = DaemonProcess(cfg, base)
        self.watchers[name] = d
        return d

    async def start(self, *names: str) -> None:
        await asyncio.gather(*(self.watchers[n].start() for n in names or self.watchers))

    async def statuses(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, d in self.watchers.items():
            if d.proc is not None and d.proc.poll() is None:
                out[name] = await d.status()
        return out

    async def leader(self, within: float = 20.0, *, other_than: str | None = None) -> str:
        """The watcher every running watcher names as the leader, once they agree."""
        deadline = time.monotonic() + timing.within(within)
        seen: Any = None
        while time.monotonic() < deadline:
            try:
                statuses = await self.statuses()
            except Exception as exc:  # a watcher between starts
                seen = exc
            else:
                named = {s["store"]["leader"] for s in statuses.values()}
                leaders = [n for n, s in statuses.items() if s["store"]["is_leader"]]
                seen = (named, leaders)
                if len(leaders) == 1 and named == {leaders[0]} and leaders[0] != other_than:
                    return leaders[0]
            await asyncio.sleep(0.1)
        raise AssertionError(f"no agreed fleet leader within {within}s: {seen}")

    async def wait_all(
        self, check: Callable[[dict[str, Any]], bool], within: float, what: str
    ) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timing.within(within)
        statuses: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            statuses = await self.statuses()
            if statuses and all(check(s) for s in statuses.values()):
                return statuses
            await asyncio.sleep(0.1)
        brief = {n: (s["state"], s["reason"]) for n, s in statuses.items()}
        raise AssertionError(f"not every watcher {what} within {within}s: {brief}")

    async def store_journal(self) -> list[dict[str, Any]]:
        """Every record of the fleet's journal, read from etcd."""
        async with EtcdClient(self.etcd.endpoints, timeout=2.0) as client:
            store = EtcdStore(client, f"{PREFIX}/{CLUSTER}")
            return [record for _, record in await store.entries()]

    async def promotions_in_store(self) -> int:
        return sum(
            1
            for r in await self.store_journal()
            if r.get("type") == "step_finished"
            and r.get("action") == "promote"
            and r.get("outcome") == "ok"
        )

    def logs(self) -> str:
        parts = [f"--- {n}\n{d.logs()[-3000:]}" for n, d in self.watchers.items()]
        parts += [f"--- guard {g.node}\n{g.logs()[-3000:]}" for g in self.guards]
        return "\n".join(parts)


def timeline(server: PgServer) -> int:
    """The server's timeline id from its own WAL directory: each promotion writes the
    next timeline's history file (``00000002.history``). 1: never promoted."""
    out = server.execute(
        "SELECT coalesce(max(('x' || substr(name, 1, 8))::bit(32)::int), 1) "
        "FROM pg_ls_waldir() WHERE name LIKE '%.history'"
    )
    return int(out)


@pytest_asyncio.fixture
async def fleet_rig(pg_pair: PgPair, tmp_path: Path) -> AsyncIterator[FleetRig]:
    """Three etcd members and the lab's pair; watchers are added by the test. Every
    watcher is SIGKILLed and every member killed at teardown."""
    with etcd_cluster() as cluster:
        rig = FleetRig(cluster, pg_pair, tmp_path)
        try:
            yield rig
        finally:
            for d in rig.watchers.values():
                if d.proc is not None and d.proc.poll() is None:
                    d.proc.send_signal(signal.SIGCONT)  # a stopped watcher dies too
                d.kill()
            for guard in rig.guards:
                guard.kill()
            for member in cluster.members:
                member.sigcont()
