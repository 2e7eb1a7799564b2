"""Whole-site partitions for end-to-end tests (issue 12): three sites, each a network
namespace of its own, joined by a Linux bridge in the root namespace.

``netns_sites()`` makes, per test, namespaces ``wd<id>-a``/``-b``/``-c`` (``<id>``: four
random hex digits), a bridge ``wd<id>br`` holding the address ``.1`` of one free
``10.213.<n>.0/24`` (the test process, in the root namespace, reaches every site
through it) and one veth pair per site: ``wd<id>a`` on the bridge, ``eth0`` inside the
site with the address ``.2`` (a), ``.3`` (b), ``.4`` (c); ``lo`` is up in every site.
Sites talk to each other through the bridge; nothing is routed and no address, route or
setting outside these namespaces and this bridge is touched.

``sites.cut("a")`` takes the site's link down (its bridge port): the site is cut off from
the other sites and from the test process, its connections hang (nothing answers,
nothing is reset), like a site whose uplink failed; ``sites.heal("a")`` brings it up.
This kernel has no ``sch_netem``, so ``tc netem loss 100%`` is not used.

A process runs in a site when started through ``site.prefix`` (``ip netns exec NS``).
Unix sockets live on the file system, which the namespaces share: the watchers' control
sockets answer the test process from any site, cut or not.

Teardown always SIGKILLs every process left in the namespaces, then deletes the
namespaces, the veths and the bridge, also after a failure half way through setting
them up. Without the right to make namespaces (``ip netns add`` refused) the tests are
skipped, or fail with WATCHDOGD_REQUIRE_INTEGRATION=1.

``site_fleet`` puts the lab's PostgreSQL pair (primary in a, standby in b, streaming
from a's address), one etcd member per site and a :class:`FleetRig` together; the test
adds the watchers (``add_watcher``, one per site) and the guard (``add_guard``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import secrets
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest_asyncio

from tests.support import free_port, need, timing, unavailable, which
from tests.support.daemon import DaemonProcess
from tests.support.etcd import etcd_cluster
from tests.support.fleet import FleetRig, GuardProcess
from watchdogd.demo.lab import PASSWORD_ROLE, PgPair, PgServer, pid_alive

SITES = ("a", "b", "c")
NET = "10.213"  # 10.213.<n>.0/24, one free <n> per test
# Picking <n> and claiming it (the bridge's address) happen under this lock, so two
# test workers never pick the same subnet.
LOCK = Path(tempfile.gettempdir()) / "watchdogd-netns.lock"


def ip_binary() -> str:
    return need("ip (iproute2)", which("ip", "/usr/sbin", "/sbin", "/usr/bin"))


def _ip(ip: str, *args: str, check: bool = True) -> str:
    done = subprocess.run(
        [ip, *args], capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


@dataclass(frozen=True)
class Site:
    name: str  # "a"
    netns: str  # wd<id>-a
    veth: str  # the root side of its link, a port of the bridge
    address: str  # its address on the bridge's subnet
    ip: str

    @property
    def prefix(self) -> tuple[str, ...]:
        """The argv prefix that runs a process in this site."""
        return (self.ip, "netns", "exec", self.netns)

    def pids(self) -> list[int]:
        return [int(p) for p in _ip(self.ip, "netns", "pids", self.netns, check=False).split()]


@dataclass
class Sites:
    ip: str
    bridge: str
    subnet: str  # 10.213.<n>.0/24
    sites: dict[str, Site]

    def __getitem__(self, name: str) -> Site:
        return self.sites[name]

    def __iter__(self) -> Iterator[Site]:
        return iter(self.sites.values())

    def cut(self, name: str) -> None:
        """Take the site's link down: nothing in or out until ``heal``."""
        _ip(self.ip, "link", "set", self.sites[name].veth, "down")

    def heal(self, name: str) -> None:
        _ip(self.ip, "link", "set", self.sites[name].veth, "up")


def _free_subnet(ip: str) -> int:
    """A <n> whose 10.213.<n>.0/24 no address or route of the root namespace uses."""
    used = _ip(ip, "-4", "-o", "addr", "show") + _ip(ip, "-4", "route", "show", "table", "all")
    taken = {int(n) for n in re.findall(rf"\b{re.escape(NET)}\.(\d+)\.", used)}
    free = [n for n in range(1, 255) if n not in taken]
    if not free:
        raise RuntimeError(f"no free {NET}.<n>.0/24 left")
    return free[secrets.randbelow(len(free))]


