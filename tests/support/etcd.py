"""etcd test clusters: three real members on free loopback ports in a temp dir.

``etcd_cluster()`` (and the ``etcd`` fixture, exported by tests/integration/conftest.py)
starts Debian's ``etcd`` (3.4) three times with distinct names,
client and peer URLs and one ``--initial-cluster``, waits until every member reports
healthy and a leader exists, and SIGKILLs every member by PID on the way out (members
also die with the test process: PR_SET_PDEATHSIG). Data directories live on tmpfs when
there is one (``/dev/shm``): fsync latency on a loaded disk would otherwise pass for
an election problem.

Election timing is fast but not twitchy: heartbeat 100 ms, election timeout 1 s (a new
leader within about 1-2 s of losing one). 50/500 ms elects faster but, with eight test
sessions on two cores, a member starved for half a second starts spurious elections.
``--pre-vote=true`` (Debian's default is false) keeps a member that was SIGSTOPped
from disrupting the cluster when it comes back.

With ``tls=True`` the client URLs are https, a throwaway CA (openssl CLI) signs the
server certificate (SAN 127.0.0.1) and a client certificate, and the members require
client certificates (``--client-cert-auth``); peers stay on plain http.

Faults: ``member.sigstop()``/``sigcont()`` (a frozen machine: its TCP port still
accepts connections, nothing answers), ``cluster.move_leader(member)``
(``etcdctl move-leader``) and ``cluster.enable_auth(user, password)``; ``ReplyFaults``, a
proxy in front of one member that loses, garbles or cuts the reply to a chosen request
after the request took effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    bound_socket,
    need,
    port_of,
    retry_if_port_taken,
    timing,
    wait_stopped,
    which,
)
from tests.support.redis import _die_with_parent

START_TIMEOUT = 20.0
HEARTBEAT_MS = 100
ELECTION_MS = 1000
ROOT_PASSWORD = "root-pw-for-tests"


def etcd_binary() -> str:
    return need("etcd (Debian package etcd-server)", which("etcd", "/usr/bin"))


def etcdctl_binary() -> str:
    return need("etcdctl (Debian package etcd-client)", which("etcdctl", "/usr/bin"))


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@dataclass
class EtcdMember:
    name: str
    client_url: str
    peer_url: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    stopped: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def client_port(self) -> int:
        return int(self.client_url.rsplit(":", 1)[1])

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def sigstop(self) -> None:
        """Freeze the member (every thread): its port accepts, nothing answers. Returns
        once every thread is seen stopped: kill() only queues the signal, and a test
        that acts at once must not race a thread still finishing its work."""
        self.process.send_signal(signal.SIGSTOP)
        self.stopped = True
        wait_stopped(self.process.pid)

    def sigcont(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
        self.stopped = False

    def kill(self) -> None:
        """SIGKILL by PID (a SIGSTOPped member too) and reap; again: nothing."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


