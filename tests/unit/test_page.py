"""The status page's renderer (``watchdogd.daemon.page.render``), a pure function: what it
shows, that every piece of daemon text is escaped, and that nothing on it can act.

The page is parsed back with the standard library's HTML parser: a hostile string must
come back as text, never as an element or attribute."""

from __future__ import annotations

import copy
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_commands import SECRET as COMMANDS_SECRET
from tests.unit.test_commands import Rig as CommandsRig
from watchdogd.core import httpd
from watchdogd.daemon.page import render
from watchdogd.state import journal

NOW = 1796283600.0
HOSTILE = '<script>alert("x")</script>'
ATTRIBUTE = '"><img src=x onerror=alert(1)>'

STATUS: dict[str, Any] = {
    "cluster": "orders & co",
    "version": "0.1.0",
    "state": "failed_over",
    "reason": f"failed over from main to failover; {HOSTILE}",
    "mode": "automatic",
    "armed": False,
    "paused": False,
    "pause_reason": None,
    "awaiting_ack": True,
    "cooldown_left": 3540.0,
    "roles": {"primary": "failover", "standby": "main"},
    "nodes": [
        {"name": "failover", "role": "primary",
         "database": {"ok": True, "detail": "primary, read-write", "latency": 0.0021,
                      "writable": True, "is_primary": True},
         "app": {"ok": True, "detail": "HTTP 200", "latency": 0.003}},
        {"name": "main", "role": "standby",
         "database": {"ok": False, "detail": f"connection refused {ATTRIBUTE}", "latency": 0.01},
         "app": {"ok": False, "detail": "HTTP 503", "latency": 0.004}},
    ],
    "outage_seconds": 62.5,
    "verdict": {"failing": ["main/database: connection refused", "main/app: HTTP 503"]},
    "lag": {"bytes": 1_572_864, "seconds": 0.25, "streaming": False},
    "writable_primaries": 1,
    "failover_in_progress": None,
    "last_failover": None,
    "last_cycle_at": NOW - 0.4,
    "journal_error": None,
    "readiness": {
        "ready": False,
        "checked_at": NOW - 3,
        "checks": [
            {"name": "standby_replicating", "ok": False, "severity": "error",
             "detail": f"the standby is not streaming {HOSTILE}"},
            {"name": "standby_reachable", "ok": True, "severity": "error", "detail": "answers"},
            {"name": "detection_speed", "ok": False, "severity": "warning",
             "detail": "wal_receiver_timeout 60s is longer than the outage threshold 30s"},
        ],
    },
}  # fmt: skip

FAILOVERS: list[dict[str, Any]] = [
    {"id": "20261203T073807Z-9acb", "trigger": "automatic", "kind": "failover",
     "reason": "primary database down for 30.0s and the standby agrees",
     "from": "main", "to": "failover", "started_at": NOW - 60, "finished_at": NOW - 59.7,
     "outcome": "completed", "error": None, "acked_at": None, "forced": False,
     "steps": [
         {"name": "stop_replication", "action": "stop_replication", "started_at": NOW - 60,
          "finished_at": NOW - 59.96, "outcome": "ok", "attempts": 1, "error": None,
          "detail": "replication stopped"},
         {"name": "promote_standby", "action": "promote", "started_at": NOW - 59.9,
          "finished_at": NOW - 59.75, "outcome": "ok", "attempts": 1, "error": None,
          "detail": "promoted to primary (timeline 2); accepts writes"},
         {"name": "switch_traffic", "action": "command", "started_at": NOW - 59.74,
          "finished_at": NOW - 59.7, "outcome": "failed", "attempts": 2,
          "error": f"exit 1: </td></table><form action=/pause>{HOSTILE}", "detail": None},
     ]},
    {"id": "20261201T010000Z-0001", "trigger": "manual", "kind": "failover", "reason": "drill",
     "from": "failover", "to": "main", "started_at": NOW - 86400 * 2,
     "finished_at": NOW - 86400 * 2 + 4, "outcome": "aborted", "error": "aborted by operator",
     "acked_at": NOW - 86400, "forced": True, "steps": []},
]  # fmt: skip


