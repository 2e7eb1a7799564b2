"""The runner with real `command` steps (real processes) and a real journal on disk."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from watchdogd import actions, config
from watchdogd.actions import StepContext
from watchdogd.failover.journal import Journal, apply
from watchdogd.failover.runner import Runner
from watchdogd.policy import build_plan


def make_config(tmp_path: Path, steps: list[dict[str, Any]], **failover: Any) -> config.Config:
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

    def record(self, rec: dict[str, Any]) -> None:
        self.journal.append(rec)
        apply(self.state, rec)

    def emit(self, event: str, **facts: Any) -> None:
        self.events.append((event, facts))

    def runner(self, resume: Any = None, plan_id: str = "F1") -> Runner:
        plan = build_plan(
            self.cfg.failover,
            id=plan_id,
            kind="failover",
            trigger="manual",
            reason="test",
            from_node="main",
            to_node="failover",
        )
        ctx = StepContext(
            config=self.cfg,
            primary=self.cfg.primary,
            standby=self.cfg.standby,
            engines={},
            failover_id=plan.id,
            reason="test",
            trigger="manual",
        )
        acts = {s.name: actions.build(s, self.cfg) for s in plan.steps}
        return Runner(plan, ctx, acts, self.record, self.emit, resume=resume)


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
    h.record(
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
    h.record({"type": "step_started", "id": "F1", "step": "a", "attempt": 1, "at": 1})
    h.record({"type": "step_finished", "id": "F1", "step": "a", "outcome": "ok", "at": 2})
    h.record({"type": "step_started", "id": "F1", "step": "b", "attempt": 1, "at": 3})
    assert await h.runner(resume=h.state.unfinished).run() == "completed"
    assert log.read_text().splitlines() == ["b failover F1", "c failover F1"]
    assert h.events[0][0] == "failover_resumed"


async def test_resume_refuses_to_rerun_non_idempotent_interrupted_step(tmp_path: Path) -> None:
    log = tmp_path / "log"
    h = Harness(tmp_path, [log_step("a", log), log_step("c", log)])
    h.record(
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
    h.record({"type": "step_started", "id": "F1", "step": "a", "attempt": 1, "at": 1})
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
