"""``watchdogctl``: the operator's client for the control socket.

Owns the command line (argparse), the confirmation of mutating commands, and
the human rendering of replies (status table, failover history, dry-run plan).
The protocol, the command table and argument validation live in
``watchdogd.control``, so the client rejects a bad argument with the same
message the daemon would.

Exit codes: 0 done, 1 refused (by the daemon, or not confirmed), 2 usage error,
3 cannot reach the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import IO, Any

from watchdogd.control import (
    COMMANDS,
    CommandError,
    ControlUnavailable,
    request,
    stream,
    validate_args,
)
from watchdogd.core import units
from watchdogd.core.units import parse_duration

DEFAULT_SOCKET = "/run/watchdogd/control.sock"
SOCKET_ENV = "WATCHDOGD_SOCKET"

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

# What a mutating command will do, for the confirmation prompt.
_INTENT = {
    "pause": "pause automatic failover",
    "resume": "resume automatic failover",
    "failover": "fail over from the primary to the standby",
    "switchover": "switch over from the primary to the standby",
    "abort": "abort the failover in progress",
    "ack": "acknowledge the last failover",
    "rejoin": "rejoin the old primary as the standby of the new primary",
    "reload": "reload the daemon's configuration",
}


# --------------------------------------------------------------------------- command line


def _seconds(text: str) -> float:
    """``30``, ``2.5`` or ``2m`` → seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        try:
            value = parse_duration(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected seconds like 30 or a duration like 2m, got {text!r}"
            ) from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    # Options shared by the top level and every command, so both
    # ``watchdogctl --json status`` and ``watchdogctl status --json`` work.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--socket",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help=f"control socket (default: ${SOCKET_ENV} or {DEFAULT_SOCKET})",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the raw result"
    )
    common.add_argument(
        "--yes",
        "-y",
        action="store_true",
        default=argparse.SUPPRESS,
        help="do not ask for confirmation",
    )

    parser = argparse.ArgumentParser(
        prog="watchdogctl",
        parents=[common],
        description="Inspect and steer a running watchdogd through its control socket.",
        epilog="exit codes: 0 done, 1 refused, 2 usage error, 3 cannot reach watchdogd",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=30.0,
        dest="request_timeout",
        metavar="S",
        help="seconds to wait for the reply (default 30)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands = {
        name: sub.add_parser(name, parents=[common], help=c.help, description=c.help)
        for name, c in COMMANDS.items()
    }
    commands["history"].add_argument(
        "-n", type=int, dest="n", metavar="N", help="how many failovers (default 10)"
    )
    commands["pause"].add_argument("--reason", metavar="TEXT")
    failover = commands["failover"]
    failover.add_argument(
        "--force", action="store_true", help="skip the safety checks the daemon would apply"
    )
    failover.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    failover.add_argument("--reason", metavar="TEXT")
    switchover = commands["switchover"]
    switchover.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    switchover.add_argument(
        "--timeout",
        type=_seconds,
        dest="switch_timeout",
        metavar="S",
        help="how long the standby may take to catch up",
    )
    events = commands["events"]
    events.add_argument(
        "--follow", "-f", action="store_true", help="keep streaming new events (Ctrl-C ends)"
    )
    events.add_argument(
        "-n", type=int, dest="n", metavar="N", help="how many recent events first (default 20)"
    )
    rejoin = commands["rejoin"]
    rejoin.add_argument(
        "--dry-run", action="store_true", help="show the divergence and the steps, change nothing"
    )
    rejoin.add_argument(
        "--accept-divergence",
        action="store_true",
        help="rejoin even if the old primary holds writes the new one lacks (they are lost)",
    )
    return parser


def command_args(ns: argparse.Namespace) -> dict[str, Any]:
    """The request's args: only what was given, so the daemon's defaults apply."""
    names = {
        "n": "n",
        "reason": "reason",
        "force": "force",
        "dry_run": "dry_run",
        "switch_timeout": "timeout",
        "follow": "follow",
        "accept_divergence": "accept_divergence",
    }
    args: dict[str, Any] = {}
    for attr, key in names.items():
        value = getattr(ns, attr, None)
        if value is None or value is False:
            continue
        args[key] = value
    return args


def needs_confirmation(
    command: str, args: Mapping[str, Any], *, assume_yes: bool, interactive: bool
) -> bool:
    """Ask before a mutating command when a person is at the keyboard.

    Scripts (stdin not a TTY) and ``--yes`` are not asked; dry runs change
    nothing and are never asked."""
    spec = COMMANDS.get(command)
    if spec is None or not spec.mutating or args.get("dry_run"):
        return False
    return interactive and not assume_yes


