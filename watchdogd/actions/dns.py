"""The ``dns`` action: point a DNS record at the standby with an RFC 2136 dynamic update.

Owns building the update (replace the whole record set of one name and type, so
whatever the primary's address was is gone), signing it with TSIG, sending it to
the zone's primary server over TCP, and reading the record back from that same
server: the step succeeds only when the server answers with exactly the new value
and TTL (a server may accept an update and still ignore part of it, e.g. a CNAME
next to other data). Replacing a record set with the same content changes nothing,
so the step is idempotent. ::

    - name: dns
      action: dns
      server: 192.0.2.53:53          # host[:port]; [v6]:port
      zone: example.com
      record: app                    # relative to the zone, "@" for the apex, or a full name
      type: A                        # A, AAAA or CNAME
      value: 192.0.2.20              # CNAME targets are always full names
      ttl: 60                        # seconds (or a duration like 1m); default 60
      tsig: {name: failover-key, algorithm: hmac-sha256, secret: "${DNS_TSIG}"}

The TSIG secret (``secret`` or ``secret_file``) is a config secret: it never
appears in describe(), errors or logs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from watchdogd.actions import ActionError, template_fields, templated
from watchdogd.core.units import format_duration, parse_duration

if TYPE_CHECKING:
    import dns.message
    import dns.name
    import dns.rdata
    import dns.tsig

    from watchdogd.actions import StepContext
    from watchdogd.core.section import Section

TYPES = ("A", "AAAA", "CNAME")
ALGORITHMS = (
    "hmac-sha256",
    "hmac-sha384",
    "hmac-sha512",
    "hmac-sha224",
    "hmac-sha1",
    "hmac-md5",
)
DEFAULT_TTL = 60
_MAX_TTL = 2**31 - 1
_HOST_PORT = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]\s]+))(?::(?P<port>\d+))?$"
)

# RFC 2136 answers worth a hint: the bare code names leave an operator guessing.
_RCODE_HINTS = {
    "REFUSED": "the server does not allow this update (update-policy / allow-update)",
    "NOTAUTH": "the server is not authoritative for the zone, or rejected the TSIG key",
    "NOTZONE": "the name is not inside the zone",
    "SERVFAIL": "the server failed to apply the update",
}


@dataclass(frozen=True)
class Tsig:
    name: str
    algorithm: str
    secret: str = field(repr=False)


class DnsAction:
    idempotent = True

    def __init__(
        self,
        server: str,
        zone: str,
        name: str,
        rtype: str,
        value: str,
        ttl: int,
        tsig: Tsig | None,
    ) -> None:
        self.server = server
        self.zone = zone
        self.name = name  # placeholders unrendered
        self.rtype = rtype
        self.value = value  # placeholders unrendered
        self.ttl = ttl
        self.tsig = tsig

    # -- Action protocol

    def describe(self, ctx: StepContext) -> dict[str, Any]:
        out: dict[str, Any] = {
            "server": self.server,
            "zone": _absolute(self.zone),
            "update": f"replace {self._fqdn_text(ctx)} {self.ttl} IN {self.rtype} "
            f"{self._value_text(ctx)}",
            "verify": f"query {self.rtype} {self._fqdn_text(ctx)} at {self.server}",
        }
        if self.tsig is not None:
            out["tsig_key"] = self.tsig.name
            out["tsig_algorithm"] = self.tsig.algorithm
        return out

    async def run(self, ctx: StepContext, timeout: float) -> str:
        import dns.exception
        import dns.message
        import dns.rcode
        import dns.rdata
        import dns.rdataclass
        import dns.rdatatype
        import dns.update

        fqdn_text, value_text = self._fqdn_text(ctx), self._value_text(ctx)
        record = f"{fqdn_text} {self.rtype}"
        problem = _record_problem(fqdn_text, self.zone, self.rtype) or _value_problem(
            self.rtype, value_text
        )
        if problem:
            raise ActionError(f"dns {record}: {problem}")
        fqdn = _name(fqdn_text)
        expected = dns.rdata.from_text(dns.rdataclass.IN, self.rtype, value_text)
        rdtype = dns.rdatatype.from_text(self.rtype)
        host, port = _split_server(self.server)
        key = self._key()
        doing = f"resolving {host}"
        try:
            async with asyncio.timeout(timeout):
                where = await _address(host, port)
                doing = f"sending the update to {self.server}"
                update = dns.update.UpdateMessage(_absolute(self.zone), keyring=key)
                update.replace(fqdn, self.ttl, expected)
                reply = await _tcp(update, where, port)
                rcode = dns.rcode.to_text(reply.rcode())
                if rcode != "NOERROR":
                    hint = _RCODE_HINTS.get(rcode)
                    raise ActionError(
                        f"dns {record}: {self.server} answered the update with {rcode}"
                        + (f" ({hint})" if hint else "")
                    )
                doing = f"querying {self.server} to verify the update"
                query = dns.message.make_query(fqdn, rdtype)
                if key is not None:
                    query.use_tsig(key)
                answer = await _tcp(query, where, port)
        except TimeoutError:
            raise ActionError(
                f"dns {record}: timed out after {format_duration(timeout)} {doing}"
            ) from None
        except OSError as exc:
            raise ActionError(f"dns {record}: {doing} failed: {_os_error(exc)}") from None
        except dns.exception.DNSException as exc:
            raise ActionError(f"dns {record}: {doing} failed: {_exc_text(exc)}") from None

        rrset = answer.get_rrset(answer.answer, fqdn, dns.rdataclass.IN, rdtype)
        seen = "nothing" if rrset is None else _rrset_text(rrset)
        if rrset is None or set(rrset) != {expected} or rrset.ttl != self.ttl:
            raise ActionError(
                f"dns {record}: update accepted but {self.server} now answers {seen}, "
                f"expected {value_text} ttl {self.ttl}"
            )
        return f"{record} is {value_text} ttl {self.ttl} (verified at {self.server})"

    async def ready(self, ctx: StepContext, timeout: float) -> str:
        """The server answers, authoritatively, the zone's SOA to a query signed with
        the step's TSIG key (a key it does not know, or a zone it does not serve, fails).
        Nothing is updated."""
        import dns.exception
        import dns.flags
        import dns.message
        import dns.rcode
        import dns.rdataclass
        import dns.rdatatype

        zone = _absolute(self.zone)
        host, port = _split_server(self.server)
        key = self._key()
        signed = f" signed with key {self.tsig.name}" if self.tsig is not None else ""
        what = f"dns {self.server}: SOA {zone}{signed}"
        try:
            async with asyncio.timeout(timeout):
                query = dns.message.make_query(zone, dns.rdatatype.SOA)
                if key is not None:
                    query.use_tsig(key)
                reply = await _tcp(query, await _address(host, port), port)
        except TimeoutError:
            raise ActionError(f"{what}: no answer within {format_duration(timeout)}") from None
        except OSError as exc:
            raise ActionError(f"{what}: {_os_error(exc)}") from None
        except dns.exception.DNSException as exc:
            raise ActionError(f"{what}: {_exc_text(exc)}") from None
        rcode = dns.rcode.to_text(reply.rcode())
        if rcode != "NOERROR":
            hint = _RCODE_HINTS.get(rcode)
            raise ActionError(f"{what}: answered {rcode}" + (f" ({hint})" if hint else ""))
        soa = reply.get_rrset(reply.answer, _name(zone), dns.rdataclass.IN, dns.rdatatype.SOA)
        if soa is None or not reply.flags & dns.flags.AA:
            raise ActionError(f"{what}: the server is not authoritative for the zone")
        return f"{self.server} serves {zone}" + (f" to key {self.tsig.name}" if self.tsig else "")

    # -- helpers

    def _fqdn_text(self, ctx: StepContext) -> str:
        return _qualify(ctx.render(self.name), self.zone)

    def _value_text(self, ctx: StepContext) -> str:
        value: str = ctx.render(self.value)
        return _absolute(value) if self.rtype == "CNAME" else value

    def _key(self) -> dns.tsig.Key | None:
        if self.tsig is None:
            return None
        import dns.tsig

        return dns.tsig.Key(self.tsig.name, self.tsig.secret, self.tsig.algorithm)


async def _tcp(message: dns.message.Message, where: str, port: int) -> dns.message.Message:
    import dns.asyncquery

    # TCP for both: an update must not be retried blindly over UDP, and a verify answer
    # is never truncated. The caller's asyncio.timeout bounds it.
    return await dns.asyncquery.tcp(message, where, port=port)


async def _address(host: str, port: int) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve {host}: {exc.strerror}") from None
    return str(infos[0][4][0])


def _os_error(exc: OSError) -> str:
    # asyncio's connect errors read "Connect call failed (...)"; the errno says why.
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _exc_text(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _rrset_text(rrset: Any) -> str:
    values = ", ".join(sorted(r.to_text() for r in rrset))
    return f"{values} ttl {rrset.ttl}"


# --------------------------------------------------------------------------- names


def _absolute(name: str) -> str:
    return name if name.endswith(".") else name + "."


def _qualify(name: str, zone: str) -> str:
    """``www`` → ``www.zone.``; ``@`` → ``zone.``; ``www.zone`` and ``x.`` are already full."""
    zone_abs = _absolute(zone)
    if name == "@":
        return zone_abs
    if name.endswith("."):
        return name
    bare_zone = zone_abs[:-1]
    if name.lower() == bare_zone.lower() or name.lower().endswith("." + bare_zone.lower()):
        return name + "."
    return f"{name}.{zone_abs}"


def _name(text: str) -> dns.name.Name:
    import dns.name

    return dns.name.from_text(text)


def _name_problem(text: str) -> str | None:
    import dns.exception

    try:
        _name(text)
    except dns.exception.DNSException as exc:
        return f"{text!r} is not a valid DNS name ({_exc_text(exc)})"
    return None


def _record_problem(fqdn: str, zone: str, rtype: str) -> str | None:
    """What is wrong with a full record name in ``zone``, or None."""
    if problem := _name_problem(fqdn):
        return problem
    if not _name(fqdn).is_subdomain(_name(_absolute(zone))):
        return f"{fqdn} is not inside zone {_absolute(zone)}"
    if rtype == "CNAME" and _name(fqdn) == _name(_absolute(zone)):
        return "a CNAME cannot be at the zone apex"
    return None


def _value_problem(rtype: str, value: str) -> str | None:
    if rtype == "CNAME":
        return _name_problem(_absolute(value))
    version = 4 if rtype == "A" else 6
    try:
        if ipaddress.ip_address(value).version == version:
            return None
    except ValueError:
        pass
    return f"expected an IPv{version} address for an {rtype} record, got {value!r}"


def _split_server(text: str) -> tuple[str, int]:
    m = _HOST_PORT.match(text)
    if m is None:
        if text.count(":") > 1:  # a bare IPv6 address, no port
            try:
                return str(ipaddress.IPv6Address(text)), 53
            except ValueError:
                pass
        raise ValueError(text)
    port = int(m.group("port") or 53)
    if not 0 < port < 65536:
        raise ValueError(text)
    return m.group("v6") or m.group("host"), port


# --------------------------------------------------------------------------- config


def _has_fields(s: Section, key: str, value: str) -> bool:
    templated(s, key, value)
    try:
        return bool(template_fields(value))
    except ValueError:
        return True  # already reported by templated()


def _ttl(s: Section) -> int:
    raw = s.raw("ttl", DEFAULT_TTL)
    if isinstance(raw, int) and not isinstance(raw, bool):
        seconds = float(raw)
    else:
        try:
            seconds = parse_duration(raw)
        except ValueError:
            s.error(f"expected seconds (60) or a duration like 1m, got {raw!r}", "ttl")
            return DEFAULT_TTL
    if seconds != int(seconds) or not 0 <= seconds <= _MAX_TTL:
        s.error(f"expected whole seconds from 0 to {_MAX_TTL}, got {raw!r}", "ttl")
        return DEFAULT_TTL
    return int(seconds)


def _tsig(s: Section) -> Tsig | None:
    t = s.section("tsig")
    if t is None:
        return None
    name = t.str("name")
    if isinstance(name, str) and (problem := _name_problem(_absolute(name))):
        t.error(problem, "name")
    algorithm = t.choice("algorithm", ALGORITHMS, "hmac-sha256")
    secret = t.secret("secret", required=True)
    if isinstance(secret, str):
        try:
            base64.b64decode(secret, validate=True)
        except (binascii.Error, ValueError):
            # Never echo the value: it is (or was meant to be) a secret.
            where = "secret_file" if t.has("secret_file") else "secret"
            t.error(
                "is not valid base64 (expected a TSIG secret as BIND's tsig-keygen prints it)",
                where,
            )
    t.finish()
    if not isinstance(name, str) or not isinstance(secret, str):
        return None
    return Tsig(name=name, algorithm=algorithm or "hmac-sha256", secret=secret)


def parse(s: Section) -> DnsAction:
    server = s.str("server")
    if isinstance(server, str):
        try:
            _split_server(server)
        except ValueError:
            s.error(f"expected host, host:port or [v6]:port, got {server!r}", "server")
    zone = s.str("zone")
    if isinstance(zone, str) and (problem := _name_problem(_absolute(zone))):
        s.error(problem, "zone")
        zone = None
    rtype = s.choice("type", TYPES)
    # "record", not "name": a step's "name" is the step's own name.
    name = s.str("record")
    value = s.str("value")
    ttl = _ttl(s)
    tsig = _tsig(s)

    # Placeholder-free names and values are checked now; the others after rendering.
    if isinstance(name, str) and not _has_fields(s, "record", name) and isinstance(zone, str):
        if problem := _record_problem(_qualify(name, zone), zone, rtype or "A"):
            s.error(problem, "record")
    if isinstance(value, str) and not _has_fields(s, "value", value) and isinstance(rtype, str):
        if problem := _value_problem(rtype, value):
            s.error(problem, "value")
    return DnsAction(
        server=server or "",
        zone=zone or ".",
        name=name or "@",
        rtype=rtype or "A",
        value=value or "",
        ttl=ttl,
        tsig=tsig,
    )


ACTIONS = {"dns": parse}
