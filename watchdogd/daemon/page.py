"""The read-only status page (``GET /`` on the metrics port): one server-rendered HTML
document from what ``status`` and ``history`` already say.

``render`` is a pure function of its arguments: no I/O, no clock of its own. Every piece
of text from the daemon goes through ``html.escape`` (reasons, probe details and step
errors quote what remote systems answered); the caller passes values already masked.
The page has no script, no form and no link that changes anything; it refreshes itself
with ``<meta http-equiv="refresh">`` and reads as plain headings, definition lists and
tables when its small inline style is ignored.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from watchdogd.core import units

REFRESH_SECONDS = 5
# The failovers the page shows, newest first (``history`` has them all).
FAILOVERS_SHOWN = 5

# No script may run, nothing may be framed, fetched or submitted: the page is text.
HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

_STATE_TONE = {
    "watching": "ok",
    "suspect": "warn",
    "paused": "warn",
    "failed_over": "warn",
    "failing_over": "bad",
    "blocked": "bad",
    "failed": "bad",
    "store_unavailable": "bad",
}
_OUTCOME_TONE = {"ok": "ok", "completed": "ok", "skipped": "muted", "in progress": "warn"}

_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:1.5rem auto;max-width:72rem;padding:0 1rem;
color:#1d2327;background:#fff}
h1{font-size:1.5rem;margin:0 0 .2rem}h2{font-size:1.15rem;margin:1.6rem 0 .5rem;
border-bottom:1px solid #ccd0d4;padding-bottom:.2rem}h3{font-size:1rem;margin:1rem 0 .3rem}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.15rem 1rem;margin:.3rem 0}
dt{font-weight:600}dd{margin:0}
table{border-collapse:collapse;width:100%;margin:.3rem 0}
th,td{text-align:left;padding:.25rem .5rem;border-bottom:1px solid #e2e4e7;vertical-align:top}
th{background:#f6f7f7}
.ok{color:#0a6b2f}.warn{color:#8a5a00}.bad{color:#b32d2e}.muted{color:#646970}
.badge{font-weight:700;text-transform:uppercase;letter-spacing:.03em}
.detail{font-family:ui-monospace,monospace;font-size:.85em;word-break:break-word}
footer{margin-top:2rem;color:#646970;font-size:.85em}
""".strip()


def render(
    status: Mapping[str, Any],
    failovers: Sequence[Mapping[str, Any]],
    now: float,
    *,
    refresh: int = REFRESH_SECONDS,
) -> str:
    """The whole page: ``status`` as ``Views.status()`` returns it (with ``readiness``
    when the daemon reports it), ``failovers`` as ``history`` lists them (newest first),
    ``now`` the wall-clock time the page says it was made."""
    cluster = _t(status.get("cluster", "?"))
    state = _t(status.get("state", "unknown"))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{max(1, int(refresh))}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{state} · {cluster} · watchdogd</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        "<header>",
        f"<h1>watchdogd: cluster {cluster}</h1>",
        f'<p class="muted">watchdogd {_t(status.get("version", "?"))}; page made '
        f"{_when(now)}; it refreshes itself every {max(1, int(refresh))} s and changes "
        "nothing.</p>",
        "</header>",
        "<main>",
        _state_section(status, now),
        _nodes_section(status),
        _lag_section(status),
        _readiness_section(status.get("readiness"), now),
        _failovers_section(failovers[:FAILOVERS_SHOWN]),
        "</main>",
        '<footer>Read-only. Machine-readable: <a href="/metrics">/metrics</a>, '
        '<a href="/healthz">/healthz</a>; steer the daemon with <code>watchdogctl</code> '
        "on its host.</footer>",
        "</body>",
        "</html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


# --------------------------------------------------------------------------- sections


