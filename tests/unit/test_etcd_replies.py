"""The etcd client (watchdogd/state/etcd.py) against a local aiohttp server that answers
what etcd never should: junk, wrong types, truncated replies, 5xx, silence.

Every such answer must become ``StoreUnavailable`` with one line naming the endpoint
and what was wrong — never a KeyError, never a traceback, and never ``CompareFailed``,
which only a well-formed compare failure may produce. The server is a real HTTP peer
on a loopback socket, not a mock of the client's session.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from tests.support import bound_socket, port_of
from watchdogd.state.etcd import (
    Compare,
    CompareFailed,
    EtcdClient,
    EtcdConfigError,
    LeaseNotFound,
    Put,
    RangeResult,
    StoreUnavailable,
    TlsFiles,
)
from watchdogd.state.etcd_store import EtcdStore
from watchdogd.state.store import Token

TIMEOUT = 0.3
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HEADER = {"header": {"cluster_id": "1", "member_id": "2", "revision": "7", "raft_term": "3"}}


@dataclass
class Peer:
    """One HTTP server on a loopback port; ``routes[path]`` answers ``/v3/<path>``."""

    url: str
    routes: dict[str, Handler] = field(default_factory=dict)
    seen: list[tuple[str, dict[str, str], Any]] = field(default_factory=list)


@pytest.fixture
async def peers() -> AsyncIterator[list[Peer]]:
    runners: list[web.AppRunner] = []
    made: list[Peer] = []
    for _ in range(2):
        sock = bound_socket()
        peer = Peer(f"http://127.0.0.1:{port_of(sock)}")

        async def handle(request: web.Request, peer: Peer = peer) -> web.StreamResponse:
            path = request.match_info["path"]
            body = await request.read()
            peer.seen.append((path, dict(request.headers), json.loads(body or b"null")))
            route = peer.routes.get(path)
            if route is None:
                return web.json_response({"error": "no route", "code": 12}, status=501)
            return await route(request)

        app = web.Application()
        app.router.add_post("/v3/{path:.*}", handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        runners.append(runner)
        made.append(peer)
    try:
        yield made
    finally:
        for runner in runners:
            await runner.cleanup()


def text(body: str, status: int = 200) -> Handler:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(text=body, status=status, content_type="application/json")

    return handler


def reply(obj: Any, status: int = 200) -> Handler:
    return text(json.dumps(obj), status)


def slow(seconds: float) -> Handler:
    async def handler(_: web.Request) -> web.Response:
        await asyncio.sleep(seconds)
        return web.json_response(HEADER)

    return handler


async def hang_up(request: web.Request) -> web.Response:
    assert request.transport is not None
    request.transport.close()
    await asyncio.sleep(1)
    return web.Response()


def assert_one_line(exc: BaseException, *fragments: str) -> None:
    message = str(exc)
    assert "\n" not in message and message.strip() == message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


RANGE_JUNK = [
    (text("<html>oops</html>"), "not a JSON object"),
    (text("[1, 2]"), "not a JSON object"),
    (text("[" * 100_000), "not a JSON object"),  # deeper than the parser's recursion
    (text(""), "(empty body)"),
    (text('{"header": {"revision": "7"}, "kvs": [{"key": "YQ=="}'), "not a JSON object"),
    (reply({}), "missing 'header'"),
    (reply({"header": "x"}), "'header' is a str, not a dict"),
    (reply({"header": {"revision": "abc"}}), "'revision' is not an integer"),
    (reply({"header": {"revision": True}}), "'revision' is a boolean"),
    (reply({"header": {}}), "header without a revision"),
    (reply({**HEADER, "kvs": "x"}), "'kvs' is a str, not a list"),
    (reply({**HEADER, "kvs": [5]}), "a key-value is not an object"),
    (reply({**HEADER, "kvs": [{"value": "YQ=="}]}), "missing 'key'"),
    (reply({**HEADER, "kvs": [{"key": "%%%"}]}), "'key' is not base64"),
    (reply({**HEADER, "kvs": [{"key": "YQ==", "value": 3}]}), "'value' is a int, not base64"),
    (reply({**HEADER, "count": [1]}), "'count' is not an integer"),
    (text("<h1>Internal Server Error</h1>", 500), "HTTP 500"),
    (text("Bad Gateway", 502), "HTTP 502: Bad Gateway"),
    (reply({"error": "etcdserver: no leader", "code": 14}, 503), "etcdserver: no leader"),
    (reply({"error": "etcdserver: leader changed", "code": 14}, 503), "leader changed"),
    (reply({"error": "etcdserver: request timed out", "code": 14}, 503), "request timed out"),
    (reply({"error": "something new", "code": 2}, 500), "something new"),
    (reply({"error": "x" * 5000, "code": 2}, 500), "…"),
    (slow(TIMEOUT * 5), f"no answer within {TIMEOUT:g}s"),
    (hang_up, "http://127.0.0.1:"),
]


TXN_JUNK = [
    # Without the failure branch's responses, a missing "succeeded" is no compare failure.
    (reply(HEADER), "0 responses for 1 ops in the failure branch"),
    (reply({**HEADER, "succeeded": "false"}), "succeeded is not a boolean"),
    (reply({**HEADER, "responses": [{"response_put": {}}]}), "expected response_range"),
    (reply({**HEADER, "responses": "none"}), "'responses' is a str, not a list"),
    (reply({**HEADER, "succeeded": True, "responses": []}), "0 responses for 1 ops"),
    (reply({"error": "etcdserver: no leader", "code": 14}, 503), "no leader"),
    (text("garbage", 200), "not a JSON object"),
]


async def claim(client: EtcdClient) -> object:
    return await client.txn([Compare("/leader", "create", "=", 0)], [Put("/leader", b"me")])


async def read(client: EtcdClient) -> object:
    return await client.range("/k")


CALLS = {"kv/range": read, "kv/txn": claim}
JUNK = [("kv/range", *case) for case in RANGE_JUNK] + [("kv/txn", *case) for case in TXN_JUNK]


@pytest.mark.parametrize(("path", "route", "fragment"), JUNK)
async def test_junk_is_unavailable_with_one_line(
    peers: list[Peer], path: str, route: Handler, fragment: str
) -> None:
    """StoreUnavailable, never CompareFailed (not a subclass): for a txn too."""
    peer = peers[0]
    peer.routes[path] = route
    async with EtcdClient([peer.url], timeout=TIMEOUT) as client:
        with pytest.raises(StoreUnavailable) as caught:
            await CALLS[path](client)
    assert_one_line(caught.value, peer.url, path, fragment)
    assert len(str(caught.value)) < 400


def compare_failure(value: str = "b3RoZXI=") -> Handler:
    """What etcd answers when the compare is false: the failure branch's range."""
    kv = {"key": "L2xlYWRlcg==", "value": value, "create_revision": "4", "mod_revision": "4"}
    return reply({**HEADER, "responses": [{"response_range": {**HEADER, "kvs": [kv]}}]})