@dataclass
class EtcdCluster:
    members: list[EtcdMember]
    base: Path
    certs: Certs | None = None
    auth: tuple[str, str] | None = None  # etcdctl's user once auth is enabled

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def etcdctl(self, *args: str, endpoints: list[str] | None = None, timeout: float = 10) -> str:
        """Run etcdctl against ``endpoints`` (default: the members not stopped)."""
        targets = endpoints or [m.client_url for m in self.members if not m.stopped]
        cmd = [etcdctl_binary(), f"--endpoints={','.join(targets)}", "--command-timeout=5s"]
        if self.certs is not None:
            cmd += [
                f"--cacert={self.certs.ca}",
                f"--cert={self.certs.client_cert}",
                f"--key={self.certs.client_key}",
            ]
        if self.auth is not None:
            cmd.append(f"--user={self.auth[0]}:{self.auth[1]}")
        done = subprocess.run(
            [*cmd, *args],
            capture_output=True,
            text=True,
            timeout=timing.within(timeout),
            env={**os.environ, "ETCDCTL_API": "3"},
        )
        if done.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def status(self, member: EtcdMember) -> dict[str, Any]:
        out = json.loads(self.etcdctl("endpoint", "status", "-w", "json",
                                      endpoints=[member.client_url]))  # fmt: skip
        status: dict[str, Any] = out[0]["Status"]
        return status

    def member_id(self, member: EtcdMember) -> int:
        member_id: int = self.status(member)["header"]["member_id"]
        return member_id

    def leader(self, timeout: float = 15.0) -> EtcdMember:
        """The member that is leader now, as the running members agree (waits for one)."""
        deadline = time.monotonic() + timing.within(timeout)
        last = ""
        while True:
            running = [m for m in self.members if not m.stopped]
            try:
                statuses = {m.name: self.status(m) for m in running}
                leaders = {s["leader"] for s in statuses.values()}
                ids = {s["header"]["member_id"]: name for name, s in statuses.items()}
                if len(leaders) == 1:
                    leader_id = leaders.pop()
                    if leader_id in ids:
                        return next(m for m in self.members if m.name == ids[leader_id])
                last = f"leaders seen {leaders}"
            except (RuntimeError, KeyError, ValueError, subprocess.TimeoutExpired) as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise RuntimeError(f"no agreed etcd leader after {timeout:g}s: {last}")
            time.sleep(0.1)

    def move_leader(self, to: EtcdMember) -> None:
        """``etcdctl move-leader`` to ``to``, asked of the current leader; waits until the
        members agree on it."""
        leader = self.leader()
        if leader is to:
            raise ValueError(f"{to.name} is already the leader")
        self.etcdctl("move-leader", f"{self.member_id(to):x}", endpoints=[leader.client_url])
        deadline = time.monotonic() + timing.within(10)
        while self.leader() is not to:
            if time.monotonic() > deadline:
                raise RuntimeError(f"leadership did not move to {to.name}")
            time.sleep(0.05)

    def enable_auth(self, user: str, password: str, prefix: str = "/") -> None:
        """Enable auth: ``root`` (required by etcd) and ``user`` with a role allowed to
        read and write keys under ``prefix``."""
        self.etcdctl("user", "add", f"root:{ROOT_PASSWORD}")
        self.etcdctl("user", "add", f"{user}:{password}")
        self.etcdctl("role", "add", "watchdogd")
        self.etcdctl("role", "grant-permission", "watchdogd", "--prefix=true", "readwrite", prefix)
        self.etcdctl("user", "grant-role", user, "watchdogd")
        self.etcdctl("auth", "enable")
        self.auth = ("root", ROOT_PASSWORD)

    def kill(self) -> None:
        for member in self.members:
            member.kill()


def make_certs(base: Path) -> Certs:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    openssl = need("openssl", which("openssl", "/usr/bin"))
    base.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        done = subprocess.run([openssl, *args], capture_output=True, text=True, cwd=base)
        if done.returncode != 0:
            raise RuntimeError(f"openssl {args[0]}: {done.stderr.strip()}")

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=watchdogd test CA")  # fmt: skip
    # The gateway inside each member dials its own gRPC server with the server
    # certificate as a client certificate: it needs clientAuth too. etcd 3.4's gateway
    # refuses a client certificate with a CommonName (it could not pass it on as the
    # user name), so the client's subject has none.
    server_ext = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth"
    for name, subject, ext in (
        ("server", "/CN=etcd", server_ext),
        ("client", "/O=watchdogd", "extendedKeyUsage=clientAuth"),
    ):
        (base / f"{name}.ext").write_text(ext + "\n")
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
            "-extfile", f"{name}.ext")  # fmt: skip
    return Certs(
        ca=base / "ca.pem",
        server_cert=base / "server.pem",
        server_key=base / "server.key",
        client_cert=base / "client.pem",
        client_key=base / "client.key",
    )


