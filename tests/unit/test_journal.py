"""The journal: durable append, replay, torn lines, restart state."""

from __future__ import annotations

import json
from pathlib import Path

from watchdogd.failover.journal import Journal, replay


def test_replay_reconstructs_everything(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.append({"type": "pause", "reason": "window", "at": 1})
    j.append({"type": "resume", "at": 2})
    j.append(
        {
            "type": "failover_started",
            "id": "a",
            "trigger": "automatic",
            "kind": "failover",
            "reason": "down",
            "from": "main",
            "to": "failover",
            "steps": ["s1", "s2"],
            "at": 10,
        }
    )
    j.append(
        {
            "type": "step_started",
            "id": "a",
            "step": "s1",
            "action": "promote",
            "attempt": 1,
            "at": 11,
        }
    )
    j.append(
        {
            "type": "step_finished",
            "id": "a",
            "step": "s1",
            "action": "promote",
            "outcome": "ok",
            "at": 12,
        }
    )
    j.append(
        {
            "type": "step_started",
            "id": "a",
            "step": "s2",
            "action": "command",
            "attempt": 1,
            "at": 13,
        }
    )
    j.close()
    state = Journal(tmp_path).load()
    assert not state.paused and state.last_automatic_at == 10
    fo = state.unfinished
    assert fo is not None and fo.id == "a" and fo.plan == ["s1", "s2"] and fo.promoted
    s2 = fo.step("s2")
    assert s2.started_at == 13 and s2.outcome is None and s2.attempts == 1
    assert state.awaiting_ack is None


def test_ack_swaps_roles(tmp_path: Path) -> None:
    lines = [
        {
            "type": "failover_started",
            "id": "a",
            "trigger": "manual",
            "from": "main",
            "to": "failover",
            "steps": [],
            "at": 1,
        },
        {"type": "failover_finished", "id": "a", "outcome": "completed", "at": 2},
    ]
    state = replay([json.dumps(x) for x in lines])
    assert state.awaiting_ack is not None and state.last_automatic_at is None
    state = replay(
        [json.dumps(x) for x in lines]
        + [
            json.dumps(
                {"type": "ack", "id": "a", "primary": "failover", "standby": "main", "at": 3}
            )
        ]
    )
    assert state.awaiting_ack is None and (state.primary, state.standby) == ("failover", "main")


def test_torn_last_line_is_reported_not_fatal_and_sealed(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.append({"type": "pause", "reason": "x", "at": 1})
    j.close()
    with (tmp_path / "journal.jsonl").open("a") as f:
        f.write('{"type": "resume", "a')  # crash mid-write
    j2 = Journal(tmp_path)
    state = j2.load()
    assert state.paused and len(state.problems) == 1 and "torn last line" in state.problems[0]
    j2.append({"type": "resume", "at": 3})
    j2.close()
    state = Journal(tmp_path).load()
    assert not state.paused  # the new record is readable after the torn one
    assert len(state.problems) == 1 and "unreadable line" in state.problems[0]


def test_garbage_and_unknown_records_never_crash() -> None:
    state = replay(
        [
            "[1,2]",
            "{}",
            '{"type": "step_finished", "id": "nope", "step": "x"}',
            '{"type": "future_thing", "at": 1}',
            "not json",
            "",
        ]
    )
    assert state.failovers == [] and len(state.problems) >= 3


def test_records_are_on_disk_after_append(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.append({"type": "pause", "at": 1})
    # readable by another reader without close(): append wrote and fsync'd
    assert json.loads((tmp_path / "journal.jsonl").read_text())["type"] == "pause"
    j.close()
