"""The runner with real `command` steps (real processes) and a real journal on disk."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from watchdogd import actions, config
from watchdogd.actions import StepContext
from watchdogd.core.model import Config
from watchdogd.failover.runner import Runner
from watchdogd.policy import build_plan
from watchdogd.state.journal import Journal, apply, replay


def make_config(tmp_path: Path, steps: list[dict[str, Any]], **failover: Any) -> Config:
    return config.parse(
        {
            "cluster": "orders",
            "primary": {
                "name": "main",
                "database": {"engine": "postgres", "dsn": "postgresql://u@127.0.0.1:1/x"},
            },
            "standby": {
                "name": "failover",
                "database": {"engine": "postgres", "dsn": "postgresql://u@127.0.0.1:2/x"},
            },
            "failover": {"steps": steps, **failover},
            "state_dir": str(tmp_path),
        }
    )


def log_step(name: str, log: Path, **kw: Any) -> dict[str, Any]:
    return {
        "name": name,
        "action": "command",
        "timeout": "5s",
        "argv": ["sh", "-c", f'echo "{name} {{standby.name}} {{failover_id}}" >> {log}'],
        **kw,
    }


class Harness:
    def __init__(self, tmp_path: Path, steps: list[dict[str, Any]], **failover: Any) -> None:
        self.cfg = make_config(tmp_path, steps, **failover)
        self.journal = Journal(tmp_path)
        self.state = self.journal.load()
        self.events: list[tuple[str, dict[str, Any]]] = []

    async def record(self, rec: dict[str, Any]) -> None:
        self.journal.append(rec)
        apply(self.state, rec)

    def emit(self, event: str, **facts: Any) -> None:
        self.events.append((event, facts))

    def runner(self, resume: Any = None, plan_id: str = "F1", fence: bool = False) -> Runner:
        plan = build_plan(
            self.cfg.failover,
            id=plan_id,
            kind="failover",
            trigger="manual",
            reason="test",
            from_node="main",
            to_node="failover",
        )
        if fence:
            plan = replace(
                plan,
                kind="fence",
                trigger="split_brain",
                steps=self.cfg.failover.fence_steps,
            )
        ctx = StepContext(
            config=self.cfg,
            primary=self.cfg.primary,
            standby=self.cfg.standby,
            engines={},
            # A fence's steps see the failover whose old primary they fence, as in the daemon.
            failover_id="F0" if fence else plan.id,
            reason="test",
            trigger="manual",
        )
        acts = {s.name: actions.build(s, self.cfg) for s in plan.steps}
        return Runner(
            plan,
            ctx,
            acts,
            self.record,
            self.emit,
            resume=resume,
            failover_id="F0" if fence else None,
        )


async def test_steps_run_in_order_with_placeholders(tmp_path: Path) -> None:
    log = tmp_path / "log"
    h = Harness(tmp_path, [log_step(n, log) for n in ("a", "b", "c")])
    assert await h.runner().run() == "completed"
    assert log.read_text().splitlines() == ["a failover F1", "b failover F1", "c failover F1"]
    fo = h.state.last
    assert fo is not None and fo.outcome == "completed"
    assert [s.outcome for s in fo.steps] == ["ok", "ok", "ok"]
    names = [e for e, _ in h.events]
    assert names[0] == "failover_started" and names[-1] == "failover_completed"


async def test_required_step_failure_stops_sequence_after_retries(tmp_path: Path) -> None:
    log = tmp_path / "log"
    attempts = tmp_path / "attempts"
    failing = {
        "name": "bad",
        "action": "command",
        "retries": 2,
        "retry_delay": "10ms",
        "argv": ["sh", "-c", f"echo x >> {attempts}; echo 'no route' >&2; exit 3"],
    }
    h = Harness(tmp_path, [log_step("a", log), failing, log_step("c", log)])
    assert await h.runner().run() == "failed"
    assert log.read_text().splitlines() == ["a failover F1"]  # c never ran
    assert len(attempts.read_text().splitlines()) == 3
    fo = h.state.last
    assert fo is not None and fo.outcome == "failed"
    assert "step bad failed: sh exited with 3: no route" == fo.error
    assert fo.step("bad").attempts == 3


async def test_optional_step_failure_continues(tmp_path: Path) -> None:
    log = tmp_path / "log"
    h = Harness(
        tmp_path,
        [
            {"name": "best_effort", "action": "command", "required": False, "argv": ["false"]},
            log_step("b", log),
        ],
    )
    assert await h.runner().run() == "completed"
    assert log.read_text().splitlines() == ["b failover F1"]


async def test_timeout_kills_step(tmp_path: Path) -> None:
    h = Harness(
        tmp_path,
        [{"name": "slow", "action": "command", "timeout": "200ms", "argv": ["sleep", "30"]}],
    )
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await h.runner().run() == "failed"
    assert loop.time() - t0 < 2
    assert h.state.last is not None and "within 0.2s" in (h.state.last.error or "")


async def test_abort_stops_before_next_step(tmp_path: Path) -> None:
    log = tmp_path / "log"
    h = Harness(
        tmp_path,
        [{"name": "slow", "action": "command", "argv": ["sleep", "0.3"]}, log_step("b", log)],
    )
    runner = h.runner()
    task = asyncio.create_task(runner.run())
    await asyncio.sleep(0.1)
    runner.abort("operator (test)")
    assert await task == "aborted"
    assert not log.exists()
    fo = h.state.last
    assert fo is not None and fo.step("slow").outcome == "ok"  # the running step finished
    assert fo.outcome == "aborted" and "aborted by operator (test)" in (fo.error or "")


async def test_resume_skips_done_steps_and_reruns_idempotent_interrupted(tmp_path: Path) -> None:
    log = tmp_path / "log"
    steps = [log_step("a", log), log_step("b", log, idempotent=True), log_step("c", log)]
    h = Harness(tmp_path, steps)
    # A previous daemon got as far as starting b, then died.
    await h.record(
        {
            "type": "failover_started",
            "id": "F1",
            "trigger": "manual",
            "from": "main",
            "to": "failover",
            "steps": ["a", "b", "c"],
            "at": 1,
        }
    )
    await h.record({"type": "step_started", "id": "F1", "step": "a", "attempt": 1, "at": 1})
    await h.record({"type": "step_finished", "id": "F1", "step": "a", "outcome": "ok", "at": 2})
    await h.record({"type": "step_started", "id": "F1", "step": "b", "attempt": 1, "at": 3})
    assert await h.runner(resume=h.state.unfinished).run() == "completed"
    assert log.read_text().splitlines() == ["b failover F1", "c failover F1"]
    assert h.events[0][0] == "failover_resumed"


async def test_resume_refuses_to_rerun_non_idempotent_interrupted_step(tmp_path: Path) -> None:
    log = tmp_path / "log"
    h = Harness(tmp_path, [log_step("a", log), log_step("c", log)])
    await h.record(
        {
            "type": "failover_started",
            "id": "F1",
            "trigger": "manual",
            "from": "main",
            "to": "failover",
            "steps": ["a", "c"],
            "at": 1,
        }
    )
    await h.record({"type": "step_started", "id": "F1", "step": "a", "attempt": 1, "at": 1})
    assert await h.runner(resume=h.state.unfinished).run() == "failed"
    assert not log.exists()
    fo = h.state.last
    assert fo is not None and fo.step("a").outcome == "interrupted"
    assert "not idempotent" in (fo.error or "")


async def test_secrets_masked_in_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKEN_T", "tok-123456")
    h = Harness(
        tmp_path,
        [
            {
                "name": "leak",
                "action": "command",
                "argv": [
                    sys.executable,
                    "-c",
                    "import sys; sys.exit('bad token ' + sys.argv[1])",
                    "${TOKEN_T}",
                ],
            }
        ],
    )
    assert await h.runner().run() == "failed"
    text = (tmp_path / "journal.jsonl").read_text()
    assert "tok-123456" not in text and "bad token ***" in text
    assert all("tok-123456" not in str(facts) for _, facts in h.events)


def failing_step(name: str, attempts: Path, **kw: Any) -> dict[str, Any]:
    return {
        "name": name,
        "action": "command",
        "argv": ["sh", "-c", f"echo x >> {attempts}; echo 'no route' >&2; exit 3"],
        **kw,
    }


def journal_types(tmp_path: Path) -> list[str]:
    lines = (tmp_path / "journal.jsonl").read_text().splitlines()
    return [json.loads(line)["type"] for line in lines]


async def test_fence_runs_through_the_runner_and_is_never_a_failover(tmp_path: Path) -> None:
    log = tmp_path / "log"
    attempts = tmp_path / "attempts"
    h = Harness(
        tmp_path,
        [log_step("a", log)],
        fence_steps=[
            failing_step("flaky", attempts, retries=1, retry_delay="10ms", required=False),
            {**log_step("fence_it", log), "action": "command"},
        ],
    )
    assert await h.runner(plan_id="fence-1", fence=True).run() == "completed"
    # Retries apply to fence steps too, and an optional one failing does not stop the fence.
    assert len(attempts.read_text().splitlines()) == 2
    # Step templates see the failover the fence belongs to.
    assert log.read_text().splitlines() == ["fence_it failover F0"]
    assert journal_types(tmp_path) == [
        "fence_started",
        "fence_step_started",
        "fence_step_started",
        "fence_step_finished",
        "fence_step_started",
        "fence_step_finished",
        "fence_finished",
    ]
    state = replay((tmp_path / "journal.jsonl").read_text().splitlines())
    assert state.failovers == [] and state.unfinished is None and state.last_automatic_at is None
    assert state.problems == []
    (fence,) = state.fences
    assert fence.id == "fence-1" and fence.failover_id == "F0" and fence.outcome == "completed"
    assert [(s.name, s.outcome, s.attempts) for s in fence.steps] == [
        ("flaky", "failed", 2),
        ("fence_it", "ok", 1),
    ]
    names = [e for e, _ in h.events]
    assert names == [
        "fence_started",
        "fence_step_started",
        "fence_step_retry",
        "fence_step_started",
        "fence_step_failed",
        "fence_step_started",
        "fence_step_completed",
        "fence_completed",
    ]
    # Nothing a failover's history, metrics or cooldown listens to.
    assert not any(n.startswith(("failover_", "step_")) for n in names)
    assert all(f["fence_id"] == "fence-1" and f["failover_id"] == "F0" for _, f in h.events)


async def test_required_fence_step_failing_fails_the_fence(tmp_path: Path) -> None:
    log = tmp_path / "log"
    attempts = tmp_path / "attempts"
    h = Harness(
        tmp_path,
        [log_step("a", log)],
        fence_steps=[
            {**failing_step("fence_db", attempts, retries=2, retry_delay="10ms"), "timeout": "2s"},
            log_step("after", log),
        ],
    )
    assert await h.runner(plan_id="fence-1", fence=True).run() == "failed"
    assert len(attempts.read_text().splitlines()) == 3 and not log.exists()
    (fence,) = h.state.fences
    assert fence.outcome == "failed" and "step fence_db failed: sh exited with 3" in (
        fence.error or ""
    )
    assert h.state.failovers == []
    assert h.events[-1][0] == "fence_failed"


async def test_a_promote_in_a_fence_never_marks_anything_promoted(tmp_path: Path) -> None:
    # Replay keeps fences apart: even a step named like a promotion cannot make roles swap.
    h = Harness(tmp_path, [log_step("a", tmp_path / "log")])
    await h.record(
        {
            "type": "fence_started",
            "id": "fence-1",
            "failover_id": "F0",
            "from": "main",
            "to": "failover",
            "steps": ["p"],
            "at": 1,
        }
    )
    await h.record(
        {"type": "fence_step_started", "id": "fence-1", "step": "p", "action": "promote", "at": 2}
    )
    await h.record(
        {
            "type": "fence_step_finished",
            "id": "fence-1",
            "step": "p",
            "action": "promote",
            "outcome": "ok",
            "at": 3,
        }
    )
    assert h.state.failovers == [] and h.state.awaiting_ack is None
    assert h.state.unfinished is None and h.state.unfinished_fence is not None


async def test_interrupt_cuts_the_retry_delay_short_and_the_retry_is_resumed(
    tmp_path: Path,
) -> None:
    log = tmp_path / "log"
    attempts = tmp_path / "attempts"
    steps = [log_step("a", log), failing_step("flaky", attempts, retries=3, retry_delay="30s")]
    h = Harness(tmp_path, steps)
    runner = h.runner()
    task = asyncio.create_task(runner.run())
    for _ in range(500):
        if any(e == "step_retry" for e, _ in h.events):
            break
        await asyncio.sleep(0.01)
    t0 = time.monotonic()
    runner.interrupt()
    assert await asyncio.wait_for(task, 2) == "interrupted"
    assert time.monotonic() - t0 < 1
    fo = h.state.unfinished
    assert fo is not None  # not finished: the next start resumes it
    flaky = fo.step("flaky")
    assert flaky.outcome == "pending_retry" and flaky.attempts == 1
    assert "attempt 1 failed (sh exited with 3: no route)" in (flaky.error or "")
    assert "retry delay" in (flaky.error or "")
    assert [e for e, _ in h.events][-2:] == ["step_interrupted", "failover_interrupted"]
    assert "step_failed" not in [e for e, _ in h.events]

    # The next start: a fresh journal reader resumes with the retries still owed (3 of 4
    # attempts left), and a non-idempotent command is retried: its attempt had ended.
    h2 = Harness(
        tmp_path,
        [log_step("a", log), failing_step("flaky", attempts, retries=3, retry_delay="10ms")],
    )
    resumed = h2.state.unfinished
    assert resumed is not None
    assert await h2.runner(resume=resumed).run() == "failed"
    assert len(attempts.read_text().splitlines()) == 4
    assert log.read_text().splitlines() == ["a failover F1"]  # a is not run again
    started = [
        json.loads(x)["attempt"]
        for x in (tmp_path / "journal.jsonl").read_text().splitlines()
        if json.loads(x)["type"] == "step_started" and json.loads(x)["step"] == "flaky"
    ]
    assert started == [1, 2, 3, 4]


async def test_abort_cuts_the_retry_delay_short(tmp_path: Path) -> None:
    attempts = tmp_path / "attempts"
    h = Harness(tmp_path, [failing_step("flaky", attempts, retries=3, retry_delay="30s")])
    runner = h.runner()
    task = asyncio.create_task(runner.run())
    for _ in range(500):
        if any(e == "step_retry" for e, _ in h.events):
            break
        await asyncio.sleep(0.01)
    runner.abort("operator (test)")
    assert await asyncio.wait_for(task, 2) == "aborted"
    fo = h.state.last
    assert fo is not None and fo.outcome == "aborted" and fo.step("flaky").outcome == "failed"


async def test_interrupted_fence_is_closed_not_left_to_resume(tmp_path: Path) -> None:
    attempts = tmp_path / "attempts"
    h = Harness(
        tmp_path,
        [log_step("a", tmp_path / "log")],
        fence_steps=[failing_step("fence_db", attempts, retries=3, retry_delay="30s")],
    )
    runner = h.runner(plan_id="fence-1", fence=True)
    task = asyncio.create_task(runner.run())
    for _ in range(500):
        if any(e == "fence_step_retry" for e, _ in h.events):
            break
        await asyncio.sleep(0.01)
    runner.interrupt()
    assert await asyncio.wait_for(task, 2) == "interrupted"
    (fence,) = h.state.fences
    assert fence.outcome == "interrupted" and fence.step("fence_db").outcome == "interrupted"
    assert h.state.unfinished_fence is None and h.state.failovers == []


async def test_resume_never_reruns_a_settled_optional_step(tmp_path: Path) -> None:
    # An optional, non-idempotent step a first restart marked interrupted must not run at
    # a second restart: its effect is unknown and a human was told to check it.
    log = tmp_path / "log"
    steps = [log_step("a", log, required=False), log_step("c", log)]
    h = Harness(tmp_path, steps)
    await h.record(
        {
            "type": "failover_started",
            "id": "F1",
            "trigger": "manual",
            "from": "main",
            "to": "failover",
            "steps": ["a", "c"],
            "at": 1,
        }
    )
    await h.record({"type": "step_started", "id": "F1", "step": "a", "attempt": 1, "at": 1})
    await h.record(
        {"type": "step_finished", "id": "F1", "step": "a", "outcome": "interrupted", "at": 2}
    )
    assert await h.runner(resume=h.state.unfinished).run() == "completed"
    assert log.read_text().splitlines() == ["c failover F1"]


@pytest.mark.parametrize("outcome", ["failed", "interrupted"])
async def test_resume_never_goes_past_a_required_step_that_already_failed(
    tmp_path: Path, outcome: str
) -> None:
    """A required step's failure is journaled, then the failover's end: a crash (or a
    full disk) between the two writes leaves the failover unfinished. The restart must
    close it as failed, not skip the failed step and run the promotion after it."""
    log = tmp_path / "log"
    h = Harness(tmp_path, [log_step("a", log), log_step("c", log)])
    await h.record(
        {
            "type": "failover_started",
            "id": "F1",
            "trigger": "manual",
            "from": "main",
            "to": "failover",
            "steps": ["a", "c"],
            "at": 1,
        }
    )
    await h.record({"type": "step_started", "id": "F1", "step": "a", "attempt": 1, "at": 1})
    await h.record(
        {
            "type": "step_finished",
            "id": "F1",
            "step": "a",
            "outcome": outcome,
            "error": "fence refused",
            "at": 2,
        }
    )
    assert await h.runner(resume=h.state.unfinished).run() == "failed"
    assert not log.exists()  # neither a nor c ran again
    fo = h.state.last
    assert fo is not None and fo.outcome == "failed"
    assert fo.error == f"step a {outcome} before the restart: fence refused"
