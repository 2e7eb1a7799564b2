"""The ``watchdogd`` command: run the daemon, check a config, check or repair the
journal, run the demo lab, run the guard beside the primary."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence

from watchdogd import __version__
from watchdogd import config as configmod
from watchdogd.state.journal import Journal, JournalLocked, plan_repair, write_repair

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="watchdogd",
        description=(
            "Watch a primary/standby application + database pair and fail over on its own, safely."
        ),
    )
    p.add_argument("--version", action="version", version=f"watchdogd {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on unexpected errors")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", "-c", required=True, help="path to the YAML config")
    check = sub.add_parser("check-config", help="validate a config; exit 2 listing every problem")
    check.add_argument("--config", "-c", required=True, help="path to the YAML config")
    check.add_argument(
        "--online",
        action="store_true",
        help="also run every readiness check once (databases, apps, step targets): "
        "exit 0 ready, 1 not ready",
    )
    journal = sub.add_parser("journal", help="check or repair the failover journal")
    jsub = journal.add_subparsers(dest="journal_command", required=True)
    jcheck = jsub.add_parser("check", help="show damaged lines; exit 0 clean, 1 damaged")
    jcheck.add_argument("--config", "-c", required=True, help="path to the YAML config")
    jrepair = jsub.add_parser(
        "repair",
        help="keep a copy, then drop damaged lines (with the daemon stopped)",
    )
    jrepair.add_argument("--config", "-c", required=True, help="path to the YAML config")
    jrepair.add_argument(
        "--close-unfinished",
        action="store_true",
        help="when a dropped line may have ended a failover, close that failover as "
        "failed (for a human to check and ack) instead of refusing",
    )
    guard = sub.add_parser(
        "guard",
        help="run the guard beside the primary: fence it on a valid order or when isolated",
    )
    guard.add_argument("--config", "-c", required=True, help="path to the YAML config")
    guard.add_argument(
        "--node", required=True, help="the node whose host this runs on (its database is fenced)"
    )
    demo = sub.add_parser("demo", help="a complete local lab with a real failover")
    demo.add_argument(
        "--scenario",
        choices=("interactive", "kill-primary", "hang-primary", "kill-leader"),
        default="interactive",
        help="kill-leader: with --sites only",
    )
    demo.add_argument(
        "--sites",
        type=int,
        default=None,
        help="3: a watcher fleet (three etcd members, three watchers) instead of one watcher",
    )
    demo.add_argument("--threshold", default="3s", help="outage threshold (default 3s)")
    demo.add_argument("--keep", action="store_true", help="keep the lab's temp dir")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            return check_config(args.config, online=args.online)
        if args.command == "run":
            return run(args.config)
        if args.command == "journal":
            if args.journal_command == "check":
                return journal_check(args.config)
            return journal_repair(args.config, close_unfinished=args.close_unfinished)
        if args.command == "guard":
            return guard(args.config, args.node)
        if args.command == "demo":
            if args.sites is not None:
                from watchdogd.demo import sites

                fleet_code: int = sites.main(
                    args.sites, args.scenario, threshold=args.threshold, keep=args.keep
                )
                return fleet_code
            if args.scenario == "kill-leader":
                print("watchdogd demo: --scenario kill-leader needs --sites 3", file=sys.stderr)
                return 2
            from watchdogd.demo import run as demo

            code: int = demo.main(args.scenario, threshold=args.threshold, keep=args.keep)
            return code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"watchdogd: {type(exc).__name__}: {exc} (run with --debug for details)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return EXIT_FAILURE  # pragma: no cover - argparse requires a command


def check_config(path: str, *, online: bool = False) -> int:
    try:
        cfg = configmod.load(path)
    except configmod.ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    steps = ", ".join(s.name for s in cfg.failover.steps)
    print(
        f"{path}: ok (cluster {cfg.cluster}: {cfg.primary.name} -> {cfg.standby.name}; "
        f"mode {cfg.failover.mode}; steps: {steps})"
    )
    if not online:
        return EXIT_OK
    from watchdogd.daemon import readiness

    result = asyncio.run(readiness.check_online(cfg))
    for line in readiness.report(result):
        print(cfg.mask(line))
    return EXIT_OK if result.ready else EXIT_FAILURE


def run(path: str) -> int:
    try:
        cfg = configmod.load(path)
    except configmod.ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    from watchdogd.control import ControlSocketError
    from watchdogd.daemon import Daemon
    from watchdogd.metrics import MetricsServerError
    from watchdogd.state.journal import JournalError

    try:
        asyncio.run(Daemon(cfg).run())
    except (ControlSocketError, JournalError, MetricsServerError) as exc:
        print(f"watchdogd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(f"watchdogd: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def guard(path: str, node: str) -> int:
    """Run the guard for ``node``: exit 2 with one line when the config cannot run it."""
    try:
        cfg = configmod.load(path)
    except configmod.ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    from watchdogd import guard as guardmod
    from watchdogd.logging import setup_logging

    try:
        settings = guardmod.settings_from_config(cfg, node)
        client = settings.client()  # the TLS files are read here: a bad one is a config error
    except guardmod.GuardConfigError as exc:
        print(f"watchdogd guard: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    asyncio.run(client.close())
    log = setup_logging(cfg.log.format, cfg.log.level, cluster=cfg.cluster, secrets=cfg.secrets)
    asyncio.run(guardmod.run_guard(settings, log))
    return EXIT_OK  # pragma: no cover - the guard runs until interrupted


def _journal_for(path: str) -> Journal | None:
    """The config's journal, or None after printing the config's problems."""
    try:
        cfg = configmod.load(path)
    except configmod.ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None
    return Journal(cfg.state_dir)


def journal_check(path: str) -> int:
    """Show what a start would refuse or cut away; read-only, safe beside a running daemon."""
    journal = _journal_for(path)
    if journal is None:
        return EXIT_CONFIG
    data, state = journal.read()
    inner = [d for d in state.damaged if not d.last]
    for damage in state.damaged:
        print(damage.describe(journal.path))
        print(f"  {damage.text[:300]!r}")
        if damage.last:
            print("  a crash mid-write: the next start cuts it away (it was never acted on)")
    records = sum(1 for line in data.split(b"\n") if line.strip())
    if inner:
        print(
            f"{journal.path}: damaged ({len(inner)} line(s) before the end); the daemon will "
            "not start on it: `watchdogd journal repair --config FILE`"
        )
        return EXIT_FAILURE
    print(f"{journal.path}: ok ({records} lines, {len(state.failovers)} failovers)")
    return EXIT_OK


def journal_repair(path: str, *, close_unfinished: bool) -> int:
    """Deliberately drop damaged lines: a copy is kept, every dropped line is printed, and
    a drop that could make the daemon resume a finished failover is refused."""
    journal = _journal_for(path)
    if journal is None:
        return EXIT_CONFIG
    try:
        journal.lock()
    except JournalLocked as exc:
        print(f"watchdogd: {exc}: stop it before repairing its journal", file=sys.stderr)
        return EXIT_FAILURE
    try:
        data, _ = journal.read()
        repair = plan_repair(data, close_unfinished=close_unfinished, at=time.time())
        if not repair.dropped:
            print(f"{journal.path}: nothing to repair")
            return EXIT_OK
        if repair.refusals:
            for refusal in repair.refusals:
                print(f"watchdogd: repair refused: {refusal}", file=sys.stderr)
            return EXIT_FAILURE
        backup = write_repair(journal.path, repair.content)
        print(f"kept a copy of the damaged journal at {backup}")
        for damage in repair.dropped:
            print(f"dropped line {damage.line} ({damage.reason}): {damage.text!r}")
        for rec in repair.appended:
            print(f"appended: {rec['type']} {rec['id']} {rec['outcome']}: {rec['error']}")
        for note in repair.notes:
            print(f"note: {note}")
        print(f"{journal.path}: repaired ({len(repair.dropped)} line(s) dropped)")
        return EXIT_OK
    finally:
        journal.close()


if __name__ == "__main__":
    sys.exit(main())