def _state_section(s: Mapping[str, Any], now: float) -> str:
    state = str(s.get("state", "unknown"))
    rows: list[tuple[str, str]] = [
        ("State", f'<span class="badge {_STATE_TONE.get(state, "muted")}">{_t(state)}</span>'),
        ("Reason", _t(s.get("reason", "-"))),
    ]
    mode = _t(s.get("mode", "?"))
    armed = s.get("armed")
    if isinstance(armed, bool):
        mode += ", armed" if armed else ', <span class="warn">not armed</span>'
    rows.append(("Mode", mode))
    if s.get("paused"):
        reason = s.get("pause_reason")
        rows.append(("Paused", "yes" + (f": {_t(reason)}" if reason else "")))
    if s.get("awaiting_ack"):
        rows.append(
            ("Awaiting ack", '<span class="warn">yes</span> (<code>watchdogctl ack</code>)')
        )
    cooldown = _number(s.get("cooldown_left"))
    if cooldown:
        rows.append(("Cooldown left", _duration(cooldown)))
    roles = s.get("roles")
    if isinstance(roles, Mapping):
        rows.append(
            (
                "Roles",
                f"primary {_t(roles.get('primary', '?'))}, standby {_t(roles.get('standby', '?'))}",
            )
        )
    outage = _number(s.get("outage_seconds"))
    rows.append(("Outage", _duration(outage) if outage else "none"))
    verdict = s.get("verdict")
    if isinstance(verdict, Mapping) and verdict.get("failing"):
        rows.append(("Failing", _list(verdict.get("failing"))))
    running = s.get("failover_in_progress")
    if isinstance(running, Mapping):
        rows.append(
            (
                "In progress",
                f"{_t(running.get('id', '?'))} at step {_t(running.get('step', '?'))}, "
                f"since {_when(running.get('started_at'), now)}",
            )
        )
    rows.append(("Last probe cycle", _when(s.get("last_cycle_at"), now)))
    if s.get("journal_error"):
        rows.append(("Journal", f'<span class="bad">cannot write: {_t(s["journal_error"])}</span>'))
    return _section("state", "State", _dl(rows))


def _nodes_section(s: Mapping[str, Any]) -> str:
    nodes = [n for n in s.get("nodes") or () if isinstance(n, Mapping)]
    if not nodes:
        return _section("nodes", "Nodes", "<p>No node probed yet.</p>")
    rows = []
    for node in nodes:
        db = node.get("database")
        writable = db.get("writable") if isinstance(db, Mapping) else None
        rows.append(
            [
                _t(node.get("name", "?")),
                _t(node.get("role", "?")),
                _probe(db),
                "-" if writable is None else ("yes" if writable else "no"),
                _probe(node.get("app")) if node.get("app") is not None else "-",
            ]
        )
    return _section(
        "nodes",
        "Nodes",
        _table(["Node", "Role", "Database", "Writable", "Application"], rows),
    )


def _lag_section(s: Mapping[str, Any]) -> str:
    lag = s.get("lag")
    lag = lag if isinstance(lag, Mapping) else {}
    size = _number(lag.get("bytes"))
    seconds = _number(lag.get("seconds"))
    streaming = lag.get("streaming")
    rows = [
        ("Behind by", units.format_bytes(size) if size is not None else "unknown"),
        ("Replay delay", _duration(seconds) if seconds is not None else "unknown"),
        (
            "Streaming",
            "unknown"
            if streaming is None
            else ('<span class="ok">yes</span>' if streaming else '<span class="bad">no</span>'),
        ),
    ]
    if size is None and seconds is None and not _standby_answers(s):
        rows.append(("Why unknown", "the standby's database does not answer (see Nodes)"))
    return _section("lag", "Replication", _dl(rows))


def _standby_answers(s: Mapping[str, Any]) -> bool:
    for node in s.get("nodes") or ():
        if isinstance(node, Mapping) and node.get("role") == "standby":
            db = node.get("database")
            return isinstance(db, Mapping) and bool(db.get("ok"))
    return False


def _readiness_section(readiness: Any, now: float) -> str:
    if not isinstance(readiness, Mapping):
        return _section("readiness", "Readiness", "<p>Not reported by this daemon.</p>")
    checks = [c for c in readiness.get("checks") or () if isinstance(c, Mapping)]
    wrong = [c for c in checks if not c.get("ok")]
    ready = readiness.get("ready") is True
    head = (
        '<p><span class="badge ok">ready</span> to fail over'
        if ready
        else '<p><span class="badge bad">not ready</span> to fail over'
    )
    head += f"; checked {_when(readiness.get('checked_at'), now)}.</p>"
    body = [head]
    if wrong:
        body.append("<h3>What is wrong</h3>")
        body.append(
            "<ul>"
            + "".join(
                f'<li><span class="{_severity_tone(c)}">{_t(c.get("severity", "error"))}</span> '
                f"<strong>{_t(c.get('name', '?'))}</strong>: {_t(c.get('detail') or 'failed')}</li>"
                for c in wrong
            )
            + "</ul>"
        )
    if checks:
        rows = [
            [
                _t(c.get("name", "?")),
                '<span class="ok">ok</span>'
                if c.get("ok")
                else f'<span class="{_severity_tone(c)}">{_t(c.get("severity", "error"))}</span>',
                f'<span class="detail">{_t(c.get("detail") or "")}</span>',
            ]
            for c in sorted(checks, key=lambda c: bool(c.get("ok")))
        ]
        body.append("<h3>Checks</h3>")
        body.append(_table(["Check", "Result", "Detail"], rows))
    return _section("readiness", "Readiness", "\n".join(body))