@contextlib.contextmanager
def netns_sites(names: Sequence[str] = SITES) -> Iterator[Sites]:
    """Sites ``names`` joined by a bridge (see the module's docstring); torn down on exit,
    every process left in them SIGKILLed."""
    ip = ip_binary()
    tag = f"wd{secrets.token_hex(2)}"
    made_ns: list[str] = []
    made_links: list[str] = []
    try:
        try:
            _ip(ip, "netns", "add", f"{tag}-{names[0]}")
        except RuntimeError as exc:
            if not re.search(r"not permitted|denied", str(exc), re.I):
                raise  # e.g. "File exists": a real failure, not a missing right
            unavailable(f"network namespaces not available here ({exc})")
        made_ns.append(f"{tag}-{names[0]}")
        for name in names[1:]:
            _ip(ip, "netns", "add", f"{tag}-{name}")
            made_ns.append(f"{tag}-{name}")
        bridge = f"{tag}br"
        with LOCK.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            n = _free_subnet(ip)
            _ip(ip, "link", "add", bridge, "type", "bridge", "forward_delay", "0")
            made_links.append(bridge)
            _ip(ip, "addr", "add", f"{NET}.{n}.1/24", "dev", bridge)
        _ip(ip, "link", "set", bridge, "up")
        sites: dict[str, Site] = {}
        for i, name in enumerate(names):
            netns, veth = f"{tag}-{name}", f"{tag}{name}"
            _ip(ip, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
            made_links.append(veth)
            _ip(ip, "link", "set", veth, "master", bridge)
            _ip(ip, "link", "set", veth, "up")
            address = f"{NET}.{n}.{i + 2}"
            _ip(ip, "-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip(ip, "-n", netns, "link", "set", "eth0", "up")
            _ip(ip, "-n", netns, "link", "set", "lo", "up")
            sites[name] = Site(name, netns, veth, address, ip)
        yield Sites(ip, bridge, f"{NET}.{n}.0/24", sites)
    finally:
        _teardown(ip, made_ns, made_links)


def _teardown(ip: str, namespaces: list[str], links: list[str]) -> None:
    """Kill what runs in the namespaces, delete them, then the links (a veth goes with
    its namespace; deleting it again fails harmlessly). Raises when something is left."""
    victims: list[int] = []
    for netns in namespaces:
        victims += [int(p) for p in _ip(ip, "netns", "pids", netns, check=False).split()]
    for pid in victims:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    deadline = time.monotonic() + timing.within(10)
    while any(pid_alive(p) for p in victims) and time.monotonic() < deadline:
        time.sleep(0.05)
    for netns in namespaces:
        _ip(ip, "netns", "del", netns, check=False)
    for link in reversed(links):
        _ip(ip, "link", "del", link, check=False)
    left = [n for n in namespaces if n in _ip(ip, "netns", "list", check=False).split()]
    shown = _ip(ip, "-o", "link", "show", check=False)
    left += [link for link in links if re.search(rf"^\d+: {re.escape(link)}[@:]", shown, re.M)]
    if left:
        raise RuntimeError(f"network namespace teardown left {left} behind")


def place_pair(pair: PgPair, primary: Site, standby: Site, subnet: str) -> None:
    """Move the lab's running pair into two sites: both servers restarted there,
    listening on their site's address, reachable from ``subnet`` (pg_hba as on loopback),
    the standby streaming from the primary's site address."""
    for server in (pair.standby, pair.primary):
        server.stop()
    for server, site in ((pair.primary, primary), (pair.standby, standby)):
        server.host, server.prefix = site.address, site.prefix
        with (server.data_dir / "pg_hba.conf").open("a") as hba:
            hba.write(
                f"host all {PASSWORD_ROLE} {subnet} scram-sha-256\n"
                f"host all all {subnet} trust\n"
                f"host replication all {subnet} trust\n"
            )
        server.start()
    pair.reattach_standby(timeout=timing.within(15))


async def in_site_writable(server: PgServer, site: Site, timeout: float = 3.0) -> bool | None:
    """A write by a client in ``site`` (psql run there): True accepted, False refused
    read-only, None no answer. Needs ``CREATE TABLE app (x int)`` on the primary."""
    proc = await asyncio.create_subprocess_exec(
        *site.prefix, str(server.bin_dir / "psql"), "-X", "-q", "-h", server.host,
        "-p", str(server.port), "-U", "postgres", "-d", "postgres",
        "-c", "INSERT INTO app VALUES (1)",
        env={**os.environ, "PGCONNECT_TIMEOUT": "2"},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None
    if proc.returncode == 0:
        return True
    return False if b"read-only transaction" in err else None


@dataclass
class SiteFleet:
    rig: FleetRig
    sites: Sites

    def add_watcher(self, name: str, site: str, shared: dict[str, Any]) -> DaemonProcess:
        """Watcher ``name`` (FleetRig.add) run in ``site``, its metrics on the site's
        address; its control socket on the shared file system."""
        d = self.rig.add(name, shared)
        d.prefix = list(self.sites[site].prefix)
        d.cfg["metrics"]["listen"] = f"{self.sites[site].address}:{free_port()}"
        d.write_config(d.cfg)
        d.metrics_url = "http://{}/metrics".format(d.cfg["metrics"]["listen"])
        return d

    def add_guard(self, site: str, shared: dict[str, Any]) -> GuardProcess:
        guard = self.rig.add_guard(shared)
        guard.prefix = self.sites[site].prefix
        return guard

    async def leader(self, *names: str, within: float = 20.0, other_than: str | None = None) -> str:
        """The watcher that ``names`` (running watchers) agree leads: FleetRig.leader over
        those only (a cut watcher may still name itself, or nobody)."""
        some = FleetRig(self.rig.etcd, self.rig.pair, self.rig.tmp)
        some.watchers = {n: self.rig.watchers[n] for n in names}
        return await some.leader(within, other_than=other_than)


@pytest_asyncio.fixture
async def site_fleet(pg_pair: PgPair, tmp_path: Path) -> AsyncIterator[SiteFleet]:
    """Three sites; the pair's primary in a and standby in b; etcd members etcd1..3 in
    a, b, c; watchers and guard added by the test. Everything is killed at teardown."""
    with netns_sites() as sites:
        try:
            place_pair(pg_pair, sites["a"], sites["b"], sites.subnet)
            places = [(site.address, site.prefix) for site in sites]
            with etcd_cluster(places=places) as cluster:
                fleet = SiteFleet(FleetRig(cluster, pg_pair, tmp_path), sites)
                try:
                    yield fleet
                finally:
                    for watcher in fleet.rig.watchers.values():
                        watcher.kill()
                    for guard in fleet.rig.guards:
                        guard.kill()
        finally:
            for server in (pg_pair.standby, pg_pair.primary):
                server.kill()
