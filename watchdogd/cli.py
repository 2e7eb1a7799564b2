"""The ``watchdogd`` command: run the daemon, check a config, run the demo lab."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from watchdogd import __version__
from watchdogd import config as configmod

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
    demo = sub.add_parser("demo", help="a complete local lab with a real failover")
    demo.add_argument(
        "--scenario", choices=("interactive", "kill-primary", "hang-primary"), default="interactive"
    )
    demo.add_argument("--threshold", default="3s", help="outage threshold (default 3s)")
    demo.add_argument("--keep", action="store_true", help="keep the lab's temp dir")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            return check_config(args.config)
        if args.command == "run":
            return run(args.config)
        if args.command == "demo":
            from watchdogd import demo

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


def check_config(path: str) -> int:
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
    return EXIT_OK


def run(path: str) -> int:
    try:
        cfg = configmod.load(path)
    except configmod.ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    from watchdogd.control import ControlSocketError
    from watchdogd.daemon import Daemon
    from watchdogd.failover.journal import JournalLocked
    from watchdogd.metrics import MetricsServerError

    try:
        asyncio.run(Daemon(cfg).run())
    except (ControlSocketError, JournalLocked, MetricsServerError) as exc:
        print(f"watchdogd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(f"watchdogd: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