def _failovers_section(failovers: Iterable[Mapping[str, Any]]) -> str:
    blocks = [_failover(f) for f in failovers if isinstance(f, Mapping)]
    if not blocks:
        return _section("failovers", "Recent failovers", "<p>No failover recorded.</p>")
    return _section("failovers", "Recent failovers", "\n".join(blocks))


def _failover(f: Mapping[str, Any]) -> str:
    outcome = str(f.get("outcome") or "in progress")
    tone = _OUTCOME_TONE.get(outcome, "bad")
    title = f'<h3>{_t(f.get("id", "?"))}: <span class="{tone}">{_t(outcome)}</span></h3>'
    rows = [
        ("Trigger", _t(f.get("trigger", "?")) + (" (forced)" if f.get("forced") else "")),
        ("From → to", f"{_t(f.get('from', '?'))} → {_t(f.get('to', '?'))}"),
        ("Reason", _t(f.get("reason") or "-")),
        ("Started", _when(f.get("started_at"))),
        ("Took", _took(f.get("started_at"), f.get("finished_at"))),
    ]
    if f.get("error"):
        rows.append(("Error", f'<span class="bad">{_t(f["error"])}</span>'))
    if "acked_at" in f:
        rows.append(("Acked", _when(f.get("acked_at")) if f.get("acked_at") else "not yet"))
    start = _number(f.get("started_at"))
    steps = []
    for step in f.get("steps") or ():
        if not isinstance(step, Mapping):
            continue
        began = _number(step.get("started_at"))
        at = f"+{began - start:.1f}{_NB}s" if began is not None and start is not None else "-"
        result = str(step.get("outcome") or "pending")
        detail = (
            f"error: {_t(step['error'])}" if step.get("error") else _t(step.get("detail") or "")
        )
        steps.append(
            [
                _t(step.get("name", "?")),
                _t(step.get("action") or "-"),
                at,
                f'<span class="{_OUTCOME_TONE.get(result, "bad")}">{_t(result)}</span>',
                _took(step.get("started_at"), step.get("finished_at")),
                _t(step.get("attempts", "-")),
                f'<span class="detail">{detail}</span>',
            ]
        )
    timeline = (
        _table(["Step", "Action", "At", "Outcome", "Took", "Attempts", "Detail"], steps)
        if steps
        else "<p>No step ran.</p>"
    )
    return f"<article>\n{title}\n{_dl(rows)}\n{timeline}\n</article>"


# --------------------------------------------------------------------------- pieces


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}">\n<h2>{title}</h2>\n{body}\n</section>'


def _dl(rows: Iterable[tuple[str, str]]) -> str:
    """Definition list; ``rows`` hold HTML already escaped."""
    return "<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A table; ``rows`` hold HTML already escaped."""
    head = "".join(f'<th scope="col">{h}</th>' for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _probe(check: Any) -> str:
    if not isinstance(check, Mapping):
        return '<span class="muted">not probed yet</span>'
    latency = _number(check.get("latency"))
    if check.get("ok"):
        return '<span class="ok">ok</span>' + (f" ({_duration(latency)})" if latency else "")
    return (
        '<span class="bad">FAIL</span> '
        f'<span class="detail">{_t(check.get("detail") or "down")}</span>'
    )


def _severity_tone(check: Mapping[str, Any]) -> str:
    return "warn" if str(check.get("severity", "error")).lower() in ("warning", "warn") else "bad"


def _list(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "; ".join(_t(v) for v in value)
    return _t(value)


def _t(value: Any) -> str:
    """Text for the page: escaped, quotes included (it may land in an attribute)."""
    return html.escape("-" if value is None else str(value), quote=True)


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


# A no-break space: "144 ms" never breaks across lines in a narrow cell.
_NB = "\u00a0"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}{_NB}ms"
    if seconds < 60:
        return f"{seconds:.1f}{_NB}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}{_NB}min {int(seconds % 60)}{_NB}s"
    return f"{int(seconds // 3600)}{_NB}h {int(seconds % 3600 // 60)}{_NB}min"


def _when(ts: Any, now: float | None = None) -> str:
    value = _number(ts)
    if value is None:
        return "never"
    try:
        text = datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return _t(ts)
    if now is not None:
        ago = now - value
        text += f" ({_duration(ago)} ago)" if ago >= 0 else " (in the future?)"
    return text


def _took(started: Any, finished: Any) -> str:
    a, b = _number(started), _number(finished)
    if a is None or b is None:
        return "-"
    return _duration(max(b - a, 0.0))