def _healthy(member: EtcdMember, certs: Certs | None) -> bool:
    context = None
    if certs is not None:
        context = ssl.create_default_context(cafile=str(certs.ca))
        context.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    try:
        with urllib.request.urlopen(f"{member.client_url}/health", timeout=1,
                                    context=context) as resp:  # fmt: skip
            return bool(json.loads(resp.read()).get("health") == "true")
    except (OSError, ValueError, urllib.error.URLError):
        return False


# Where a member runs: the address it listens on, and an argv prefix it is started
# through (e.g. ``ip netns exec NS``). By default: loopback, no prefix.
Placement = tuple[str, Sequence[str]]
LOOPBACK: Placement = ("127.0.0.1", ())


def _start(
    base: Path, certs: Certs | None, extra: Sequence[str], places: Sequence[Placement]
) -> EtcdCluster:
    binary = etcd_binary()
    names = ["etcd1", "etcd2", "etcd3"]
    hosts = {n: (places[i] if places else LOOPBACK) for i, n in enumerate(names)}
    scheme = "https" if certs else "http"
    # All six held at once while they are picked: one at a time, the kernel may hand the
    # same free port out twice (two members on one port: "has duplicate url").
    with contextlib.ExitStack() as held:
        picked = [port_of(held.enter_context(bound_socket())) for _ in range(2 * len(names))]
    ports = {n: (picked[2 * i], picked[2 * i + 1]) for i, n in enumerate(names)}
    initial = ",".join(f"{n}=http://{hosts[n][0]}:{ports[n][1]}" for n in names)
    token = f"wd-{os.getpid()}-{time.monotonic_ns()}"
    members: list[EtcdMember] = []
    try:
        for name in names:
            client_port, peer_port = ports[name]
            data_dir = base / name
            shutil.rmtree(data_dir, ignore_errors=True)  # a failed try's state
            data_dir.mkdir()
            host, prefix = hosts[name]
            client_url = f"{scheme}://{host}:{client_port}"
            peer_url = f"http://{host}:{peer_port}"
            cmd = [
                *prefix, binary, "--name", name, "--data-dir", str(data_dir),
                "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
                "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                "--initial-cluster", initial, "--initial-cluster-token", token,
                "--initial-cluster-state", "new",
                f"--heartbeat-interval={HEARTBEAT_MS}", f"--election-timeout={ELECTION_MS}",
                "--pre-vote=true", "--logger=zap", "--log-level=warn", *extra,
            ]  # fmt: skip
            if certs is not None:
                cmd += [
                    f"--cert-file={certs.server_cert}", f"--key-file={certs.server_key}",
                    f"--trusted-ca-file={certs.ca}", "--client-cert-auth=true",
                ]  # fmt: skip
            log_path = base / f"{name}.log"
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    preexec_fn=_die_with_parent,
                )
            members.append(EtcdMember(name, client_url, peer_url, data_dir, log_path, process))
        cluster = EtcdCluster(members, base, certs)
        deadline = time.monotonic() + timing.within(START_TIMEOUT)
        waiting = list(members)
        while waiting:
            for member in members:
                if member.process.poll() is not None:
                    raise RuntimeError(
                        f"{member.name} exited {member.process.returncode}: {member.log_tail()}"
                    )
            waiting = [m for m in waiting if not _healthy(m, certs)]
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(
                    f"etcd members {[m.name for m in waiting]} not healthy after "
                    f"{timing.within(START_TIMEOUT):g}s: {waiting[0].log_tail()}"
                )
            time.sleep(0.05)
        cluster.leader()
        return cluster
    except BaseException:
        for member in members:
            member.kill()
        raise


@pytest.fixture
def etcd() -> Iterator[EtcdCluster]:
    """A three-member cluster for one test; stopped members are continued before the
    kill, so teardown reaps at once."""
    with etcd_cluster() as cluster:
        try:
            yield cluster
        finally:
            for member in cluster.members:
                member.sigcont()


