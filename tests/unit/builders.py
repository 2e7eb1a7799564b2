"""Small builders for pure tests: observations and db statuses without any server."""

from __future__ import annotations

from watchdogd.detector import Cycle
from watchdogd.engines import DbStatus
from watchdogd.probes import Observation

PRIMARY_UP = DbStatus(is_primary=True, writable=True, current_pos=1000, detail="primary")


def standby_status(
    streaming: bool = True,
    age: float | None = 0.1,
    receive: int = 1000,
    replay: int = 1000,
    link_timeout: float | None = 60.0,
) -> DbStatus:
    return DbStatus(
        is_primary=False,
        writable=False,
        receive_pos=receive,
        replay_pos=replay,
        streaming=streaming,
        last_receive_age=age,
        link_timeout=link_timeout,
        lag_seconds=0.0,
        detail="standby",
    )


def obs(
    target: str,
    ok: bool,
    at: float,
    probe: str = "database",
    db: DbStatus | None = None,
    sees: bool | None = None,
) -> Observation:
    return Observation(
        target, probe, ok, 0.001, "ok" if ok else "connection refused", at, db=db, sees_primary=sees
    )


def cycle(
    at: float,
    primary_ok: bool,
    standby_streaming: bool = False,
    standby_ok: bool = True,
    app_ok: bool | None = None,
    witnesses: tuple[bool | None, ...] = (),
    age: float | None = 0.1,
    link_timeout: float | None = 60.0,
) -> Cycle:
    return Cycle(
        at=at,
        primary_db=obs("main", primary_ok, at, db=PRIMARY_UP if primary_ok else None),
        standby_db=obs(
            "failover",
            standby_ok,
            at,
            db=standby_status(standby_streaming, age, link_timeout=link_timeout)
            if standby_ok
            else None,
        ),
        primary_app=None if app_ok is None else obs("main", app_ok, at, probe="app"),
        witnesses=tuple(
            obs(f"w{i}", v is not None, at, probe="witness", sees=v)
            for i, v in enumerate(witnesses)
        ),
    )