# Elements whose start separates words, as a browser lays them out.
_BLOCKS = frozenset(
    "p h1 h2 h3 dt dd li th td tr table dl ul section article header footer".split()
)


class Page(HTMLParser):
    """Elements, attributes and text of a rendered page."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.chunks: list[str] = []
        self._skip = 0
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag in _BLOCKS:
            self.chunks.append(" ")
        if tag in ("style", "title"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "title"):
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.chunks.append(data)

    @property
    def text(self) -> str:
        return " ".join("".join(self.chunks).split())

    def named(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for t, attrs in self.tags if t == tag]


@pytest.fixture
def page() -> Page:
    return Page(render(STATUS, FAILOVERS, NOW))


def test_hostile_text_is_shown_as_text_never_as_markup(page: Page) -> None:
    assert not page.named("script") and not page.named("img") and not page.named("form")
    assert all(not k.startswith("on") for _, attrs in page.tags for k in attrs)
    # ... and reads back exactly as the daemon said it.
    assert f"failed over from main to failover; {HOSTILE}" in page.text
    assert f"connection refused {ATTRIBUTE}" in page.text
    assert f"error: exit 1: </td></table><form action=/pause>{HOSTILE}" in page.text
    assert f"the standby is not streaming {HOSTILE}" in page.text
    assert "watchdogd: cluster orders & co" in page.text


def test_nothing_on_the_page_can_change_anything(page: Page) -> None:
    for tag in ("script", "form", "input", "button", "iframe", "object", "embed", "link"):
        assert not page.named(tag), tag
    assert sorted(a["href"] or "" for a in page.named("a")) == ["/healthz", "/metrics"]
    (refresh,) = [m for m in page.named("meta") if m.get("http-equiv") == "refresh"]
    assert refresh["content"] == "5"


def test_it_shows_the_state_nodes_lag_readiness_and_failovers(page: Page) -> None:
    text = page.text
    for expected in [
        "State failed_over",
        "Mode automatic, not armed",
        "Awaiting ack yes",
        "Cooldown left 59 min 0 s",
        "Roles primary failover, standby main",
        "Outage 1 min 2 s",
        "Failing main/database: connection refused; main/app: HTTP 503",
        "Last probe cycle 2026-12-03 07:39:59 UTC (400 ms ago)",
        # nodes with their roles and probe results
        "failover primary ok (2 ms) yes ok (3 ms)",
        'main standby FAIL connection refused "><img src=x onerror=alert(1)> - FAIL HTTP 503',
        # lag
        "Behind by 1.6 MB Replay delay 250 ms Streaming no",
        # readiness: not ready, what is wrong first
        "not ready to fail over; checked 2026-12-03 07:39:57 UTC (3.0 s ago).",
        "What is wrong error standby_replicating: the standby is not streaming",
        "warning detection_speed: wal_receiver_timeout 60s is longer than the outage",
        "standby_reachable ok answers",
        # the last failover with its step timeline, then the one before
        "20261203T073807Z-9acb: completed",
        "From → to main → failover",
        "stop_replication stop_replication +0.0 s ok 40 ms 1 replication stopped",
        "promote_standby promote +0.1 s ok 150 ms 1 promoted to primary (timeline 2)",
        "switch_traffic command +0.3 s failed 40 ms 2 error: exit 1",
        "Acked not yet",
        "20261201T010000Z-0001: aborted",
        "Trigger manual (forced)",
        "Error aborted by operator",
        "No step ran.",
    ]:
        assert expected in text, expected
    assert text.index("20261203T073807Z-9acb") < text.index("20261201T010000Z-0001")
    # Sections are headed, nodes and steps are tables, facts are definition lists.
    assert len(page.named("h2")) == 5 and len(page.named("table")) == 3
    assert len(page.named("dl")) >= 4


def test_a_ready_daemon_and_one_without_readiness() -> None:
    ready = copy.deepcopy(STATUS)
    ready["readiness"] = {
        "ready": True,
        "checked_at": NOW - 1,
        "checks": [{"name": "standby_reachable", "ok": True, "severity": "error", "detail": ""}],
    }
    text = Page(render(ready, [], NOW)).text
    assert "ready to fail over" in text and "not ready" not in text
    assert "What is wrong" not in text and "No failover recorded." in text
    del ready["readiness"]
    assert "Readiness Not reported by this daemon." in Page(render(ready, [], NOW)).text


def test_unknown_lag_says_why_when_the_standby_does_not_answer() -> None:
    dead = copy.deepcopy(STATUS)
    dead["lag"] = {"bytes": None, "seconds": None, "streaming": None}
    text = Page(render(dead, [], NOW)).text
    assert (
        "Behind by unknown Replay delay unknown Streaming unknown Why unknown the standby's "
        "database does not answer (see Nodes)"
    ) in text
    dead["nodes"][1]["database"] = {"ok": True, "detail": "standby", "latency": 0.001}
    assert "Why unknown" not in Page(render(dead, [], NOW)).text


@pytest.mark.parametrize(
    "status",
    [
        {},
        {"state": None, "nodes": [None, 5, {"database": "x"}], "lag": "x", "roles": [],
         "readiness": {"checks": [None, {"ok": "maybe"}]}, "last_cycle_at": float("nan"),
         "outage_seconds": True, "verdict": {"failing": "x"}},
    ],
)  # fmt: skip
def test_missing_or_mistyped_values_still_render(status: dict[str, Any]) -> None:
    odd: list[Any] = [{"steps": [None, {"started_at": "x"}]}, {"outcome": None}]
    text = Page(render(status, odd, NOW)).text
    assert "watchdogd: cluster ?" in text and "Replication" in text


# --------------------------------------------------------------------------- the route


async def test_the_route_serves_the_journal_history_masked_and_escaped(tmp_path: Path) -> None:
    """``Views.page`` of a daemon built in-process, over a journal holding a failover
    whose step error quotes a secret and markup (as a remote system's answer may)."""
    rig = CommandsRig(tmp_path)
    j = rig.d.journal
    j.append(
        journal.sequence_started(
            "failover", id="F1", trigger="automatic", kind="failover", reason="down <b>x</b>",
            from_node="main", to_node="failover", steps=["promote_standby"], at=NOW - 10,
        )
    )  # fmt: skip
    j.append(
        journal.step_started(
            "failover", id="F1", step="promote_standby", action="promote", attempt=1, at=NOW - 9
        )
    )
    error = f"FATAL: password {COMMANDS_SECRET} rejected <script>"
    j.append(
        journal.step_finished(
            "failover", id="F1", step="promote_standby", action="promote", outcome="failed",
            at=NOW - 8, error=error,
        )
    )  # fmt: skip
    j.append(journal.sequence_finished("failover", id="F1", outcome="failed", error=error, at=1))
    rig.load()
    # The journal holds what the step said; the page is what must mask it.
    assert COMMANDS_SECRET in (rig.d.state.failovers[-1].steps[0].error or "")
    response = await rig.d.views.page(httpd.Request("GET", "/", {}))
    assert response.content_type == "text/html" and response.charset == "utf-8"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["Cache-Control"] == "no-store"
    assert response.text is not None
    assert COMMANDS_SECRET not in response.text
    page = Page(response.text)
    assert not page.named("script") and not page.named("b")
    assert "F1: failed" in page.text and "Reason down <b>x</b>" in page.text
    assert "promote_standby promote +1.0 s failed" in page.text
    assert "error: FATAL: password *** rejected <script>" in page.text
