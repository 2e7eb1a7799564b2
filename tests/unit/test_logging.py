"""Logging: JSON line shape, one output for structlog and stdlib, secret masking everywhere
(nested values, exceptions, foreign records, after a reload), level filtering."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from watchdogd.core.secrets import Secrets
from watchdogd.logging import reset_logging, setup_logging


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    reset_logging()


def lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_json_lines_have_contract_keys_first() -> None:
    buf = io.StringIO()
    log = setup_logging("json", "info", cluster="shop", stream=buf)
    log.info("primary down", node="pg1", down_for=3.5)
    [line] = lines(buf)
    assert list(line)[:4] == ["ts", "level", "event", "cluster"]
    assert line == {
        "ts": line["ts"],
        "level": "info",
        "event": "primary down",
        "cluster": "shop",
        "node": "pg1",
        "down_for": 3.5,
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", line["ts"])
    assert datetime.fromisoformat(line["ts"].replace("Z", "+00:00")).utcoffset() is not None


def test_stdlib_records_share_the_output() -> None:
    buf = io.StringIO()
    setup_logging("json", "info", cluster="shop", stream=buf)
    logging.getLogger("aiohttp.client").warning("connection reset by %s", "peer")
    [line] = lines(buf)
    assert line["event"] == "connection reset by peer"
    assert line["level"] == "warning"
    assert line["logger"] == "aiohttp.client"
    assert line["cluster"] == "shop"
    assert "ts" in line


def test_level_filtering_applies_to_both_sources() -> None:
    buf = io.StringIO()
    log = setup_logging("json", "warning", stream=buf)
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    logging.getLogger("apscheduler.scheduler").info("job added")
    logging.getLogger("apscheduler.scheduler").error("job crashed")
    assert [(x["level"], x["event"]) for x in lines(buf)] == [
        ("warning", "w"),
        ("error", "e"),
        ("error", "job crashed"),
    ]


def test_secrets_masked_everywhere() -> None:
    buf = io.StringIO()
    secrets = Secrets(["s3cr3t-pass", "tok", "s3cr3t"])
    log = setup_logging("json", "debug", cluster="shop", secrets=secrets, stream=buf)
    log.info(
        "connecting with s3cr3t-pass",
        dsn="postgres://app:s3cr3t-pass@db/app",
        nested={"headers": {"Authorization": "Bearer tok"}, "list": ["a", ("x tok y",)]},
        count=3,
        flag=True,
    )
    [line] = lines(buf)
    text = buf.getvalue()
    assert "s3cr3t" not in text and "tok" not in text.replace('"ts"', "")
    assert line["event"] == "connecting with ***"
    # Longest first: the whole password is one "***", not "***-pass".
    assert line["dsn"] == "postgres://app:***@db/app"
    assert line["nested"] == {
        "headers": {"Authorization": "Bearer ***"},
        "list": ["a", ["x *** y"]],
    }
    assert (line["count"], line["flag"]) == (3, True)


def test_secrets_masked_in_exceptions_and_objects() -> None:
    buf = io.StringIO()
    log = setup_logging("json", "info", secrets=["hunter22"], stream=buf)

    class Conn:
        def __repr__(self) -> str:
            return "Conn(password='hunter22')"

    try:
        raise ConnectionError("auth failed for password hunter22")
    except ConnectionError as exc:
        log.exception("probe failed", error=exc, conn=Conn())
    [line] = lines(buf)
    assert "hunter22" not in buf.getvalue()
    assert "Traceback" in line["exception"]
    assert line["exception"].endswith("ConnectionError: auth failed for password ***")
    assert line["error"] == "ConnectionError('auth failed for password ***')"
    assert line["conn"] == "Conn(password='***')"


def test_foreign_exception_masked() -> None:
    buf = io.StringIO()
    setup_logging("json", "info", secrets=["hunter22"], stream=buf)
    try:
        raise RuntimeError("dsn=postgres://u:hunter22@h")
    except RuntimeError:
        logging.getLogger("asyncio").exception("Task exception was never retrieved")
    [line] = lines(buf)
    assert "hunter22" not in buf.getvalue()
    assert line["exception"].endswith("RuntimeError: dsn=postgres://u:***@h")


def test_other_root_handlers_never_see_structlog_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = setup_logging("json", "info", secrets=["hunter22"], stream=io.StringIO())
    with caplog.at_level(logging.INFO):
        log.info("login", password="hunter22")
    assert caplog.records and "hunter22" not in str(caplog.records[0].msg)


def test_replacing_secrets_takes_effect_for_existing_loggers() -> None:
    buf = io.StringIO()
    secrets = Secrets(["old-secret"])
    log = setup_logging("json", "info", secrets=secrets, stream=buf)
    secrets.replace(["new-secret"])
    log.info("x", a="old-secret new-secret")
    # A rotated secret stays masked: the old password may still work, or echo somewhere.
    assert lines(buf)[-1]["a"] == "*** ***"


def test_setup_again_replaces_handler_and_level() -> None:
    first, second = io.StringIO(), io.StringIO()
    log = setup_logging("json", "info", stream=first)
    setup_logging("json", "debug", stream=second)
    log.debug("after reload")
    logging.getLogger("aiohttp.server").info("once")
    assert first.getvalue() == ""
    assert [x["event"] for x in lines(second)] == ["after reload", "once"]


def test_console_format_on_tty_and_when_asked() -> None:
    tty = TTY()
    log = setup_logging("auto", "info", cluster="shop", secrets=["pw123"], stream=tty)
    log.info("hello", password="pw123")
    out = re.sub(r"\x1b\[[0-9;]*m", "", tty.getvalue())
    assert not out.startswith("{")
    assert "hello" in out and "cluster=shop" in out and "pw123" not in out and "***" in out

    plain = io.StringIO()
    setup_logging("auto", "info", stream=plain)  # not a TTY: JSON
    logging.getLogger("x").info("json please")
    assert lines(plain)[0]["event"] == "json please"

    forced = io.StringIO()
    log = setup_logging("console", "info", stream=forced)
    log.info("console please")
    assert "console please" in forced.getvalue()
    assert not forced.getvalue().startswith("{")
    assert "\x1b[" not in forced.getvalue()  # no colours when not a terminal


def test_default_stream_follows_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    log = setup_logging("json", "info")
    for name in ("first", "second"):
        buf = io.StringIO()
        monkeypatch.setattr("sys.stderr", buf)
        log.info(name)
        assert [x["event"] for x in lines(buf)] == [name]


def test_bad_format_or_level_is_one_clear_line() -> None:
    with pytest.raises(
        ValueError, match=r"^log.format: expected one of auto, json, console, got 'xml'$"
    ):
        setup_logging("xml")
    with pytest.raises(ValueError, match=r"^log.level: expected one of .*, got 'loud'$"):
        setup_logging("json", "loud")


def test_secrets_holder() -> None:
    s = Secrets(["abc", ""])
    assert "abc" in s and len(s) == 1
    s.add("defg")
    assert s.values == frozenset({"abc", "defg"})
    assert s.mask("abc defg ab") == "*** *** ab"
    assert s.mask_value({"abc": [1, b"defg", None]}) == {"***": [1, "***", None]}