@contextlib.contextmanager
def etcd_cluster(
    *, tls: bool = False, extra: Sequence[str] = (), places: Sequence[Placement] = ()
) -> Iterator[EtcdCluster]:
    """Three etcd members forming one cluster; every member SIGKILLed on exit. ``extra``:
    more flags for every member (e.g. ``--auth-token-ttl=2``). ``places``: one
    (address, argv prefix) per member (tests/support/netns.py: one per site; without
    TLS, whose certificate names only loopback); default: all on loopback."""
    etcd_binary()
    etcdctl_binary()
    shm = Path("/dev/shm")
    root = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    base = Path(tempfile.mkdtemp(prefix="watchdogd-etcd-", dir=root))
    try:
        certs = make_certs(base / "certs") if tls else None
        cluster = retry_if_port_taken(lambda: _start(base, certs, extra, places))
        try:
            yield cluster
        finally:
            cluster.kill()
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- reply faults

DROP, GARBAGE, CUT = "drop", "garbage", "cut"
REPLY_FAULTS = (DROP, GARBAGE, CUT)


class ReplyFaults:
    """A loopback TCP proxy in front of one member that faults the *reply* to chosen HTTP
    requests, after the request itself went through (tests/support/proxy.py cuts whole
    links; this one loses answers to requests that did reach etcd and took effect).

    ``arm(path, fault)``: the next request to ``path`` (e.g. ``/v3/kv/txn``) is forwarded
    as it is, and its reply is

    - ``drop``: swallowed; the connection stays open and silent (the client times out);
    - ``garbage``: replaced by ``body`` (an HTTP 200 carrying it, when given) or by bytes
      that are not HTTP at all, and the connection closed;
    - ``cut``: cut in the middle and the connection closed.

    ``faulted`` lists the paths whose replies were faulted, in order: a test asserts the
    fault really happened. ``async with ReplyFaults(member.client_port) as proxy:``, then
    use ``proxy.url`` as an endpoint.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.faulted: list[str] = []
        self._armed: list[tuple[str, str, bytes | None]] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def arm(self, path: str, fault: str, body: bytes | None = None) -> None:
        if fault not in REPLY_FAULTS:
            raise ValueError(f"unknown reply fault {fault!r}; known: {', '.join(REPLY_FAULTS)}")
        self._armed.append((path, fault, body))

    async def __aenter__(self) -> ReplyFaults:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        fault: list[tuple[str, bytes | None]] = []  # this connection's faulted reply
        upstream: asyncio.StreamWriter | None = None
        try:
            up_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target_port)
            pumps = [
                asyncio.ensure_future(self._requests(reader, upstream, fault)),
                asyncio.ensure_future(self._replies(up_reader, writer, fault)),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for side in (writer, upstream):
                if side is not None:
                    side.transport.abort()
            self._tasks.discard(task)

    async def _requests(
        self,
        reader: asyncio.StreamReader,
        upstream: asyncio.StreamWriter,
        fault: list[tuple[str, bytes | None]],
    ) -> None:
        while chunk := await reader.read(65536):
            for i, (path, kind, body) in enumerate(self._armed):
                if f"POST {path} ".encode() in chunk:
                    del self._armed[i]
                    fault.append((kind, body))
                    self.faulted.append(path)
                    break
            upstream.write(chunk)
            await upstream.drain()

    async def _replies(
        self,
        up_reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        fault: list[tuple[str, bytes | None]],
    ) -> None:
        while chunk := await up_reader.read(65536):
            if not fault:
                writer.write(chunk)
                await writer.drain()
                continue
            kind, body = fault[0]
            if kind == DROP:
                continue  # the answer is lost; the connection stays open and silent
            if kind == GARBAGE:
                if body is None:
                    writer.write(b"\x00\xffnot http at all\r\n\r\n")
                else:
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                        + body
                    )
            else:  # CUT
                writer.write(chunk[: max(1, len(chunk) // 2)])
            await writer.drain()
            return
