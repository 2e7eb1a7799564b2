"""``watchdogctl events``: the feed's ring and per-follower queues, the control socket's
framing of a follow stream (over a real Unix socket), and the client (in-process and as
a real subprocess interrupted with Ctrl-C)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import LogCapture

from tests.support.fakes import RecordingDaemon
from tests.unit import test_control as control_tests
from tests.unit.test_control import as_user, eventually, make_logger, open_config
from watchdogd.control import ControlServer, request
from watchdogd.core.events import Bus, Event
from watchdogd.core.feed import EventFeed, Follower
from watchdogd.core.model import ControlConfig
from watchdogd.ctl import main, render_event

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-token-value"


def bus_with(feed: EventFeed) -> Bus:
    bus = Bus(structlog.get_logger())
    bus.subscribe(feed.publish)
    return bus


# --------------------------------------------------------------------------- the feed


def test_what_goes_into_the_feed() -> None:
    feed = EventFeed()

    def observed(target: str, ok: bool, probe: str = "database") -> bool:
        return feed.wanted(Event("probe_observed", {"target": target, "probe": probe, "ok": ok}))

    assert feed.wanted(Event("primary_down", {"reason": "x"}))
    assert feed.wanted(Event("step_started", {"step": "promote"}))
    assert feed.wanted(Event("an_unregistered_name"))  # logged at info: shown too
    assert not feed.wanted(Event("advice_unavailable", {"node": "main"}))  # debug
    # A probe's observation when its result changes: starts failing, or recovers.
    assert [observed("main", ok) for ok in (True, True, False, False, False, True, True)] == [
        False, False, True, False, False, True, False,
    ]  # fmt: skip
    assert observed("failover", False) is True  # a first failure is news
    assert observed("failover", False, probe="app") is True  # per probe, not per node
    assert observed("failover", False) is False


def test_the_ring_keeps_the_last_events_in_order() -> None:
    clock = iter(range(1000, 2000))
    feed = EventFeed(lambda: float(next(clock)), ring=5)
    bus = bus_with(feed)
    for i in range(12):
        bus.emit("step_started", step=f"s{i}")
    assert feed.seq == 12
    shown = feed.recent(100)
    assert [i.seq for i in shown] == [8, 9, 10, 11, 12]
    assert [i.facts["step"] for i in shown] == ["s7", "s8", "s9", "s10", "s11"]
    assert [i.at for i in shown] == [1007.0, 1008.0, 1009.0, 1010.0, 1011.0]
    assert [i.seq for i in feed.recent(2)] == [11, 12]
    assert [i.seq for i in feed.recent(100, after=10)] == [11, 12]
    assert feed.recent(0) == []
    assert shown[0].as_dict() == {
        "seq": 8,
        "at": 1007.0,
        "name": "step_started",
        "level": "info",
        "facts": {"step": "s7"},
    }


def test_facts_are_kept_as_json_shapes() -> None:
    feed = EventFeed()

    class Opaque:
        def __str__(self) -> str:
            return f"opaque holding {SECRET}"

    bus_with(feed).emit(
        "failover_unfinished", steps=({"name": "a"},), where=Path("/x"), thing=Opaque()
    )
    (item,) = feed.recent(1)
    # str() of any other object: the socket's masking walks strings, lists and dicts.
    assert item.facts == {
        "steps": [{"name": "a"}],
        "where": "/x",
        "thing": f"opaque holding {SECRET}",
    }
    json.dumps(item.as_dict(), allow_nan=False)


def test_a_full_queue_drops_its_oldest_and_counts_them() -> None:
    follower = Follower(limit=3)
    feed = EventFeed(queue=3)
    for i in range(10):
        feed.publish(Event("step_started", {"step": i}))
        follower.put(feed.recent(1)[0])
    items, missed = follower.take_nowait()
    assert [i.facts["step"] for i in items] == [7, 8, 9]
    assert missed == 7 and follower.missed_total == 7
    assert follower.take_nowait() == ([], 0)


def test_a_stuck_follower_never_slows_publishing() -> None:
    feed = EventFeed(queue=50)
    stuck = [feed.follow() for _ in range(20)]  # nobody ever takes from these
    started = time.perf_counter()
    for i in range(20_000):
        feed.publish(Event("step_started", {"step": i}))
    took = time.perf_counter() - started
    assert all(f.queued == 50 and f.missed_total == 20_000 - 50 for f in stuck)
    # Bounded work per event: 20 followers x 20 000 events in well under a second even
    # on a loaded CI box (measured ~0.1 s here); an unbounded queue would hold 400 000.
    assert took < 2.0, took


async def test_take_waits_for_the_next_event() -> None:
    feed = EventFeed()
    follower = feed.follow()
    waiting = asyncio.create_task(follower.take())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    feed.publish(Event("paused", {"by": "ops"}))
    items, missed = await asyncio.wait_for(waiting, 2)
    assert [i.name for i in items] == ["paused"] and missed == 0


def test_following_after_a_seq_replays_what_the_ring_still_holds() -> None:
    feed = EventFeed(ring=4)
    for i in range(10):
        feed.publish(Event("step_started", {"step": i}))
    follower = feed.follow(after=8)
    items, missed = follower.take_nowait()
    assert [i.seq for i in items] == [9, 10] and missed == 0
    # Read up to 3; the ring holds 7..10 now: 4..6 are gone and said to be missed.
    items, missed = feed.follow(after=3).take_nowait()
    assert [i.seq for i in items] == [7, 8, 9, 10] and missed == 3
    # A seq from before a restart (larger than ours): nothing to replay, nothing missed.
    assert feed.follow(after=500).take_nowait() == ([], 0)
    assert feed.followers == 3
    feed.unfollow(follower)
    assert feed.followers == 2


# --------------------------------------------------------------------------- the socket


class Rig(control_tests.Rig):
    """test_control's rig, with an event feed and a secret to mask."""

    def __init__(self, sockdir: Path) -> None:
        super().__init__(sockdir)
        self.feed = EventFeed(ring=100, queue=10)
        self.bus = bus_with(self.feed)

    async def start(self, config: ControlConfig | None = None, **kw: Any) -> ControlServer:
        return await super().start(config, feed=self.feed, secrets={SECRET}, **kw)


