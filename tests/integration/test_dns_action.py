"""The dns action against a real authoritative BIND 9: RFC 2136 updates, verified."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.rdatatype
import pytest

from tests.support.bind import Bind, bind_server
from watchdogd.actions import ActionError, StepContext
from watchdogd.actions.dns import DnsAction, parse
from watchdogd.core.model import Config, DatabaseConfig, NodeConfig
from watchdogd.core.secrets import mask_value
from watchdogd.core.section import Section

pytestmark = pytest.mark.integration

ZONE = "example.test"


def _ctx(secrets: frozenset[str] = frozenset()) -> StepContext:
    def node(name: str) -> NodeConfig:
        return NodeConfig(name=name, database=DatabaseConfig(engine="postgres", dsn="x"))

    config = Config(cluster="shop", primary=node("db-a"), standby=node("db-b"), secrets=secrets)
    return StepContext(
        config=config,
        primary=config.primary,
        standby=config.standby,
        engines={},
        failover_id="fo-1",
        reason="test",
        trigger="manual",
    )


def _parse(keys: dict[str, Any]) -> tuple[DnsAction, list[str], set[str]]:
    errors: list[str] = []
    secrets: set[str] = set()
    section = Section(keys, "failover.steps[3]", errors, secrets)
    action = parse(section)
    section.finish()
    return action, errors, secrets


def _action(server: Bind, **keys: Any) -> DnsAction:
    base = {
        "server": server.server,
        "zone": server.zone,
        "tsig": {"name": server.key_name, "secret": server.secret},
    }
    action, errors, _ = _parse({**base, **keys})
    assert errors == []
    return action


def _answer(server: Bind, name: str, rtype: str) -> tuple[set[str], int | None]:
    reply = server.query(name, rtype)
    rrset = next((r for r in reply.answer if r.rdtype == dns.rdatatype.from_text(rtype)), None)
    if rrset is None:
        return set(), None
    return {r.to_text() for r in rrset}, rrset.ttl


@pytest.fixture
def bind() -> Iterator[Bind]:
    with bind_server(
        ZONE,
        "app IN A 192.0.2.1\napp IN A 192.0.2.9\nweb IN CNAME primary.example.net.\n",
    ) as server:
        yield server


async def test_a_record_set_is_replaced_and_verified(bind: Bind) -> None:
    assert _answer(bind, "app.example.test.", "A") == ({"192.0.2.1", "192.0.2.9"}, 300)
    action = _action(bind, record="app", type="A", value="192.0.2.20", ttl=30)

    detail = await action.run(_ctx(), timeout=5)

    assert detail == f"app.example.test. A is 192.0.2.20 ttl 30 (verified at {bind.server})"
    # The whole set was replaced: both old addresses are gone, the TTL is the new one.
    assert _answer(bind, "app.example.test.", "A") == ({"192.0.2.20"}, 30)
    # Idempotent: again, same result.
    assert await action.run(_ctx(), timeout=5) == detail
    assert _answer(bind, "app.example.test.", "A") == ({"192.0.2.20"}, 30)


async def test_cname_with_placeholder_and_secret_file(bind: Bind, tmp_path: Path) -> None:
    key_file = tmp_path / "tsig.key"
    key_file.write_text(bind.secret + "\n")
    action, errors, secrets = _parse(
        {
            "server": bind.server,
            "zone": bind.zone + ".",
            "record": "web.example.test",  # the full name without the final dot works too
            "type": "CNAME",
            "value": "{standby.name}.example.net",
            "tsig": {
                "name": bind.key_name,
                "algorithm": "hmac-sha256",
                "secret_file": str(key_file),
            },
        }
    )
    assert errors == [] and secrets == {bind.secret}

    await action.run(_ctx(), timeout=5)

    assert _answer(bind, "web.example.test.", "CNAME") == ({"db-b.example.net."}, 60)


async def test_new_aaaa_record_gets_default_ttl(bind: Bind) -> None:
    action = _action(bind, record="v6", type="AAAA", value="2001:db8::0:20")
    await action.run(_ctx(), timeout=5)
    assert _answer(bind, "v6.example.test.", "AAAA") == ({"2001:db8::20"}, 60)


async def test_wrong_tsig_secret_is_rejected_without_leaking_it(bind: Bind) -> None:
    wrong = base64.b64encode(os.urandom(32)).decode()
    action = _action(
        bind,
        record="app",
        type="A",
        value="192.0.2.20",
        tsig={"name": bind.key_name, "secret": wrong},
    )
    with pytest.raises(ActionError) as err:
        await action.run(_ctx(frozenset({wrong})), timeout=5)
    message = str(err.value)
    assert message.startswith(
        f"dns app.example.test. A: sending the update to {bind.server} failed: PeerBadSignature"
    ), message
    assert wrong not in message and "\n" not in message
    assert _answer(bind, "app.example.test.", "A")[0] == {"192.0.2.1", "192.0.2.9"}


async def test_unknown_key_is_refused(bind: Bind) -> None:
    other = base64.b64encode(os.urandom(32)).decode()
    action = _action(
        bind,
        record="app",
        type="A",
        value="192.0.2.20",
        tsig={"name": "other-key", "secret": other},
    )
    with pytest.raises(ActionError) as err:
        await action.run(_ctx(), timeout=5)
    assert "PeerBadKey" in str(err.value)


async def test_update_without_tsig_is_refused_by_the_policy(bind: Bind) -> None:
    action, errors, _ = _parse(
        {
            "server": bind.server,
            "zone": bind.zone,
            "record": "app",
            "type": "A",
            "value": "192.0.2.20",
        }
    )
    assert errors == []
    with pytest.raises(ActionError) as err:
        await action.run(_ctx(), timeout=5)
    assert str(err.value) == (
        f"dns app.example.test. A: {bind.server} answered the update with REFUSED "
        "(the server does not allow this update (update-policy / allow-update))"
    )


async def test_silently_ignored_update_fails_verification(bind: Bind) -> None:
    # RFC 2136 §3.4.2.2: an A record next to an existing CNAME is ignored, yet the
    # server answers NOERROR. Only reading the record back shows it did not take.
    action = _action(bind, record="web", type="A", value="192.0.2.20")
    with pytest.raises(ActionError) as err:
        await action.run(_ctx(), timeout=5)
    assert str(err.value) == (
        f"dns web.example.test. A: update accepted but {bind.server} now answers nothing, "
        "expected 192.0.2.20 ttl 60"
    )


async def test_refused_connection_is_one_clear_line(closed_port: int) -> None:
    # A port nobody listens on: TCP connect is refused at once.
    server = f"127.0.0.1:{closed_port}"
    action, errors, _ = _parse(
        {"server": server, "zone": ZONE, "record": "app", "type": "A", "value": "192.0.2.20"}
    )
    assert errors == []
    with pytest.raises(ActionError) as err:
        await action.run(_ctx(), timeout=2)
    assert str(err.value) == (
        f"dns app.example.test. A: sending the update to {server} failed: Connection refused"
    )


async def test_a_server_that_never_answers_is_bounded_by_the_step_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accept, read, never answer
        writer.close()

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        action, errors, _ = _parse(
            {
                "server": f"127.0.0.1:{port}",
                "zone": ZONE,
                "record": "app",
                "type": "A",
                "value": "192.0.2.20",
            }
        )
        assert errors == []
        started = time.monotonic()
        with pytest.raises(ActionError) as err:
            await action.run(_ctx(), timeout=0.2)
        assert time.monotonic() - started < 1
        assert str(err.value) == (
            f"dns app.example.test. A: timed out after 200ms sending the update to 127.0.0.1:{port}"
        )
    finally:
        listener.close()
        await listener.wait_closed()


async def test_rendered_value_of_the_wrong_kind_fails_before_sending(bind: Bind) -> None:
    action = _action(bind, record="app", type="A", value="{standby.name}")
    with pytest.raises(ActionError) as err:
        await action.run(_ctx(), timeout=5)
    assert str(err.value) == (
        "dns app.example.test. A: expected an IPv4 address for an A record, got 'db-b'"
    )


def test_describe_is_rendered_and_never_shows_the_secret() -> None:
    secret = base64.b64encode(b"k" * 32).decode()
    action, errors, secrets = _parse(
        {
            "server": "[2001:db8::53]:5353",
            "zone": "example.com",
            "record": "{cluster}",
            "type": "A",
            "value": "192.0.2.7",
            "ttl": "2m",
            "tsig": {"name": "fo-key", "algorithm": "hmac-sha512", "secret": secret},
        }
    )
    assert errors == [] and secrets == {secret}
    described = action.describe(_ctx(frozenset(secrets)))
    assert described == {
        "server": "[2001:db8::53]:5353",
        "zone": "example.com.",
        "update": "replace shop.example.com. 120 IN A 192.0.2.7",
        "verify": "query A shop.example.com. at [2001:db8::53]:5353",
        "tsig_key": "fo-key",
        "tsig_algorithm": "hmac-sha512",
    }
    assert secret not in repr(described) and secret not in repr(action.tsig)
    assert mask_value(described, secrets) == described
    assert action.idempotent is True


@pytest.mark.parametrize(
    ("keys", "error"),
    [
        ({"type": "MX"}, "failover.steps[3].type: expected one of A, AAAA, CNAME, got 'MX'"),
        (
            {"value": "2001:db8::1"},
            "failover.steps[3].value: expected an IPv4 address for an A record, got '2001:db8::1'",
        ),
        (
            {"type": "AAAA"},
            "failover.steps[3].value: expected an IPv6 address for an AAAA record, got '192.0.2.1'",
        ),
        (
            {"record": "app.other.org."},
            "failover.steps[3].record: app.other.org. is not inside zone example.test.",
        ),
        (
            {"record": "@", "type": "CNAME", "value": "x.example.net"},
            "failover.steps[3].record: a CNAME cannot be at the zone apex",
        ),
        (
            {"server": "ns1:dns"},
            "failover.steps[3].server: expected host, host:port or [v6]:port, got 'ns1:dns'",
        ),
        ({"ttl": -5}, "failover.steps[3].ttl: expected whole seconds from 0 to 2147483647, got -5"),
        (
            {"ttl": "soon"},
            "failover.steps[3].ttl: expected seconds (60) or a duration like 1m, got 'soon'",
        ),
        (
            {"tsig": {"name": "k", "secret": "not base64!"}},
            "failover.steps[3].tsig.secret: is not valid base64 (expected a TSIG secret as "
            "BIND's tsig-keygen prints it)",
        ),
        (
            {"tsig": {"name": "k", "secret": "a2V5", "algorithm": "sha256"}},
            "failover.steps[3].tsig.algorithm: expected one of hmac-sha256, hmac-sha384, "
            "hmac-sha512, hmac-sha224, hmac-sha1, hmac-md5, got 'sha256'",
        ),
        ({"tsig": {"name": "k"}}, "failover.steps[3].tsig.secret: is required (or secret_file)"),
        (
            {"tsig": {"name": "k", "secret": "a2V5", "keyfile": "/x"}},
            "failover.steps[3].tsig.keyfile: unknown key",
        ),
        (
            {"record": "{primary}"},
            "failover.steps[3].record: unknown placeholder {primary}; known: {cluster}, "
            "{failover_id}, {primary.name}, {reason}, {standby.name}, {trigger}",
        ),
    ],
)
def test_bad_keys_are_reported_with_their_path(keys: dict[str, Any], error: str) -> None:
    base = {"server": "127.0.0.1", "zone": ZONE, "record": "app", "type": "A", "value": "192.0.2.1"}
    _, errors, _ = _parse({**base, **keys})
    assert errors == [error]


def test_missing_keys_are_each_reported() -> None:
    _, errors, _ = _parse({})
    assert errors == [
        "failover.steps[3].server: is required",
        "failover.steps[3].zone: is required",
        "failover.steps[3].type: is required",
        "failover.steps[3].record: is required",
        "failover.steps[3].value: is required",
    ]
