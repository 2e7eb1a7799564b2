"""The fleet's config (issue 12): ``instance``, ``store`` and ``guard``, each problem one
line naming its path; the timing rule; secrets masked; without ``store:`` nothing new."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from watchdogd import config
from watchdogd.config import fleet_timing
from watchdogd.core.model import Config

EP = ["http://127.0.0.1:2379", "http://127.0.0.1:2380", "http://127.0.0.1:2381"]


def raw(**extra: Any) -> dict[str, Any]:
    return {
        "cluster": "orders",
        "primary": {
            "name": "main",
            "database": {"engine": "postgres", "dsn": "postgresql://u@127.0.0.1:1/x"},
        },
        "standby": {
            "name": "failover",
            "database": {"engine": "postgres", "dsn": "postgresql://u@127.0.0.1:2/x"},
        },
        "failover": {
            "steps": [
                {"name": "stop_replication", "action": "stop_replication", "timeout": "3s"},
                {"name": "promote_standby", "action": "promote", "timeout": "3s"},
            ],
            # In a fleet a rejoin must fit in the leader's authority too.
            "rejoin_steps": [{"name": "rejoin", "action": "rejoin", "timeout": "3s"}],
            "rejoin_timeout": "3s",
        },
        **extra,
    }


def fleet(store: dict[str, Any] | None = None, **etcd: Any) -> dict[str, Any]:
    section = {"etcd": {"endpoints": EP, **etcd}, "voters": ["dc1", "dc2", "dc3"]}
    section.update(store or {})
    return raw(instance="dc2", store=section)


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(config.ConfigError) as info:
        config.parse(data)
    return info.value.problems


def test_without_store_there_is_no_fleet_and_the_instance_is_the_host_name() -> None:
    cfg = config.parse(raw())
    assert cfg.store is None and cfg.guard is None
    assert cfg.instance and cfg.instance != ""


def test_the_full_store_section_as_the_issue_writes_it(tmp_path: Path) -> None:
    secret = tmp_path / "etcd-pw"
    secret.write_text("etcd-password-123\n")
    for name in ("ca.pem", "c.pem", "c.key"):
        (tmp_path / name).write_text("x")
    cfg = config.parse(
        fleet(
            prefix="/wd",
            ttl="15s",
            tls={
                "ca_file": str(tmp_path / "ca.pem"),
                "cert_file": str(tmp_path / "c.pem"),
                "key_file": str(tmp_path / "c.key"),
            },
            username="watchdogd",
            password_file=str(secret),
        )
        | {"guard": {"isolation_timeout": "25s"}}
    )
    assert isinstance(cfg, Config) and cfg.instance == "dc2"
    assert cfg.store is not None and cfg.store.voters == ("dc1", "dc2", "dc3")
    etcd = cfg.store.etcd
    assert etcd.endpoints == tuple(EP) and etcd.prefix == "/wd" and etcd.ttl == 15.0
    assert etcd.ca_file == str(tmp_path / "ca.pem") and etcd.key_file == str(tmp_path / "c.key")
    assert etcd.username == "watchdogd" and etcd.password == "etcd-password-123"
    # The password is a secret: masked wherever text leaves the daemon.
    assert "etcd-password-123" in cfg.secrets
    assert cfg.mask("login etcd-password-123") == "login ***"
    assert cfg.guard is not None and cfg.guard.isolation_timeout == 25.0


@pytest.mark.parametrize(
    ("endpoint", "why"),
    [
        ("127.0.0.1:2379", "expected http(s)://host:port"),
        ("ftp://127.0.0.1:2379", "expected http(s)://host:port"),
        ("http://127.0.0.1", "expected http(s)://host:port"),
        ("http://127.0.0.1:99999", "expected http(s)://host:port"),
        ("http://127.0.0.1:2379/v3", "expected http(s)://host:port"),
    ],
)
def test_an_endpoint_must_be_an_http_url_with_host_and_port(endpoint: str, why: str) -> None:
    (problem,) = problems(fleet(endpoints=[EP[0], endpoint]))
    assert problem.startswith("store.etcd.endpoints[1]: ") and why in problem
    assert "\n" not in problem


def test_voters_unique_include_this_instance_and_at_least_one() -> None:
    (twice,) = problems(fleet({"voters": ["dc1", "dc2", "dc1"]}))
    assert twice == "store.voters[2]: 'dc1' is listed twice"
    (absent,) = problems(fleet({"voters": ["dc1", "dc3"]}))
    assert absent.startswith("store.voters: must include this instance ('dc2'")
    (empty,) = problems(fleet({"voters": []}))
    assert empty == "store.voters: must name at least one voter"
    (missing,) = problems(raw(instance="dc2", store={"etcd": {"endpoints": EP}}))
    assert missing.startswith("store.voters: is required")


def test_ttl_at_least_two_seconds_and_the_timing_rule() -> None:
    short = problems(fleet(ttl="1s"))
    assert any(p.startswith("store.etcd.ttl: must be at least 2s") for p in short)
    # 3 endpoints x 1s per attempt: 10s/3 + 2 x 3s + 1s = 10.3s > 10s.
    (rule,) = problems(fleet(ttl="10s"))
    assert rule.startswith("store.etcd.ttl: timing: renew interval") and "ttl 10s" in rule
    assert "store.etcd.timeout 1s per endpoint" in rule
    # A shorter attempt timeout makes the same ttl fit.
    cfg = config.parse(fleet(ttl="10s", timeout="500ms"))
    assert cfg.store is not None
    timing = fleet_timing(cfg.store.etcd)
    assert timing.renew == pytest.approx(10 / 3) and timing.budget == pytest.approx(1.5)
    assert timing.margin == 1.0 and timing.problem() is None
    # The issue's example passes with the defaults.
    assert config.parse(fleet(ttl="15s")).store is not None


def test_tls_and_credentials_go_together(tmp_path: Path) -> None:
    found = problems(fleet(tls={"cert_file": str(tmp_path / "nope.pem")}, username="watchdogd"))
    assert "store.etcd.tls: cert_file and key_file go together" in found
    assert any(p.startswith("store.etcd.tls.cert_file: cannot read") for p in found)
    assert "store.etcd: username and password (or password_file) go together" in found


def test_unknown_keys_and_a_bad_instance_name_are_named() -> None:
    found = problems(fleet({"leader": "dc1"}, colour="blue") | {"instance": "dc 2"})
    assert "store.leader: unknown key" in found
    assert "store.etcd.colour: unknown key" in found
    assert any(p.startswith("instance: use letters, digits") for p in found)


def test_check_config_reports_the_timing_rule(tmp_path: Path) -> None:
    import yaml

    from watchdogd.cli import check_config

    path = tmp_path / "w.yml"
    path.write_text(yaml.safe_dump(fleet(ttl="8s")))
    assert check_config(str(path)) == 2
    path.write_text(yaml.safe_dump(fleet(ttl="8s", timeout="400ms")))
    assert check_config(str(path)) == 0


def test_every_step_must_fit_in_the_leaders_authority() -> None:
    data = fleet(ttl="15s")
    data["failover"]["steps"][1]["timeout"] = "30s"
    data["failover"]["fence_steps"] = [{"name": "f", "action": "fence", "timeout": "10s"}]
    data["failover"]["rejoin_timeout"] = "2m"
    found = problems(data)
    # ttl 15s - margin 1.5s - retry budget 3s - 1s backstop: 9.5s.
    assert found == [
        "failover.rejoin_timeout: 120s does not fit in a fleet leader's authority: at most "
        "9.5s with store.etcd.ttl 15s (raise the ttl or shorten it)",
        "failover.steps[1].timeout: 30s does not fit in a fleet leader's authority: at most "
        "9.5s with store.etcd.ttl 15s (raise the ttl or shorten the step)",
        "failover.fence_steps[0].timeout: 10s does not fit in a fleet leader's authority: "
        "at most 9.5s with store.etcd.ttl 15s (raise the ttl or shorten the step)",
    ]
    # Without a store the same steps are fine.
    config.parse(raw(failover=data["failover"]))


def test_a_reload_cannot_change_the_fleet() -> None:
    from watchdogd import policy

    old = config.parse(fleet())
    new = config.parse(fleet(ttl="20s") | {"instance": "dc2"})
    assert policy.restart_needed_for(old, new) == ["store"]


# --------------------------------------------------------------------------- guard step


def test_with_a_guard_every_failover_plan_waits_for_it_before_the_promotion() -> None:
    from watchdogd.config import step_room
    from watchdogd.daemon.fleet import guard_step
    from watchdogd.policy import GUARD_STEP, build_plan

    cfg = config.parse({**fleet(), "guard": {"isolation_timeout": "20s"}})
    assert cfg.store is not None
    step = guard_step(cfg)
    assert step is not None and step.action == GUARD_STEP and step.idempotent
    # Each attempt fits the leader's authority; all of them outlast the guard's silence
    # (isolation_timeout after its key expired, plus a ttl to notice and fence).
    assert step.timeout <= step_room(cfg.store.etcd)
    timing = fleet_timing(cfg.store.etcd)
    assert step.retries * (step.timeout + step.retry_delay) >= 20.0 + 2 * timing.ttl
    for kind in ("failover", "switchover"):
        plan = build_plan(
            cfg.failover,
            id="x",
            kind=kind,
            trigger="automatic",
            reason="r",
            from_node="main",
            to_node="failover",
            guard=step,
            step_limit=step_room(cfg.store.etcd),
        )
        names = [s.name for s in plan.steps]
        assert names.index("stop_replication") < names.index(GUARD_STEP)
        assert names.index(GUARD_STEP) + 1 == names.index("promote_standby"), names
        # The switchover's own fence and catch-up wait fit the authority too.
        assert all(s.timeout <= step_room(cfg.store.etcd) for s in plan.steps), plan.steps
    # A short isolation_timeout: the guard beside an idle standby on stock settings
    # waits its reply window (15 s) instead, and publishes it; the attempts cover it.
    short = guard_step(config.parse({**fleet(), "guard": {"isolation_timeout": "3s"}}))
    assert short is not None
    assert short.retries * (short.timeout + short.retry_delay) >= 15.0 + 2 * timing.ttl
    assert guard_step(config.parse(fleet())) is None  # no guard: section
    assert guard_step(config.parse({**raw(), "guard": {"isolation_timeout": "20s"}})) is None


def test_the_guard_step_goes_after_stop_replication_when_there_is_no_promote() -> None:
    from watchdogd.core.model import StepConfig
    from watchdogd.policy import guard_position

    def steps(*actions: str) -> list[StepConfig]:
        return [StepConfig(name=f"s{i}", action=a) for i, a in enumerate(actions)]

    assert guard_position(steps("http", "stop_replication", "promote", "http")) == 2
    assert guard_position(steps("http", "stop_replication", "command", "http")) == 2
    assert guard_position(steps("command", "command")) == 0


def test_guard_fence_is_the_fleets_own_step_and_needs_replication_stopped_first() -> None:
    """A config step named (or acting) guard_fence would take the inserted guard step's
    place: the leader would promote without the guard's clearance. And with guard: the
    guard's silence counts only once replication was stopped, before the promotion."""
    guarded = {**fleet(), "guard": {"isolation_timeout": "20s"}}
    named = [
        {"name": "stop_replication", "action": "stop_replication", "timeout": "3s"},
        {"name": "promote_standby", "action": "promote", "timeout": "3s"},
        {"name": "guard_fence", "action": "command", "argv": ["true"], "timeout": "3s"},
    ]
    assert any(
        p.startswith("failover.steps[2].name: 'guard_fence' is the fleet's own step")
        for p in problems({**guarded, "failover": {**guarded["failover"], "steps": named}})
    )
    acting = [{"name": "x", "action": "guard_fence"}]
    assert any(
        p.startswith("failover.fence_steps[0].action: 'guard_fence' is the fleet's own step")
        for p in problems({**fleet(), "failover": {**fleet()["failover"], "fence_steps": acting}})
    )
    promote_only = [{"name": "promote_standby", "action": "promote", "timeout": "3s"}]
    assert any(
        "with guard: a stop_replication step must come before the promotion" in p
        for p in problems({**guarded, "failover": {**guarded["failover"], "steps": promote_only}})
    )
    # Without guard: no stop_replication is needed.
    config.parse({**fleet(), "failover": {**fleet()["failover"], "steps": promote_only}})


def test_guard_changes_need_a_restart() -> None:
    from watchdogd.policy import restart_needed_for

    plain = config.parse(fleet())
    guarded = config.parse({**fleet(), "guard": {"isolation_timeout": "20s"}})
    assert "guard" in restart_needed_for(plain, guarded)
    assert "guard" in restart_needed_for(guarded, plain)
