"""Logging: the structlog setup of a daemon instance, masking every event.

One output for everything: structlog events and stdlib records (aiohttp, asyncio,
apscheduler, asyncpg) both end in a single stdlib handler whose ``ProcessorFormatter``
adds the same keys, masks secrets and renders either JSON lines
(``{"ts": ISO-8601 UTC, "level", "event", "cluster", ...facts}``) or the console format.

Secrets live in a ``core.secrets.Secrets`` holder owned by the daemon instance; the
masking processor reads it on every event, so ``secrets.replace(new_config.secrets)`` on
reload takes effect at once without reconfiguring anything (and keeps masking the old
ones). Calling ``setup_logging`` again (reload with a new level or format) replaces the
previous handler rather than adding one.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import TextIO

from watchdogd.core.secrets import Secrets, as_secrets, mask_deep

# structlog.dev imports rich and better_exceptions (pretty tracebacks this chain never
# asks for: format_exc_info renders them first, in every format) and colorama (Windows
# colours) when they are installed: several MiB resident for nothing here. Hide them
# while structlog loads, unless something already loaded them (issue 13).
_HIDDEN = [m for m in ("rich", "better_exceptions", "colorama") if m not in sys.modules]
sys.modules.update(dict.fromkeys(_HIDDEN))  # type: ignore[arg-type]  # None: ImportError
try:
    import structlog
    from structlog.typing import EventDict, Processor, WrappedLogger
finally:
    for _name in _HIDDEN:
        del sys.modules[_name]

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FORMATS = ("auto", "json", "console")


class _MaskSecrets:
    """Mask every value (and key) of the event dict, ProcessorFormatter's meta keys aside.

    With ``foreign_only`` it leaves events that come from structlog alone: those were
    already masked in structlog's own chain, before any stdlib handler could see them.
    """

    _META = frozenset({"_record", "_from_structlog"})

    def __init__(self, secrets: Secrets, *, foreign_only: bool = False) -> None:
        self.secrets = secrets
        self.foreign_only = foreign_only

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
        secrets = self.secrets.values
        if not secrets or (self.foreign_only and event_dict.get("_from_structlog")):
            return event_dict
        return {
            (k if k in self._META else mask_deep(k, secrets)): (
                v if k in self._META else mask_deep(v, secrets)
            )
            for k, v in event_dict.items()
        }


class _AddCluster:
    def __init__(self, cluster: str | None) -> None:
        self.cluster = cluster

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
        if self.cluster is not None:
            event_dict.setdefault("cluster", self.cluster)
        return event_dict


def _drop_logger_name(logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
    # Our own events do not need "logger": "watchdogd"; foreign ones keep theirs
    # ("aiohttp.client", "apscheduler.scheduler") because that is the useful part.
    if event_dict.get("logger") == "watchdogd":
        del event_dict["logger"]
    return event_dict


def _order_keys(logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
    # ts, level, event, cluster first: the lines read the same whatever the facts.
    head = {k: event_dict.pop(k) for k in ("ts", "level", "event", "cluster") if k in event_dict}
    return {**head, **event_dict}


class _OurHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler setup_logging installed (a second call replaces it).

    Without an explicit stream it writes to whatever ``sys.stderr`` is at each record, so
    a daemon built in a test keeps logging correctly after the test runner swaps stderr.
    """

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__(stream if stream is not None else sys.stderr)
        self.follow_stderr = stream is None

    def emit(self, record: logging.LogRecord) -> None:
        if self.follow_stderr:
            self.stream = sys.stderr
        super().emit(record)


def setup_logging(
    fmt: str = "auto",
    level: str = "info",
    cluster: str | None = None,
    secrets: Secrets | Iterable[str] = (),
    stream: TextIO | None = None,
) -> structlog.stdlib.BoundLogger:
    """Configure structlog and stdlib logging for this process; return the daemon's logger.

    Pass a ``Secrets`` holder to be able to replace the masked values later (reload);
    a plain iterable is copied. ``stream`` defaults to stderr (the journal under systemd).
    """
    if fmt not in FORMATS:
        raise ValueError(f"log.format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if level not in LEVELS:
        raise ValueError(f"log.level: expected one of {', '.join(LEVELS)}, got {level!r}")
    out = stream if stream is not None else sys.stderr
    holder = as_secrets(secrets)
    is_tty = bool(getattr(out, "isatty", lambda: False)())
    console = fmt == "console" or (fmt == "auto" and is_tty)

    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts")
    add_cluster = _AddCluster(cluster)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        add_cluster,
        timestamper,
    ]
    renderer: Processor
    if console:
        renderer = structlog.dev.ConsoleRenderer(colors=is_tty, timestamp_key="ts")
    else:
        renderer = structlog.processors.JSONRenderer()
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            # Exceptions become text before masking, so a secret in a traceback is caught too.
            structlog.processors.format_exc_info,
            _MaskSecrets(holder, foreign_only=True),
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _drop_logger_name,
            _order_keys,
            renderer,
        ],
    )
    handler = _OurHandler(stream)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(LEVELS[level])

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            # Masked here already, not only in the formatter: any other handler on the root
            # logger (a test's caplog, a library's) receives this event dict as is.
            _MaskSecrets(holder),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a second setup_logging (reload, tests) must reach existing loggers.
        cache_logger_on_first_use=False,
    )
    # The lazy proxy reads the configuration on every call, so loggers handed out before a
    # later setup_logging (reload with a new level) follow it.
    return structlog.stdlib.get_logger("watchdogd")


def reset_logging() -> None:
    """Undo setup_logging: remove our handler and restore structlog's defaults."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(old)
        old.close()
    root.setLevel(logging.WARNING)
    structlog.reset_defaults()