async def test_a_well_formed_compare_failure_is_the_only_lost(peers: list[Peer]) -> None:
    peer = peers[0]
    peer.routes["kv/txn"] = compare_failure()
    async with EtcdClient([peer.url], timeout=TIMEOUT) as client:
        with pytest.raises(CompareFailed) as lost:
            await client.txn([Compare("/leader", "create", "=", 0)], [Put("/leader", b"me")])
    current = lost.value.result.responses[0]
    assert isinstance(current, RangeResult)
    assert current.kvs[0].value == b"other" and current.kvs[0].create_revision == 4
    # What was sent: the compare, and a failure branch that reads the compared key.
    _, _, sent = peer.seen[0]
    assert sent["compare"] == [
        {"key": "L2xlYWRlcg==", "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
    ]
    assert sent["failure"] == [{"request_range": {"key": "L2xlYWRlcg=="}}]
    assert "serializable" not in json.dumps(peer.seen)


async def test_a_compare_failure_after_an_ambiguous_attempt_is_unavailable(
    peers: list[Peer],
) -> None:
    first, second = peers
    first.routes["kv/txn"] = slow(TIMEOUT * 5)  # the request may have been applied
    second.routes["kv/txn"] = compare_failure()
    async with EtcdClient([first.url, second.url], timeout=TIMEOUT) as client:
        with pytest.raises(StoreUnavailable) as caught:
            await client.txn([Compare("/leader", "create", "=", 0)], [Put("/leader", b"me")])
    assert caught.value.maybe_applied
    assert_one_line(caught.value, "outcome unknown", first.url, second.url)


async def test_a_compare_failure_after_a_refused_connection_is_lost(
    peers: list[Peer], closed_port: int
) -> None:
    second = peers[1]
    second.routes["kv/txn"] = compare_failure()
    refused = f"http://127.0.0.1:{closed_port}"
    async with EtcdClient([refused, second.url], timeout=TIMEOUT) as client:
        with pytest.raises(CompareFailed):
            await client.txn([Compare("/leader", "create", "=", 0)], [Put("/leader", b"me")])


async def test_fails_over_on_no_leader_and_stays_with_the_endpoint_that_answered(
    peers: list[Peer],
) -> None:
    first, second = peers
    first.routes["kv/range"] = reply({"error": "etcdserver: no leader", "code": 14}, 503)
    second.routes["kv/range"] = reply({**HEADER, "kvs": [{"key": "YQ==", "value": "Yg=="}]})
    async with EtcdClient([first.url, second.url], timeout=TIMEOUT) as client:
        kv = await client.get("a")
        assert kv is not None and kv.value == b"b" and kv.create_revision == 0
        await client.get("a")
    assert [path for path, _, _ in first.seen] == ["kv/range"]  # not asked again
    assert [path for path, _, _ in second.seen] == ["kv/range", "kv/range"]


KEEPALIVE_JUNK = [
    (text(""), "stream ended without a reply"),
    (reply({"result": 5}), "'result' is a int, not a dict"),
    (reply({"result": {"ID": "1", "TTL": "5"}}), "missing 'header'"),
    (reply({"result": {**HEADER, "TTL": "five"}}), "'TTL' is not an integer"),
    (
        reply({"error": {"grpc_code": 14, "http_code": 503, "message": "etcdserver: no leader"}}),
        "etcdserver: no leader",
    ),
]


@pytest.mark.parametrize(("route", "fragment"), KEEPALIVE_JUNK)
async def test_keepalive_junk_is_unavailable(
    peers: list[Peer], route: Handler, fragment: str
) -> None:
    peer = peers[0]
    peer.routes["lease/grant"] = reply({**HEADER, "ID": "77", "TTL": "5"})
    peer.routes["lease/keepalive"] = route
    async with EtcdClient([peer.url], timeout=TIMEOUT) as client:
        lease = await client.lease_grant(5)
        granted = lease.last
        with pytest.raises(StoreUnavailable) as caught:
            await lease.renew()
    assert_one_line(caught.value, peer.url, fragment)
    assert lease.last == granted  # the deadline did not move
    assert lease.last_error == str(caught.value)


async def test_keepalive_without_ttl_is_lease_not_found(peers: list[Peer]) -> None:
    peer = peers[0]
    # etcd's answer for a lease it does not know: TTL 0, left out of the JSON.
    peer.routes["lease/keepalive"] = text(json.dumps({"result": {**HEADER, "ID": "77"}}) + "\n")
    async with EtcdClient([peer.url], timeout=TIMEOUT) as client:
        with pytest.raises(LeaseNotFound):
            await client.lease_keepalive(77)


async def test_grant_without_an_id_is_unavailable(peers: list[Peer]) -> None:
    peer = peers[0]
    peer.routes["lease/grant"] = reply({**HEADER, "TTL": "5"})
    async with EtcdClient([peer.url], timeout=TIMEOUT) as client:
        with pytest.raises(StoreUnavailable) as caught:
            await client.lease_grant(5)
    assert_one_line(caught.value, "lease grant answered ID 0")


async def test_an_expired_token_is_refreshed_once(peers: list[Peer]) -> None:
    peer = peers[0]
    tokens: list[str] = []

    async def authenticate(request: web.Request) -> web.Response:
        tokens.append(f"token-{len(tokens)}")
        return web.json_response({**HEADER, "token": tokens[-1]})

    refusal = {"error": "etcdserver: invalid auth token", "code": 16}

    async def range_(request: web.Request) -> web.Response:
        if not tokens or request.headers.get("Authorization") != tokens[-1]:
            return web.json_response(refusal, status=401)
        return web.json_response(HEADER)

    peer.routes["auth/authenticate"] = authenticate
    peer.routes["kv/range"] = range_
    async with EtcdClient([peer.url], timeout=TIMEOUT, username="u", password="pw1") as client:
        await client.range("/k")
        tokens.append("rotated-by-the-server")  # our token is no longer valid
        await client.range("/k")
        # Users or roles changed since the token was issued: etcd 3.4's InvalidArgument.
        refusal = {"error": "etcdserver: revision of auth store is old", "code": 3}
        tokens.append("after-a-role-change")
        await client.range("/k")
    assert tokens == [
        "token-0", "rotated-by-the-server", "token-2", "after-a-role-change", "token-4"
    ]  # fmt: skip
    names = [sent["name"] for path, _, sent in peer.seen if path == "auth/authenticate"]
    assert names == ["u", "u", "u"]


async def test_a_bad_authenticate_reply_is_unavailable_and_hides_the_password(
    peers: list[Peer],
) -> None:
    peer = peers[0]
    peer.routes["auth/authenticate"] = reply({**HEADER, "token": 5})
    async with EtcdClient([peer.url], timeout=TIMEOUT, username="u", password="pw1") as client:
        with pytest.raises(StoreUnavailable) as caught:
            await client.range("/k")
    assert_one_line(caught.value, "bad authenticate reply", "'token' is a int")
    assert "pw1" not in str(caught.value)


def stream(*lines: str, hold: float = 0.0) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for line in lines:
            await response.write(line.encode() + b"\n")
        await asyncio.sleep(hold)
        return response

    return handler


CREATED = json.dumps({"result": {**HEADER, "created": True}})
WATCH_JUNK = [
    (stream("nonsense"), "watch message not JSON"),
    (stream(CREATED, "[" * 100_000), "watch message not JSON"),
    (stream('{"result": {"header": {"revision": "7"}}}'), "does not confirm its creation"),
    (stream(CREATED, '{"result": {"header": {}, "events": [{"kv": 1}]}}'), "'kv' is a int"),
    (stream(CREATED, '{"result": {"header": {}, "events": [{"type": "EXPLODE"}]}}'), "EXPLODE"),
    (stream(CREATED, json.dumps({"error": {"message": "etcdserver: no leader"}})), "no leader"),
    (stream(CREATED, '{"result": {"header": {}, "canceled": true}}'), "canceled by the server"),
    (stream(hold=TIMEOUT * 5), f"no answer within {TIMEOUT:g}s"),
    (text("Service Unavailable", 503), "HTTP 503"),
    (stream(CREATED), "watch stream ended"),
]


@pytest.mark.parametrize(("route", "fragment"), WATCH_JUNK)
async def test_watch_junk_is_unavailable(peers: list[Peer], route: Handler, fragment: str) -> None:
    peer = peers[0]
    peer.routes["watch"] = route
    async with EtcdClient([peer.url], timeout=TIMEOUT) as client:
        with pytest.raises(StoreUnavailable) as caught:
            async for _ in client.watch("/w/", idle_check=TIMEOUT):
                pass
    assert_one_line(caught.value, peer.url, fragment)


async def test_watch_resumes_on_the_next_endpoint_after_the_last_event(
    peers: list[Peer],
) -> None:
    first, second = peers
    event = {"kv": {"key": "L3cvMQ==", "value": "YQ==", "mod_revision": "9"}}
    first.routes["watch"] = stream(CREATED, json.dumps({"result": {**HEADER, "events": [event]}}))
    later = {"type": "DELETE", "kv": {"key": "L3cvMQ==", "mod_revision": "12"}}
    second.routes["watch"] = stream(
        CREATED, json.dumps({"result": {**HEADER, "events": [later]}}), hold=5
    )
    async with EtcdClient([first.url, second.url], timeout=TIMEOUT) as client:
        seen = []
        async with client.watch("/w/", b"/w0") as watch:
            async for e in watch:
                seen.append((e.type, e.kv.key, e.revision))
                if len(seen) == 2:
                    break
        assert watch.next_revision == 13 and watch.reconnects == 1
    assert seen == [("put", b"/w/1", 9), ("delete", b"/w/1", 12)]
    assert "start_revision" not in first.seen[0][2]["create_request"]
    assert second.seen[0][2]["create_request"]["start_revision"] == "10"
    assert second.seen[0][1]["Grpc-Metadata-hasleader"] == "true"


async def test_a_watch_refused_for_its_token_authenticates_again(peers: list[Peer]) -> None:
    peer = peers[0]
    tokens: list[str] = []
    expired = {"token-0"}  # the first token has expired by the time the watch uses it

    async def authenticate(request: web.Request) -> web.Response:
        tokens.append(f"token-{len(tokens)}")
        return web.json_response({**HEADER, "token": tokens[-1]})

    event = {"kv": {"key": "L3cvMQ==", "value": "YQ==", "mod_revision": "9"}}
    events = stream(CREATED, json.dumps({"result": {**HEADER, "events": [event]}}), hold=5)

    async def watch(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") in expired:
            refusal = {"error": "etcdserver: invalid auth token", "code": 16}
            return web.json_response(refusal, status=401)
        return await events(request)

    peer.routes["auth/authenticate"] = authenticate
    peer.routes["watch"] = watch
    async with EtcdClient([peer.url], timeout=TIMEOUT, username="u", password="pw1") as client:
        async with client.watch("/w/", b"/w0") as watched:
            async for e in watched:
                assert e.kv.key == b"/w/1"
                break
    assert tokens == ["token-0", "token-1"]


@pytest.mark.parametrize(
    ("endpoints", "fragment"),
    [
        ([], "no endpoints"),
        (["ftp://10.0.0.1:2379"], "expected http(s)://host:port"),
        (["10.0.0.1:2379"], "expected http(s)://host:port"),
        (["http://10.0.0.1:2379/v3"], "expected http(s)://host:port"),
        (["http://user:pw@10.0.0.1:2379"], "no query, fragment or user info"),
    ],
)
def test_bad_endpoints_are_refused_with_one_line(endpoints: list[str], fragment: str) -> None:
    with pytest.raises(EtcdConfigError) as caught:
        EtcdClient(endpoints)
    assert_one_line(caught.value, fragment)


def test_tls_is_built_only_for_https_and_names_unreadable_files(tmp_path: Any) -> None:
    missing = TlsFiles(ca_file=str(tmp_path / "nope.pem"))
    EtcdClient(["http://127.0.0.1:2379"], tls=missing)  # plain http: no context built
    with pytest.raises(EtcdConfigError) as caught:
        EtcdClient(["https://127.0.0.1:2379"], tls=missing)
    assert_one_line(caught.value, "etcd tls:")
    with pytest.raises(EtcdConfigError):
        EtcdClient(["https://127.0.0.1:2379"], tls=TlsFiles(cert_file="/x.pem"))
    with pytest.raises(EtcdConfigError):
        EtcdClient(["http://127.0.0.1:2379"], username="u")


def leader_kv(lease: str, create_revision: str) -> Handler:
    kv = {"key": "L3dkL2xlYWRlcg==", "value": "ZGMx", "create_revision": create_revision,
          "mod_revision": create_revision, "lease": lease}  # fmt: skip
    return reply({**HEADER, "kvs": [kv], "count": "1"})


async def test_a_campaign_whose_reply_was_lost_is_settled_by_the_next_one(
    peers: list[Peer],
) -> None:
    """The campaign's txn times out (it may have applied); the next campaign reads the
    leader key: on that campaign's lease, it is ours (no second lease, no second txn)."""
    peer = peers[0]
    peer.routes["lease/grant"] = reply({**HEADER, "ID": "5", "TTL": "10"})
    peer.routes["kv/txn"] = slow(TIMEOUT * 5)
    async with EtcdClient([peer.url], timeout=TIMEOUT) as client:
        store = EtcdStore(client, "/wd")
        with pytest.raises(StoreUnavailable) as lost_reply:
            await store.campaign("dc1", 10)
        assert lost_reply.value.maybe_applied
        peer.routes["kv/range"] = leader_kv(lease="5", create_revision="42")
        assert await store.campaign("dc1", 10) == Token("dc1", 42)
        assert store.lease is not None and store.lease.id == 5
    paths = [path for path, _, _ in peer.seen]
    assert paths == ["lease/grant", "kv/txn", "kv/range"]


async def test_a_lost_campaign_on_someone_elses_key_drops_its_lease(peers: list[Peer]) -> None:
    peer = peers[0]
    peer.routes["lease/grant"] = reply({**HEADER, "ID": "5", "TTL": "10"})
    peer.routes["kv/txn"] = slow(TIMEOUT * 5)
    peer.routes["lease/revoke"] = reply(HEADER)
    async with EtcdClient([peer.url], timeout=TIMEOUT) as client:
        store = EtcdStore(client, "/wd")
        with pytest.raises(StoreUnavailable):
            await store.campaign("dc1", 10)
        peer.routes["kv/range"] = leader_kv(lease="9", create_revision="44")  # not ours
        peer.routes["lease/grant"] = reply({**HEADER, "ID": "6", "TTL": "10"})
        peer.routes["kv/txn"] = reply(
            {**HEADER, "responses": [{"response_range": {**HEADER, "count": "1"}}]}
        )  # the compare failed: the key is held
        assert await store.campaign("dc1", 10) is None
    revoked = [sent["ID"] for path, _, sent in peer.seen if path == "lease/revoke"]
    assert revoked == ["5", "6"]  # the lost campaign's lease, then this one's
