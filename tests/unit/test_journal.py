"""The journal: durable append, replay, torn lines, restart state."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest

from watchdogd.state import journal
from watchdogd.state.journal import (
    Journal,
    JournalDamaged,
    JournalError,
    JournalWriteError,
    plan_repair,
    replay,
)


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


def test_torn_last_line_is_reported_not_fatal_and_cut_away(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.append({"type": "pause", "reason": "x", "at": 1})
    j.close()
    intact = (tmp_path / "journal.jsonl").read_bytes()
    with (tmp_path / "journal.jsonl").open("a") as f:
        f.write('{"type": "resume", "a')  # crash mid-write
    j2 = Journal(tmp_path)
    state = j2.load()
    assert state.paused and len(state.problems) == 1 and "torn last line" in state.problems[0]
    # Cut away, not sealed: torn bytes left mid-journal would be a damaged line later.
    assert (tmp_path / "journal.jsonl").read_bytes() == intact
    j2.append({"type": "resume", "at": 3})
    j2.close()
    state = Journal(tmp_path).load()
    assert not state.paused  # the new record is readable after the torn one
    assert state.problems == [] and state.damaged == []


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


# ------------------------------------------------------------------ writes that fall short


def test_a_short_write_is_continued_until_every_byte_is_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    calls = []

    def short_write(fd: int, data: Any) -> int:
        calls.append(len(data))
        return real_write(fd, bytes(data[:7]))  # what a nearly full disk may do

    j = Journal(tmp_path)
    monkeypatch.setattr(os, "write", short_write)
    j.append({"type": "pause", "reason": "maintenance window", "by": "ops", "at": 1})
    monkeypatch.undo()
    j.append({"type": "resume", "at": 2})
    j.close()
    assert len(calls) > 5
    state = Journal(tmp_path).load()
    assert state.damaged == [] and not state.paused
    assert len((tmp_path / "journal.jsonl").read_text().splitlines()) == 2


def test_a_failed_write_is_cut_back_and_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = Journal(tmp_path)
    j.append({"type": "pause", "reason": "x", "at": 1})
    before = (tmp_path / "journal.jsonl").read_bytes()
    real_write = os.write
    state = {"n": 0}

    def half_then_enospc(fd: int, data: Any) -> int:
        state["n"] += 1
        if state["n"] == 1:
            return real_write(fd, bytes(data[:10]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_enospc)
    with pytest.raises(JournalWriteError, match="No space left on device"):
        j.append({"type": "resume", "at": 2})
    monkeypatch.undo()
    assert (tmp_path / "journal.jsonl").read_bytes() == before  # no half record left
    j.append({"type": "resume", "at": 3})
    j.close()
    loaded = Journal(tmp_path).load()
    assert loaded.damaged == [] and not loaded.paused


def test_full_disk_loses_no_acknowledged_record(tiny_tmpfs: Path) -> None:
    j = Journal(tiny_tmpfs)
    j.open()
    written = 0
    with pytest.raises(JournalWriteError, match="No space left on device"):
        for n in range(10_000):
            kind = "pause" if n % 2 == 0 else "resume"
            j.append({"type": kind, "reason": "x" * 150, "at": n})
            written += 1
    size = (tiny_tmpfs / "journal.jsonl").stat().st_size
    # Every record that append() acknowledged is there and whole; nothing half-written.
    with pytest.raises(JournalWriteError):
        j.append({"type": "pause", "reason": "y", "at": 1e6})
    assert (tiny_tmpfs / "journal.jsonl").stat().st_size == size
    j.close()
    state = Journal(tiny_tmpfs).load()
    assert state.damaged == [] and state.problems == []
    assert len((tiny_tmpfs / "journal.jsonl").read_text().splitlines()) == written
    assert state.paused == (written % 2 == 1)  # the last acknowledged record decides


def test_open_refuses_a_journal_the_disk_cannot_take(tiny_tmpfs: Path) -> None:
    (tiny_tmpfs / "filler").write_bytes(b"\0" * 9000)
    j = Journal(tiny_tmpfs)
    with pytest.raises(JournalWriteError, match="is not writable") as raised:
        j.open()
    assert "\n" not in str(raised.value)
    assert not [p for p in tiny_tmpfs.iterdir() if p.name.startswith(".write-test")]
    j.close()


def test_journal_and_lock_do_not_follow_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "journal.jsonl").symlink_to(target)
    j = Journal(state_dir)
    with pytest.raises(JournalError, match="cannot be read"):
        j.load()
    with pytest.raises(JournalWriteError):
        j.open()
    with pytest.raises(JournalWriteError):
        j.append({"type": "pause", "at": 1})
    (state_dir / "lock").symlink_to(target)
    with pytest.raises(OSError):
        j.lock()
    assert target.read_text() == "precious\n"
    j.close()


# ------------------------------------------------------------------ damaged lines


def failed_failover_then_pause(tmp_path: Path) -> list[str]:
    """A failover that promoted, then failed (awaits an ack), then a pause."""
    j = Journal(tmp_path)
    j.append(
        journal.sequence_started(
            "failover",
            id="F1",
            trigger="automatic",
            kind="failover",
            reason="down",
            from_node="main",
            to_node="failover",
            steps=["promote_standby", "switch_traffic"],
            at=1,
        )
    )
    for rec in (
        journal.step_started(
            "failover", id="F1", step="promote_standby", action="promote", attempt=1, at=2
        ),
        journal.step_finished(
            "failover", id="F1", step="promote_standby", action="promote", outcome="ok", at=3
        ),
        journal.sequence_finished(
            "failover", id="F1", outcome="failed", error="step switch_traffic failed", at=4
        ),
        journal.pause(reason="investigating", by="ops", at=5),
    ):
        j.append(rec)
    j.close()
    return (tmp_path / "journal.jsonl").read_text().splitlines()


def rewrite(tmp_path: Path, lines: list[str]) -> None:
    (tmp_path / "journal.jsonl").write_text("".join(line + "\n" for line in lines))


@pytest.mark.parametrize(
    "damage",
    [
        lambda line: line.replace('"outcome":"failed"', '"outcome":"faile"'),  # a bit flipped
        lambda line: line.replace('"failover_finished"', '"failover_finishez"'),  # type lost
        lambda line: line[:25] + "\0" * 10 + line[35:],
        lambda line: line.replace(',"crc"', ',"crd"'),  # checksum key lost
    ],
    ids=["outcome", "type", "nul-bytes", "crc-key"],
)
def test_a_damaged_failover_finished_refuses_start_instead_of_promoting_again(
    tmp_path: Path, damage: Any
) -> None:
    lines = failed_failover_then_pause(tmp_path)
    assert json.loads(lines[3])["type"] == "failover_finished"
    lines[3] = damage(lines[3])
    rewrite(tmp_path, lines)
    # Skipped, it would turn a failed failover into an unfinished one: resumed, promoted again.
    with pytest.raises(JournalDamaged) as raised:
        Journal(tmp_path).load()
    message = str(raised.value)
    assert "\n" not in message
    assert f"{tmp_path / 'journal.jsonl'} line 4 is damaged" in message
    assert "watchdogd journal check" in message and "watchdogd journal repair" in message


def test_a_damaged_line_ending_the_file_with_its_newline_is_not_a_torn_write(
    tmp_path: Path,
) -> None:
    lines = failed_failover_then_pause(tmp_path)[:4]
    lines[3] = lines[3].replace('"outcome":"failed"', '"outcome":"faile"')
    rewrite(tmp_path, lines)  # complete with its newline: damaged after it was written
    with pytest.raises(JournalDamaged, match="line 4"):
        Journal(tmp_path).load()


def test_a_torn_tail_of_nul_bytes_is_cut_away(tmp_path: Path) -> None:
    lines = failed_failover_then_pause(tmp_path)
    with (tmp_path / "journal.jsonl").open("ab") as f:
        f.write(b"\0" * 300)  # a crash after the size grew, before the data landed
    state = Journal(tmp_path).load()
    assert state.paused and state.awaiting_ack is not None and state.unfinished is None
    assert (tmp_path / "journal.jsonl").read_text().splitlines() == lines


def test_journals_without_checksums_are_still_read(tmp_path: Path) -> None:
    old = [
        {"type": "pause", "reason": "x", "at": 1},
        {"type": "resume", "at": 2},
    ]
    rewrite(tmp_path, [json.dumps(r) for r in old])
    j = Journal(tmp_path)
    state = j.load()
    assert not state.paused and state.damaged == []
    j.append({"type": "pause", "reason": "y", "at": 3})
    j.close()
    lines = (tmp_path / "journal.jsonl").read_text().splitlines()
    assert '"crc":"' in lines[-1]
    # Once lines carry checksums, a later line without one is not trusted.
    rewrite(tmp_path, [*lines, json.dumps({"type": "resume", "at": 4}), lines[-1]])
    with pytest.raises(JournalDamaged, match=r"line 4 is damaged \(no checksum"):
        Journal(tmp_path).load()


@pytest.mark.parametrize(
    "record",
    [
        '{"type": "pause", "at": "nan"}',
        '{"type": "pause", "at": NaN}',
        '{"type": "pause", "at": Infinity}',
        '{"type": "pause", "at": 1e999}',
        '{"type": "failover_started", "id": 7, "trigger": "automatic", "from": "a", "to": "b"}',
        '{"type": "failover_started", "id": "x", "trigger": "automatic", "from": "a", '
        '"to": "b", "steps": [[[[["deep"]]]]]}',
        '{"type": "failover_started", "id": "x", "trigger": "automatic", "from": "a", '
        '"to": "b", "forced": "yes"}',
        '{"type": "pause", "at": 1, "reason": {"a": 1}}',
        "[" * 5000 + "]" * 5000,
        '{"type": "pause", "at": 1, "x": ' + "[" * 5000 + "]" * 5000 + "}",
        '{"type": "pause", "at": ' + "9" * 5000 + "}",
    ],
    ids=[
        "at-string",
        "at-nan",
        "at-inf",
        "at-overflow",
        "id-int",
        "steps-nested",
        "forced-str",
        "reason-object",
        "deep-array",
        "deep-field",
        "huge-int",
    ],
)
def test_a_field_of_the_wrong_type_is_a_damaged_line(record: str) -> None:
    state = replay([record, '{"type": "resume", "at": 2}', ""])
    assert [d.line for d in state.damaged] == [1] and not state.damaged[0].last


def test_encoding_refuses_what_replay_would_refuse(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    with pytest.raises(JournalWriteError, match="cannot be encoded"):
        j.append({"type": "pause", "at": float("nan")})
    assert (
        not (tmp_path / "journal.jsonl").exists()
        or (tmp_path / "journal.jsonl").read_bytes() == b""
    )
    j.close()


# ------------------------------------------------------------------ repair


def test_repair_refuses_to_drop_what_may_have_ended_a_failover(tmp_path: Path) -> None:
    lines = failed_failover_then_pause(tmp_path)
    lines[3] = lines[3].replace('"outcome":"failed"', '"outcome":"faile"')
    data = "".join(line + "\n" for line in lines).encode()
    repair = plan_repair(data, close_unfinished=False, at=10)
    assert [d.line for d in repair.dropped] == [4]
    assert repair.refusals and "failover F1 looks unfinished" in repair.refusals[0]
    assert "--close-unfinished" in repair.refusals[0]

    closing = plan_repair(data, close_unfinished=True, at=10)
    assert closing.refusals == []
    (closed,) = closing.appended
    assert closed["type"] == "failover_finished" and closed["outcome"] == "failed"
    assert "line(s) 4" in closed["error"]
    state = replay(closing.content.decode().split("\n"))
    assert state.damaged == [] and state.unfinished is None
    fo = state.awaiting_ack
    assert fo is not None and fo.id == "F1" and fo.promoted and state.paused


def test_repair_drops_a_damaged_pause_and_says_automatic_failover_is_armed(
    tmp_path: Path,
) -> None:
    lines = failed_failover_then_pause(tmp_path)
    lines.append(journal.encode_line({"type": "resume", "at": 6}).decode().rstrip("\n"))
    lines.append(journal.encode_line({"type": "pause", "at": 7}).decode().rstrip("\n"))
    lines[-1] = lines[-1].replace('"pause"', '"pausE"')
    lines.append(
        journal.encode_line(
            {"type": "ack", "id": "F1", "primary": "failover", "standby": "main", "at": 8}
        )
        .decode()
        .rstrip("\n")
    )
    data = "".join(line + "\n" for line in lines).encode()
    repair = plan_repair(data, close_unfinished=False, at=10)
    assert [d.line for d in repair.dropped] == [7] and repair.refusals == []
    assert any("line 7 may have been a pause" in n and "armed" in n for n in repair.notes)


def test_repair_refuses_to_forget_a_failover_whose_start_is_damaged(tmp_path: Path) -> None:
    lines = failed_failover_then_pause(tmp_path)
    lines[0] = lines[0].replace('"trigger":"automatic"', '"trigger":"automatiq"')
    data = "".join(line + "\n" for line in lines).encode()
    for close in (False, True):
        repair = plan_repair(data, close_unfinished=close, at=10)
        assert [d.line for d in repair.dropped] == [1]
        assert any("failover(s) F1" in r and "restore that line" in r for r in repair.refusals)


# The lines as watchdogd has always written them: journals on disk must keep loading, and
# a record must keep its bytes (the checksum covers them).
GOLDEN = [
    b'{"type":"failover_started","id":"F1","trigger":"automatic","kind":"failover",'
    b'"reason":"primary down","from":"a","to":"b","steps":["stop_replication","promote"],'
    b'"forced":false,"at":1.5,"pending":true,"crc":"8de7a8c0"}\n',
    b'{"type":"fence_started","id":"X1","trigger":"automatic","kind":"fence",'
    b'"reason":"old primary writable","from":"a","to":"b","steps":["fence"],"forced":false,'
    b'"at":3,"failover_id":"F1","crc":"cadc6464"}\n',
    b'{"type":"step_started","id":"F1","step":"promote","action":"promote","attempt":1,'
    b'"at":4,"crc":"fd684053"}\n',
    b'{"type":"step_finished","id":"F1","step":"promote","action":"promote","outcome":"ok",'
    b'"error":null,"detail":"promoted","seconds":0.1235,"at":5,"crc":"bb986474"}\n',
    b'{"type":"failover_finished","id":"F1","outcome":"completed","error":null,"at":6,'
    b'"crc":"c8ab9355"}\n',
    b'{"type":"pause","reason":"upgrade","by":"ops","at":7,"crc":"2c0c6b0f"}\n',
    b'{"type":"resume","by":"ops","at":8,"crc":"cf35134c"}\n',
    b'{"type":"ack","id":"F1","primary":"b","standby":"a","at":9,"by":"ops","crc":"b9732ed8"}\n',
]


def test_records_keep_their_bytes_and_round_trip() -> None:
    records = [
        journal.sequence_started(
            "failover", id="F1", trigger="automatic", kind="failover", reason="primary down",
            from_node="a", to_node="b", steps=["stop_replication", "promote"], at=1.5,
            pending=True,
        ),
        journal.sequence_started(
            "fence", id="X1", trigger="automatic", kind="fence", reason="old primary writable",
            from_node="a", to_node="b", steps=["fence"], at=3, failover_id="F1",
        ),
        journal.step_started(
            "failover", id="F1", step="promote", action="promote", attempt=1, at=4
        ),
        journal.step_finished(
            "failover", id="F1", step="promote", action="promote", outcome="ok", at=5,
            detail="promoted", seconds=0.123456,
        ),
        journal.sequence_finished("failover", id="F1", outcome="completed", error=None, at=6),
        journal.pause(reason="upgrade", by="ops", at=7),
        journal.resume(by="ops", at=8),
        journal.ack(id="F1", primary="b", standby="a", at=9, by="ops"),
    ]  # fmt: skip
    assert [journal.encode_line(r) for r in records] == GOLDEN
    for line in GOLDEN:
        rec = journal.decode_line(line.decode().rstrip("\n"))
        decoded = journal.decode(rec)
        assert decoded is not None
        assert journal.encode(decoded) == rec
    state = journal.replay([line.decode().rstrip("\n") for line in GOLDEN])
    assert not state.damaged and not state.problems
    fo = state.failovers[0]
    assert (fo.outcome, fo.acked_at, fo.steps[0].outcome) == ("completed", 9, "ok")
    assert state.fences[0].failover_id == "F1"
    assert (state.primary, state.paused) == ("b", False)
    assert state.last_automatic_at is None  # pending: cancellable, no cooldown yet
