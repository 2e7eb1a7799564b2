"""A throwaway etcd cluster for ``watchdogd demo --sites 3`` and ``bench/fleet.py``.

Three members of Debian's ``etcd`` (package ``etcd-server``) on free loopback ports,
data in a directory the caller gives (tmpfs when the lab is there), one
``--initial-cluster``. Election timing as the tests use it: heartbeat 100 ms, election
timeout 1 s, ``--pre-vote`` so a member that was SIGSTOPped does not disrupt the others
when it comes back. Each member can be SIGSTOPped, continued, killed (SIGKILL) and
started again on its old data; members die with the process that started them
(the lab's ``die_with_parent``). Every wait is bounded and every failure is one
line: the lab's :class:`LabError`. Synchronous (subprocess): callers in a loop run it in
a thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from watchdogd.demo.lab import LabError, die_with_parent

NO_ETCD = "etcd not found: apt-get install etcd-server (or put etcd on PATH)"
HEARTBEAT_MS = 100
ELECTION_MS = 1000
START_TIMEOUT = 20.0


def find_etcd() -> str | None:
    """The ``etcd`` binary: on PATH, else /usr/bin/etcd."""
    found = shutil.which("etcd")
    if found:
        return found
    return "/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free a moment ago: all held at once while
    they are picked (one at a time, the kernel may hand the same port out twice)."""
    with contextlib.ExitStack() as held:
        ports: list[int] = []
        for _ in range(count):
            s = held.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        return ports


def _one_line(text: str, chars: int = 300) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "(empty log)")[-chars:]


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    stopped: bool = False

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def spawn(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=die_with_parent(),
            )
        self.stopped = False

    def healthy(self) -> bool:
        if not self.is_running() or self.stopped:
            return False
        try:
            with urllib.request.urlopen(f"{self.client_url}/health", timeout=1) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def sigstop(self) -> None:
        """Freeze the member: its port accepts connections, nothing answers."""
        if self.is_running():
            assert self.process is not None
            self.process.send_signal(signal.SIGSTOP)
            self.stopped = True

    def sigcont(self) -> None:
        if self.is_running():
            assert self.process is not None
            self.process.send_signal(signal.SIGCONT)
        self.stopped = False

    def kill(self) -> None:
        """SIGKILL (a SIGSTOPped member too) and reap; nothing when not running."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        self.stopped = False

    def log_tail(self) -> str:
        try:
            return _one_line(self.log_path.read_text(errors="replace"))
        except OSError:
            return "(no log)"


@dataclass
class EtcdLab:
    """Three members under ``base``; ``start()`` waits until all are healthy."""

    base: Path
    members: list[EtcdMember] = field(default_factory=list)

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def member(self, name: str) -> EtcdMember:
        for m in self.members:
            if m.name == name:
                return m
        raise LabError(f"no etcd member {name!r}; known: {', '.join(m.name for m in self.members)}")

    @classmethod
    def create(cls, base: Path, names: tuple[str, ...] = ("etcd1", "etcd2", "etcd3")) -> EtcdLab:
        """Build and start the cluster (SIGKILLs what it started if that fails)."""
        binary = find_etcd()
        if binary is None:
            raise LabError(NO_ETCD)
        base.mkdir(parents=True, exist_ok=True)
        lab = cls(base)
        picked = _free_ports(2 * len(names))
        ports = {n: (picked[2 * i], picked[2 * i + 1]) for i, n in enumerate(names)}
        initial = ",".join(f"{n}=http://127.0.0.1:{ports[n][1]}" for n in names)
        token = f"watchdogd-lab-{os.getpid()}-{time.monotonic_ns()}"
        for name in names:
            client, peer = ports[name]
            data_dir = base / name
            client_url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
            argv = [
                binary, "--name", name, "--data-dir", str(data_dir),
                "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
                "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                "--initial-cluster", initial, "--initial-cluster-token", token,
                "--initial-cluster-state", "new",
                f"--heartbeat-interval={HEARTBEAT_MS}", f"--election-timeout={ELECTION_MS}",
                "--pre-vote=true", "--logger=zap", "--log-level=warn",
            ]  # fmt: skip
            lab.members.append(EtcdMember(name, client, peer, data_dir, base / f"{name}.log", argv))
        try:
            for member in lab.members:
                member.spawn()
            lab.wait_healthy(START_TIMEOUT)
        except BaseException:
            lab.close()
            raise
        return lab

    def wait_healthy(self, timeout: float, members: list[EtcdMember] | None = None) -> None:
        """Until every given member (default: all) answers /health; LabError after
        ``timeout`` or when one exits."""
        waiting = list(members or self.members)
        deadline = time.monotonic() + timeout
        while waiting:
            for m in waiting:
                if m.process is not None and m.process.poll() is not None:
                    raise LabError(
                        f"etcd member {m.name} exited with {m.process.returncode}: {m.log_tail()}"
                    )
            waiting = [m for m in waiting if not m.healthy()]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise LabError(
                    f"etcd members {', '.join(m.name for m in waiting)} not healthy after "
                    f"{timeout:g}s: {waiting[0].log_tail()}"
                )
            time.sleep(0.05)

    def restart(self, name: str, timeout: float = START_TIMEOUT) -> None:
        """Start a killed member again on its data dir (it rejoins the cluster)."""
        member = self.member(name)
        if member.is_running():
            member.sigcont()
            return
        member.argv = [a if a != "new" else "existing" for a in member.argv]
        member.spawn()
        self.wait_healthy(timeout, [member])

    def close(self) -> None:
        """SIGKILL every member (continued first), reap; idempotent."""
        for member in self.members:
            member.kill()


__all__ = ["NO_ETCD", "EtcdLab", "EtcdMember", "LabError", "find_etcd"]