def confirm(prompt: str, read_line: Callable[[], str], out: IO[str]) -> bool:
    """Show ``prompt``; only the answer ``yes`` confirms (EOF does not)."""
    out.write(prompt)
    out.flush()
    try:
        answer = read_line()
    except (EOFError, KeyboardInterrupt):
        answer = ""
    return answer.strip().lower() == "yes"


def _prompt(command: str, args: Mapping[str, Any], status: Mapping[str, Any] | None) -> str:
    intent = _INTENT.get(command, command)
    details = []
    if args.get("force"):
        details.append("forced")
    if args.get("accept_divergence"):
        details.append("accepting divergence: writes only the old primary holds are lost")
    if args.get("timeout"):
        details.append(f"catch-up timeout {_duration(args['timeout'])}")
    if args.get("reason"):
        details.append(f"reason: {args['reason']}")
    where = ""
    if status:
        roles = status.get("roles") if isinstance(status.get("roles"), dict) else {}
        cluster = status.get("cluster", "?")
        where = f" on cluster {cluster}"
        if roles:
            where += f" (primary {roles.get('primary', '?')}, standby {roles.get('standby', '?')})"
    extra = f" [{'; '.join(details)}]" if details else ""
    return f"About to {intent}{where}{extra}.\nType yes to continue: "


