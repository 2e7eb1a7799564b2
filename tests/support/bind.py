"""Test helper: a real authoritative BIND 9 (``named``) on a free loopback port.

``bind_server(zone, records)`` writes a temporary named.conf with one primary
zone that a TSIG key (hmac-sha256, random secret) may update, starts
``named -g`` (as the ``bind`` user when run as root, so the zone journal is
written the way a real server writes it), waits until the zone answers, and
kills named and removes its directory on exit, whatever happened.
"""

from __future__ import annotations

import base64
import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode

from tests.support import free_port, need, port_taken, retry_if_port_taken, timing, which

KEY_NAME = "watchdogd-test-key"


@dataclass(frozen=True)
class Bind:
    port: int
    zone: str  # without the trailing dot
    key_name: str
    secret: str  # base64
    log: Path

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def query(self, name: str, rtype: str) -> dns.message.Message:
        """A plain (unsigned) query, as any resolver would ask."""
        return dns.query.tcp(dns.message.make_query(name, rtype), "127.0.0.1", 2, self.port)


@contextlib.contextmanager
def bind_server(zone: str = "example.test", records: str = "") -> Iterator[Bind]:
    """``records``: extra zone-file lines (relative names), e.g. ``"app IN A 192.0.2.1"``."""
    named = need("named (BIND 9, Debian package bind9)", which("named", "/usr/sbin"))
    proc, server, workdir = retry_if_port_taken(lambda: _start(named, zone, records))
    try:
        yield server
    finally:
        proc.kill()
        proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def _start(named: str, zone: str, records: str) -> tuple[subprocess.Popen[bytes], Bind, Path]:
    """named on a fresh port, serving ``zone``; killed (its directory removed) if not."""
    # Not under pytest's tmp_path: its parents are mode 0700, and named (as bind) must
    # reach its directory to write the zone journal.
    workdir = Path(tempfile.mkdtemp(prefix="watchdogd-bind-"))
    port = free_port()
    secret = base64.b64encode(os.urandom(32)).decode()
    (workdir / "zone.db").write_text(
        f"""$TTL 300
@ IN SOA ns1.{zone}. hostmaster.{zone}. 1 60 60 3600 60
@ IN NS ns1.{zone}.
ns1 IN A 127.0.0.1
{records}
"""
    )
    (workdir / "named.conf").write_text(
        f"""options {{
    directory "{workdir}";
    pid-file "{workdir}/named.pid";
    session-keyfile "{workdir}/session.key";
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion no;
    dnssec-validation no;
    notify no;
    allow-transfer {{ none; }};
}};
controls {{ }};
key "{KEY_NAME}" {{ algorithm hmac-sha256; secret "{secret}"; }};
zone "{zone}" {{
    type primary;
    file "{workdir}/zone.db";
    update-policy {{ grant {KEY_NAME} zonesub ANY; }};
}};
"""
    )
    argv = [named, "-g", "-4", "-n", "1", "-c", str(workdir / "named.conf")]
    if os.geteuid() == 0:
        bind_user = pwd.getpwnam("bind")
        for path in (workdir, *workdir.iterdir()):
            os.chown(path, bind_user.pw_uid, bind_user.pw_gid)
        argv += ["-u", "bind"]
    log = workdir / "named.log"
    proc = None
    try:
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        server = Bind(port=port, zone=zone, key_name=KEY_NAME, secret=secret, log=log)
        _wait_ready(proc, server)
    except BaseException:
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return proc, server, workdir


def _wait_ready(proc: subprocess.Popen[bytes], server: Bind) -> None:
    deadline = time.monotonic() + timing.within(10)
    query = dns.message.make_query(server.zone + ".", "SOA")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"named exited with {proc.returncode}: {server.log.read_text()}")
        log = server.log.read_text(errors="replace")
        if port_taken(log):  # named keeps running, deaf on that port
            raise RuntimeError(f"named could not listen on {server.port}: {log}")
        with contextlib.suppress(dns.exception.DNSException, OSError):
            reply = dns.query.udp(query, "127.0.0.1", timeout=0.05, port=server.port)
            if reply.rcode() == dns.rcode.NOERROR and reply.answer:
                return
        time.sleep(0.02)
    raise RuntimeError(
        f"named did not serve {server.zone} within {timing.within(10):g}s: {server.log.read_text()}"
    )