@pytest.fixture
async def rig(sockdir: Path) -> AsyncIterator[Rig]:
    r = Rig(sockdir)
    yield r
    await asyncio.gather(*(server.stop() for server in r.servers))


async def follow(path: str, **args: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(json.dumps({"command": "events", "args": {"follow": True, **args}}).encode())
    writer.write(b"\n")
    await writer.drain()
    return reader, writer


async def next_line(reader: asyncio.StreamReader, within: float = 5) -> dict[str, Any]:
    raw = await asyncio.wait_for(reader.readline(), within)
    assert raw, "the server closed the stream"
    line: dict[str, Any] = json.loads(raw)
    return line


async def test_recent_events_are_a_read_command_with_secrets_masked(rig: Rig) -> None:
    await rig.start()
    for i in range(30):
        rig.bus.emit("step_failed", step=f"s{i}", error=f"401 for token {SECRET}")
    reply = await request(rig.path, "events")
    assert reply["ok"] is True
    result = reply["result"]
    assert result["seq"] == 30 and "following" not in result
    shown = result["events"]
    assert [e["seq"] for e in shown] == list(range(11, 31))  # 20 by default, oldest first
    assert shown[-1]["facts"] == {"step": "s29", "error": "401 for token ***"}
    assert SECRET not in json.dumps(reply)
    reply = await request(rig.path, "events", {"n": 2, "after": 29})
    assert [e["seq"] for e in reply["result"]["events"]] == [30]
    reply = await request(rig.path, "events", {"n": 1001})
    assert reply == {"ok": False, "error": "events: argument 'n' must be from 0 to 1000, got 1001"}


async def test_a_follower_gets_each_new_event_as_it_happens(rig: Rig) -> None:
    server = await rig.start(idle_timeout=0.3)
    rig.bus.emit("paused", by="ops")
    reader, writer = await follow(rig.path, n=5)
    first = await next_line(reader)
    assert first["ok"] is True and first["result"]["following"] is True
    assert [e["name"] for e in first["result"]["events"]] == ["paused"]
    assert first["result"]["seq"] == 1
    await eventually(lambda: rig.feed.followers == 1)
    # Quiet for three idle timeouts: a follower is not a client that sends nothing.
    await asyncio.sleep(1.0)
    rig.bus.emit("primary_down", reason=f"refused; dsn has {SECRET}")
    rig.bus.emit("probe_observed", ok=True, target="main", probe="app")  # healthy: not news
    rig.bus.emit("failover_started", failover_id="f1")
    down = await next_line(reader)
    assert down["ok"] is True and set(down) == {"ok", "event"}
    assert down["event"]["seq"] == 2 and down["event"]["name"] == "primary_down"
    assert down["event"]["level"] == "warning"
    assert down["event"]["facts"]["reason"] == "refused; dsn has ***"
    assert (await next_line(reader))["event"]["name"] == "failover_started"
    # The client leaves: its slot and its queue go at once.
    writer.close()
    await eventually(lambda: rig.feed.followers == 0 and server.connections == 0)


async def test_a_follower_that_falls_behind_is_told_how_many_it_missed(rig: Rig) -> None:
    await rig.start()
    reader, writer = await follow(rig.path, n=0)
    assert (await next_line(reader))["result"]["events"] == []
    await eventually(lambda: rig.feed.followers == 1)
    # A burst with no await in between: the stream cannot send any of it yet, so the
    # queue of 10 keeps the newest 10.
    for i in range(35):
        rig.bus.emit("step_retry", step="promote", attempt=i)
    assert await next_line(reader) == {"ok": True, "missed": 25}
    attempts = [(await next_line(reader))["event"]["facts"]["attempt"] for _ in range(10)]
    assert attempts == list(range(25, 35))
    writer.close()


async def test_a_client_that_stops_reading_is_disconnected(rig: Rig) -> None:
    server = await rig.start(idle_timeout=0.3)
    reader, writer = await follow(rig.path, n=0)
    await next_line(reader)
    await eventually(lambda: rig.feed.followers == 1)
    # Never read again: once the socket's buffers are full, the send waits idle_timeout
    # and gives up; the daemon's emits never wait for it.
    big = "x" * 50_000
    started = time.perf_counter()
    for _ in range(200):
        rig.bus.emit("step_failed", step="promote", error=big)
        await asyncio.sleep(0.01)
    assert time.perf_counter() - started < 200 * 0.01 + 2.0
    await eventually(lambda: rig.feed.followers == 0 and server.connections == 0, 10)
    writer.close()


async def test_the_stream_ends_when_the_connection_lifetime_is_up(rig: Rig) -> None:
    server = await rig.start(max_lifetime=0.5)
    reader, writer = await follow(rig.path)
    await next_line(reader)
    end = await next_line(reader, within=5)
    assert end == {
        "ok": False,
        "error": "connection open longer than 0.5s; closing it (connect again with "
        "after=<last seq>)",
    }
    assert await asyncio.wait_for(reader.read(), 5) == b""
    await eventually(lambda: rig.feed.followers == 0 and server.connections == 0)
    writer.close()


async def test_a_stream_takes_no_further_requests(rig: Rig) -> None:
    server = await rig.start()
    reader, writer = await follow(rig.path)
    await next_line(reader)
    writer.write(b'{"command": "pause"}\n')
    assert await next_line(reader) == {
        "ok": False,
        "error": "events --follow: the stream takes no requests; closing it",
    }
    assert await asyncio.wait_for(reader.read(), 5) == b""
    await eventually(lambda: server.connections == 0)
    writer.close()


async def test_followers_count_against_the_connection_limit(rig: Rig) -> None:
    await rig.start(max_connections=2, reserved=0)
    held = [await follow(rig.path) for _ in range(2)]
    for reader, _ in held:
        await next_line(reader)
    reply = await request(rig.path, "status")
    assert reply["ok"] is False and reply["error"].startswith("busy: too many control")
    for _, writer in held:
        writer.close()


async def test_a_server_without_a_feed_says_so(sockdir: Path) -> None:
    path = str(sockdir / "c.sock")
    server = ControlServer(ControlConfig(socket=path), RecordingDaemon(), make_logger(LogCapture()))
    await server.start()
    try:
        reply = await request(path, "events", {"follow": True})
        assert reply == {"ok": False, "error": "events: this server has no event feed"}
    finally:
        await server.stop()


async def test_read_permission_is_enough_to_follow(rig: Rig, open_dir: Path) -> None:
    await rig.start(open_config(rig.path))
    rig.bus.emit("resumed", by="ops")
    recent, following = await as_user(
        "nobody",
        rig.path,
        '{"command": "events"}',
        '{"command": "events", "args": {"follow": true}}',
    )
    assert recent["ok"] is True and [e["name"] for e in recent["result"]["events"]] == ["resumed"]
    assert following["ok"] is True and following["result"]["following"] is True


# --------------------------------------------------------------------------- the client


def test_one_line_per_event() -> None:
    line = render_event(
        {
            "seq": 3,
            "at": 1796280312.345,
            "name": "primary_down",
            "level": "warning",
            "facts": {
                "reason": "connection refused",
                "failing": ["database"],
                "outage_seconds": 2.0123456,
                "trigger": None,
                "note": "two\nlines",
                "standby_sees_primary": False,
            },
        }
    )
    assert line == (
        '2026-12-03 06:45:12.345Z WARNING primary_down reason="connection refused" '
        'failing=["database"] outage_seconds=2.01235 note="two\\nlines" '
        "standby_sees_primary=false"
    )
    assert "\n" not in render_event({"name": "x\ny", "facts": {"a\nb": "c"}})


async def test_the_client_prints_recent_events(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    await rig.start()
    rig.bus.emit("paused", reason="drill", by="ops")
    rig.bus.emit("resumed", by="ops")
    assert await asyncio.to_thread(main, ["--socket", rig.path, "events"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[2:4] for line in out] == [
        ["INFO", "paused"],
        ["INFO", "resumed"],
    ]
    assert await asyncio.to_thread(main, ["--socket", rig.path, "events", "--json", "-n", "1"]) == 0
    (only,) = capsys.readouterr().out.splitlines()
    assert json.loads(only)["name"] == "resumed" and json.loads(only)["facts"] == {"by": "ops"}


async def test_follow_as_a_subprocess_streams_and_ends_cleanly_on_ctrl_c(rig: Rig) -> None:
    await rig.start()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "watchdogd.ctl", "--socket", rig.path, "events", "--follow",
        "--json", cwd=REPO, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        await eventually(lambda: rig.feed.followers == 1, 20)
        rig.bus.emit("failover_started", failover_id="f1", trigger="manual")
        rig.bus.emit("failover_completed", failover_id="f1", trigger="manual")
        lines = [json.loads(await asyncio.wait_for(proc.stdout.readline(), 10)) for _ in range(2)]
        assert [e["name"] for e in lines] == ["failover_started", "failover_completed"]
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 10)
        err = (await proc.stderr.read()).decode()
        assert code == 0, err
        assert "Traceback" not in err and err == ""
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_follow_reconnects_when_the_lifetime_is_up(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    await rig.start(max_lifetime=0.4)
    done = asyncio.Event()

    async def emit_across_reconnects() -> None:
        await eventually(lambda: rig.feed.followers == 1)
        for i in range(6):
            rig.bus.emit("step_started", step=f"s{i}")
            await asyncio.sleep(0.25)  # spans several 0.4 s connections
        await eventually(lambda: rig.feed.followers == 1)
        done.set()
        for server in rig.servers:
            await server.stop()  # the daemon goes away: the client says so, exit 3

    emitter = asyncio.create_task(emit_across_reconnects())
    code = await asyncio.to_thread(main, ["--socket", rig.path, "events", "-f", "--json"])
    await emitter
    assert done.is_set() and code == 3
    captured = capsys.readouterr()
    steps = [json.loads(line)["facts"]["step"] for line in captured.out.splitlines()]
    assert steps == [f"s{i}" for i in range(6)]  # each once, none lost, none twice
    assert captured.err == "watchdogctl: events: the daemon closed the stream\n"