def _unreachable(exc: ControlUnavailable) -> str:
    hints = {
        errno.ENOENT: "is watchdogd running, and is this the control.socket from its config?",
        errno.EACCES: "permission denied: you need to be root or in the socket's group "
        "(see control.allow_users/allow_groups/read_groups)",
        errno.ECONNREFUSED: "nobody is listening (stale socket): is watchdogd running?",
    }
    hint = hints.get(exc.errno or 0) or (
        "check that watchdogd is running, the socket path (--socket or "
        f"${SOCKET_ENV}) and your permissions on it"
    )
    return f"watchdogctl: {exc}\n  {hint}"


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed by argparse
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    command: str = ns.command
    socket_path = getattr(ns, "socket", None) or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET
    timeout: float = ns.request_timeout
    args = command_args(ns)
    try:
        args_checked = validate_args(COMMANDS[command], args)
    except CommandError as exc:
        print(f"watchdogctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if command == "events":
        return events_main(socket_path, args, timeout, as_json=getattr(ns, "json", False))
    if args_checked.get("timeout"):
        # The reply may only come once the switchover's catch-up wait is over.
        timeout = max(timeout, float(args_checked["timeout"]) + 10)

    try:
        if needs_confirmation(
            command,
            args,
            assume_yes=getattr(ns, "yes", False),
            interactive=sys.stdin is not None and sys.stdin.isatty(),
        ):
            status = asyncio.run(request(socket_path, "status", timeout=min(timeout, 10)))
            shown = status.get("result") if status.get("ok") else None
            shown = shown if isinstance(shown, dict) else None
            if not confirm(_prompt(command, args, shown), sys.stdin.readline, sys.stderr):
                print("watchdogctl: not confirmed; nothing was done", file=sys.stderr)
                return EXIT_REFUSED
        reply = asyncio.run(request(socket_path, command, args, timeout=timeout))
    except ControlUnavailable as exc:
        print(_unreachable(exc), file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        print("watchdogctl: interrupted", file=sys.stderr)
        return 130

    if not reply["ok"]:
        error = _text(reply.get("error", "refused"))
        print(f"watchdogctl: {command}: {error}", file=sys.stderr)
        if error == "permission denied":
            print(
                "  you need to be root or listed in control.allow_users/allow_groups "
                "(control.read_groups allows only status, history and events)",
                file=sys.stderr,
            )
        return EXIT_REFUSED
    result = reply.get("result")
    if getattr(ns, "json", False):
        print(json.dumps(result, indent=2, default=str))
    else:
        print(render(command, result if isinstance(result, dict) else {}))
    return EXIT_OK


# --------------------------------------------------------------------------- events


def events_main(socket_path: str, args: dict[str, Any], timeout: float, *, as_json: bool) -> int:
    """``watchdogctl events [--follow] [--json]``: one line per event on stdout.
    Ctrl-C (or a reader that went away, like ``| head``) ends it with exit 0."""
    try:
        return asyncio.run(_events(socket_path, args, timeout, as_json, sys.stdout))
    except ControlUnavailable as exc:
        print(_unreachable(exc), file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        # Python would complain again flushing stdout at exit: point it at nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


async def _events(
    socket_path: str, args: dict[str, Any], timeout: float, as_json: bool, out: IO[str]
) -> int:
    def show(line: Mapping[str, Any]) -> None:
        if "missed" in line:
            text = (
                json.dumps({"missed": line["missed"]})
                if as_json
                else f"... {_text(line['missed'])} events missed (this client fell behind)"
            )
        else:
            event = line.get("event")
            event = event if isinstance(event, dict) else {}
            text = json.dumps(event, default=str) if as_json else render_event(event)
        out.write(text + "\n")
        out.flush()

    if not args.get("follow"):
        reply = await request(socket_path, "events", args, timeout=timeout)
        if not reply["ok"]:
            return _refused("events", reply)
        result = reply.get("result")
        for event in result.get("events", []) if isinstance(result, dict) else []:
            show({"event": event})
        return EXIT_OK
    last: int | None = None
    while True:
        asked = dict(args) if last is None else {**args, "after": last}
        ended, last = await _follow(socket_path, asked, timeout, show, last)
        if ended is not None:
            return ended


async def _follow(
    socket_path: str,
    args: dict[str, Any],
    timeout: float,
    show: Callable[[Mapping[str, Any]], None],
    last: int | None,
) -> tuple[int | None, int | None]:
    """One connection's stream: (exit code, or None to connect again; the last seq)."""
    streaming = False
    lines = stream(socket_path, "events", args, timeout=timeout)
    async with contextlib.aclosing(lines):
        async for line in lines:
            if not streaming:
                if not line["ok"]:
                    return _refused("events", line), last
                streaming = True
                result = line.get("result")
                result = result if isinstance(result, dict) else {}
                for event in result.get("events", []):
                    show({"event": event})
                if isinstance(result.get("seq"), int):
                    last = result["seq"]
                continue
            if not line["ok"]:
                # The connection's lifetime is up: connect again, after ``last``.
                return None, last
            show(line)
            event = line.get("event")
            if isinstance(event, dict) and isinstance(event.get("seq"), int):
                last = event["seq"]
    print("watchdogctl: events: the daemon closed the stream", file=sys.stderr)
    return EXIT_UNREACHABLE, last


def _refused(command: str, reply: Mapping[str, Any]) -> int:
    error = _text(reply.get("error", "refused"))
    print(f"watchdogctl: {command}: {error}", file=sys.stderr)
    return EXIT_REFUSED


def render_event(event: Mapping[str, Any]) -> str:
    """``2026-12-03 07:45:12.345Z WARNING primary_down verdict=down reason="..."``"""
    at = _number(event.get("at"))
    when = "-"
    if at is not None:
        try:
            when = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
        except (OverflowError, OSError, ValueError):
            when = _text(at)
    facts = event.get("facts")
    pairs = []
    if isinstance(facts, dict):
        for key, value in facts.items():
            if value is None or value == [] or value == {}:
                continue
            pairs.append(f"{_text(key)}={_fact(value)}")
    level = _text(event.get("level", "info")).upper()
    return " ".join([when, f"{level:<7}", _text(event.get("name", "?")), *pairs]).rstrip()


def _fact(value: Any) -> str:
    if isinstance(value, str):
        text = value if value and not any(c.isspace() or c in '"=' for c in value) else None
        text = text if text is not None else json.dumps(value, ensure_ascii=False)
    elif isinstance(value, float):
        text = f"{value:.6g}"
    else:
        text = json.dumps(value, default=str, ensure_ascii=False)
    text = _text(text)
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------- rendering


def render(command: str, result: Mapping[str, Any]) -> str:
    """The human form of a command's result."""
    if command == "rejoin":
        return render_rejoin(result)
    if result.get("dry_run") and isinstance(result.get("plan"), dict):
        return render_plan(result)
    if command == "status":
        return render_status(result)
    if command == "history":
        return render_history(result)
    return render_generic(command, result)


# A short list of what is wrong; the rest is one --json away.
_READINESS_LINES = 6


def render_status(s: Mapping[str, Any]) -> str:
    rows: list[tuple[str, str]] = [("cluster", _text(s.get("cluster", "?")))]
    state = _text(s.get("state", "unknown"))
    if s.get("reason"):
        state += f" ({_text(s['reason'])})"
    rows.append(("state", state))
    if "mode" in s or "armed" in s:
        mode = _text(s.get("mode", "?"))
        if isinstance(s.get("armed"), bool):
            mode += ", armed" if s["armed"] else ", NOT armed"
        rows.append(("mode", mode))
    if s.get("paused"):
        reason = s.get("pause_reason")
        rows.append(("paused", "yes" + (f": {_text(reason)}" if reason else "")))
    roles = s.get("roles")
    if isinstance(roles, dict):
        rows.append(
            (
                "roles",
                f"primary {_text(roles.get('primary', '?'))}, "
                f"standby {_text(roles.get('standby', '?'))}",
            )
        )
    if "outage_seconds" in s:
        outage = _number(s.get("outage_seconds"))
        rows.append(("outage", _duration(outage) if outage else "none"))
    lag = s.get("lag")
    if isinstance(lag, dict):
        rows.append(("lag", _lag(lag)))
    running = s.get("failover_in_progress")
    if isinstance(running, dict):
        rows.append(
            (
                "in progress",
                f"{_text(running.get('id', '?'))} at step "
                f"{_text(running.get('step', '?'))}, started {_when(running.get('started_at'))}",
            )
        )
    if "last_failover" in s:
        last = s.get("last_failover")
        rows.append(("last failover", _failover_line(last) if isinstance(last, dict) else "none"))
        if isinstance(last, dict) and last.get("reason"):
            rows.append(("", f"reason: {_text(last['reason'])}"))
    if "awaiting_ack" in s:
        rows.append(("awaiting ack", "YES (watchdogctl ack)" if s.get("awaiting_ack") else "no"))
    readiness = s.get("readiness")
    if isinstance(readiness, dict) and isinstance(readiness.get("checks"), list):
        # What is wrong, errors first: what stops a failover before what only slows it.
        failed = [c for c in readiness["checks"] if isinstance(c, dict) and not c.get("ok")]
        failed.sort(key=lambda c: c.get("severity") == "warning")
        errors = sum(1 for c in failed if c.get("severity") != "warning")
        rows.append(("ready", "yes" if readiness.get("ready") else f"NO ({errors} failing)"))
        for c in failed[:_READINESS_LINES]:
            tag = "warning: " if c.get("severity") == "warning" else ""
            rows.append(("", f"{tag}{_text(c.get('name', '?'))}: {_text(c.get('detail', ''))}"))
        if len(failed) > _READINESS_LINES:
            rows.append(("", f"... and {len(failed) - _READINESS_LINES} more (--json shows all)"))
    rows.extend(_rejoin_rows(s.get("rejoin")))
    rows.extend(_store_rows(s.get("store")))
    out = _pairs(rows)
    nodes = s.get("nodes")
    if isinstance(nodes, list) and nodes:
        table = [("NODE", "ROLE", "DATABASE", "WRITABLE", "APP")]
        for node in nodes:
            if not isinstance(node, dict):
                continue
            db = node.get("database")
            writable = db.get("writable") if isinstance(db, dict) else None
            table.append(
                (
                    _text(node.get("name", "?")),
                    _text(node.get("role", "?")),
                    _health(db),
                    "-" if writable is None else ("yes" if writable else "no"),
                    _health(node.get("app")),
                )
            )
        out += "\n\n" + _table(table)
    return out


def _store_rows(store: Any) -> list[tuple[str, str]]:
    """A fleet watcher's block (``store`` in status): who leads, the store, each voter."""
    if not isinstance(store, dict):
        return []
    me = _text(store.get("instance", "?"))
    leader = store.get("leader")
    if store.get("is_leader"):
        lead = f"{me} (this watcher), authority {_number(store.get('deadline_in')) or 0:g}s left"
    elif store.get("holds_token"):
        lead = f"{me} (this watcher) WITHOUT AUTHORITY: it acts on nothing until it renews"
    else:
        lead = f"{_text(leader)} (this is {me})" if leader else f"nobody (this is {me})"
    rows = [("fleet leader", lead)]
    up = store.get("up")
    rows.append(("store", "up" if up else f"UNAVAILABLE: {_text(store.get('error') or '?')}"))
    if store.get("journal_damaged"):
        # On every watcher, not only in the leader's refusal: a follower reads it too.
        rows.append(("", f"journal in the store DAMAGED: {_text(store['journal_damaged'])}"))
    voters = store.get("voters")
    if isinstance(voters, dict) and store.get("is_leader"):
        for name, v in voters.items():
            if not isinstance(v, dict):
                continue
            if not v.get("fresh"):
                age = v.get("age")
                rows.append(
                    ("", f"{_text(name)}: stale" + (f" ({age}s)" if age is not None else ""))
                )
                continue
            sees = "down" if v.get("primary_down") else "up"
            if v.get("primary_writable"):
                sees += " and writable"
            extra = "" if v.get("config_matches", True) else ", CONFIG DIFFERS"
            rows.append(("", f"{_text(name)}: sees the primary {sees}, {v.get('age')}s ago{extra}"))
    if store.get("refusal"):
        what = "automatic failover" if store.get("is_leader") else "commands here"
        rows.append(("", f"{what}: {_text(store['refusal'])}"))
    return rows


def _rejoin_rows(rejoin: Any) -> list[tuple[str, str]]:
    if not isinstance(rejoin, dict):
        return []
    rows = []
    running = rejoin.get("running")
    if isinstance(running, dict):
        rows.append(
            ("rejoining", f"{_text(running.get('id'))} at step {_text(running.get('step'))}")
        )
    last = rejoin.get("last")
    if isinstance(last, dict) and not isinstance(running, dict):
        error = f": {_text(last['error'])}" if last.get("error") else ""
        rows.append(
            (
                "last rejoin",
                f"{_text(last.get('id'))}: {_text(last.get('outcome') or 'in progress')}, "
                f"{_text(last.get('from'))} -> standby of {_text(last.get('to'))}{error}",
            )
        )
    if isinstance(rejoin.get("divergence"), dict):
        rows.append(("divergence", _divergence(rejoin["divergence"])))
    waiting = rejoin.get("waiting")
    if isinstance(waiting, dict):
        rows.append(("auto_rejoin", f"WAITING for an operator: {_text(waiting.get('reason'))}"))
    return rows


def render_history(result: Mapping[str, Any]) -> str:
    failovers = result.get("failovers")
    if not isinstance(failovers, list) or not failovers:
        return "no failovers recorded"
    blocks = []
    for f in failovers:
        if not isinstance(f, dict):
            continue
        lines = [_failover_line(f)]
        if f.get("reason"):
            lines.append(f"  reason: {_text(f['reason'])}")
        steps = f.get("steps")
        if isinstance(steps, list) and steps:
            start = _number(f.get("started_at"))
            table = [("STEP", "AT", "OUTCOME", "TOOK", "ATTEMPTS", "DETAIL")]
            for step in steps:
                if not isinstance(step, dict):
                    continue
                began = _number(step.get("started_at"))
                at = f"+{began - start:.1f}s" if began is not None and start is not None else "-"
                detail = (
                    f"error: {_text(step['error'])}"
                    if step.get("error")
                    else _text(step.get("detail") or "")
                )
                table.append(
                    (
                        _text(step.get("name", "?")),
                        at,
                        _text(step.get("outcome", "?")),
                        _took(step.get("started_at"), step.get("finished_at")),
                        _text(step.get("attempts", "-")),
                        detail,
                    )
                )
            lines.extend("  " + line for line in _table(table).splitlines())
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


_STEP_COMMON = ("name", "action", "timeout", "retries", "required")


def render_plan(result: Mapping[str, Any], head: Sequence[str] = ()) -> str:
    plan = result.get("plan")
    plan = plan if isinstance(plan, dict) else {}
    lines = list(head) or [
        f"dry run (nothing was changed): failover {_text(plan.get('failover_id', '?'))} "
        f"({_text(plan.get('trigger', '?'))}), {_text(plan.get('from', '?'))} -> "
        f"{_text(plan.get('to', '?'))}"
    ]
    if plan.get("reason"):
        lines.append(f"reason: {_text(plan['reason'])}")
    steps = plan.get("steps")
    if not isinstance(steps, list) or not steps:
        lines.append("no steps")
        return "\n".join(lines)
    for i, step in enumerate(steps, 1):
        if not isinstance(step, dict):
            continue
        timeout = _number(step.get("timeout"))
        facts = [
            f"timeout {_duration(timeout)}" if timeout is not None else None,
            f"retries {_text(step['retries'])}" if "retries" in step else None,
            None if "required" not in step else ("required" if step["required"] else "optional"),
        ]
        summary = ", ".join(f for f in facts if f)
        lines.append(
            f"{i:>3}. {_text(step.get('name', '?'))} [{_text(step.get('action', '?'))}]"
            + (f"  {summary}" if summary else "")
        )
        for key, value in step.items():
            if key not in _STEP_COMMON:
                lines.append(f"       {key}: {_value(value)}")
    return "\n".join(lines)


def render_rejoin(result: Mapping[str, Any]) -> str:
    """A rejoin's divergence report first, then its steps (dry run) or its id."""
    plan = result.get("plan")
    plan = plan if isinstance(plan, dict) else {}
    old, new = _text(plan.get("from", "?")), _text(plan.get("to", "?"))
    if result.get("dry_run"):
        head = f"dry run (nothing was changed): rejoin {old} as the standby of {new}"
    else:
        head = f"rejoin {_text(result.get('started', '?'))} started: {old} -> standby of {new}"
    lines = [head, f"divergence: {_divergence(result.get('divergence'))}"]
    if result.get("refused"):
        lines.append(f"would be REFUSED: {_text(result['refused'])}")
    if result.get("note"):
        lines.append(f"note: {_text(result['note'])}")
    if not result.get("dry_run"):
        lines.append("follow it with: watchdogctl status (re-armed once verified)")
        return "\n".join(lines)
    return render_plan(result, lines)


def _divergence(report: Any) -> str:
    if not isinstance(report, dict):
        return "-"
    if report.get("diverged") is None:
        return f"UNKNOWN ({_text(report.get('detail') or report.get('summary'))})"
    if not report.get("diverged"):
        return f"none ({_text(report.get('summary'))}): nothing is thrown away"
    return (
        f"{_text(report.get('old_primary', '?'))} holds {_text(report.get('summary'))} that "
        f"{_text(report.get('new_primary', '?'))} never got; a rejoin throws them away"
    )


def render_generic(command: str, result: Mapping[str, Any]) -> str:
    lines = []
    if result.get("message"):
        lines.append(_text(result["message"]))
    lines.extend(f"{k}: {_value(v)}" for k, v in result.items() if k != "message")
    return "\n".join(lines) if lines else f"{command}: done"


# -- formatting helpers; every one tolerates a missing or mistyped value


def _text(value: Any) -> str:
    if value is None:
        return "-"
    # Daemon-supplied text must not move the cursor or fake extra lines.
    return "".join(c if c.isprintable() else " " for c in str(value))


def _value(value: Any) -> str:
    if isinstance(value, dict | list):
        return _text(json.dumps(value, default=str))
    if isinstance(value, bool):
        return "yes" if value else "no"
    return _text(value)


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def format_bytes(n: Any) -> str:
    """``1572864`` → ``1.6 MB``, as blocked reasons and the docs write sizes; ``?`` for
    anything but a number."""
    value = _number(n)
    return "?" if value is None else units.format_bytes(value)


def _duration(seconds: Any) -> str:
    value = _number(seconds)
    if value is None:
        return "?"
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 60:
        return f"{value:.1f}s"
    if value < 3600:
        return f"{int(value // 60)}m{int(value % 60):02d}s"
    return f"{int(value // 3600)}h{int(value % 3600 // 60):02d}m"


def _when(ts: Any) -> str:
    value = _number(ts)
    if value is None:
        return "-"
    try:
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return _text(ts)


def _took(started: Any, finished: Any) -> str:
    a, b = _number(started), _number(finished)
    if a is None or b is None:
        return "-"
    return _duration(max(b - a, 0.0))


def _lag(lag: Mapping[str, Any]) -> str:
    parts = []
    if "bytes" in lag:
        parts.append(format_bytes(lag.get("bytes")) if lag.get("bytes") is not None else "?")
    if lag.get("seconds") is not None:
        parts.append(f"{_duration(lag.get('seconds'))} behind")
    if "streaming" in lag:
        parts.append("streaming" if lag.get("streaming") else "NOT streaming")
    return ", ".join(parts) or "-"


def _health(check: Any) -> str:
    if check is None:
        return "-"
    if not isinstance(check, dict):
        return _text(check)
    latency = _number(check.get("latency"))
    if check.get("ok"):
        return "ok" + (f" ({_duration(latency)})" if latency is not None else "")
    return "FAIL: " + _text(check.get("detail") or "down")


def _failover_line(f: Mapping[str, Any]) -> str:
    took = _took(f.get("started_at"), f.get("finished_at"))
    return (
        f"{_text(f.get('id', '?'))}: {_text(f.get('trigger', '?'))}, "
        f"{_text(f.get('outcome', '?'))}, {_text(f.get('from', '?'))} -> "
        f"{_text(f.get('to', '?'))}, {_when(f.get('started_at'))}"
        + (f" (took {took})" if took != "-" else "")
    )


def _pairs(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}".rstrip() for k, v in rows)


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


if __name__ == "__main__":
    sys.exit(main())
