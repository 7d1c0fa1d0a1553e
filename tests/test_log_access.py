"""Access lines: the direct path writes what ``logging`` would have written.

``log.access_line`` formats and queues a line itself while the route from
``sidecar.access`` to the configured handler is untouched, and goes through
``logging`` otherwise. These tests hold the direct line against the
formatter's ``format(record)`` for the same fields and time, check that the
text formatter's kept ``key=value`` pairs never change a line, and that an
added handler, a filter or a level is honoured.

``configure()`` replaces process-wide logging state; the autouse fixture
puts it back so the rest of the suite logs as before.
"""

from __future__ import annotations

import asyncio
import calendar
import io
import json
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sidecar import log

NOW = 1767225600.123456  # 2026-01-01T00:00:00.123456Z
FORMATS = ("text", "json")
QUOTED = ("with space", "a=b", 'say "hi"', "line\nbreak", "")


class _FrozenClock:
    """The ``time`` module as ``sidecar.log`` sees it, with ``time()`` fixed."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def _logging_state() -> Iterator[None]:
    """Save and restore what ``configure()`` and these tests change."""
    root = logging.getLogger("sidecar")
    access = log.access
    saved_root = (list(root.handlers), list(root.filters), root.level, root.propagate)
    saved_access = (
        list(access.handlers),
        list(access.filters),
        access.level,
        access.propagate,
    )
    saved_flags = (
        logging._srcfile,
        logging.logThreads,
        logging.logProcesses,
        logging.logMultiprocessing,
    )
    saved_direct = log._direct
    try:
        yield
    finally:
        root.handlers[:], root.filters[:] = saved_root[0], saved_root[1]
        root.propagate = saved_root[3]
        access.handlers[:], access.filters[:] = saved_access[0], saved_access[1]
        access.propagate = saved_access[3]
        (
            logging._srcfile,
            logging.logThreads,
            logging.logProcesses,
            logging.logMultiprocessing,
        ) = saved_flags
        log._direct = saved_direct
        # setLevel, not assignment: it also clears isEnabledFor's caches.
        root.setLevel(saved_root[2])
        access.setLevel(saved_access[2])


def _configure(
    fmt: str, level: str = "INFO"
) -> tuple[log.BatchingStreamHandler, io.StringIO]:
    """``configure()``, with the installed handler writing to a buffer."""
    log.configure(fmt, level)
    handler = log._direct
    assert handler is not None
    buf = io.StringIO()
    handler.setStream(buf)
    return handler, buf


def _written(handler: log.BatchingStreamHandler, buf: io.StringIO) -> list[str]:
    handler.flush()
    return buf.getvalue().splitlines()


def _forbid_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make a fall-back to ``logging`` fail the test: the direct path is tested."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("access_line went through logging")

    monkeypatch.setattr(log.access, "info", refuse)


def _reference(
    fmt: str, fields: dict[str, Any], event: str = "http.request", created: float = NOW
) -> str:
    """What a fresh formatter's ``format`` gives for the record ``logging`` makes."""
    formatter = log.JsonFormatter() if fmt == "json" else log.TextFormatter()
    record = log.access.makeRecord(
        log.access.name, logging.INFO, "", 0, event, (), None, extra=fields
    )
    record.created = created
    return formatter.format(record)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("event", ["http.request", "http.stream_end"])
def test_access_line_direct_matches_record_format(
    fmt: str, event: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The direct line equals ``format(record)`` for the same fields and time."""
    handler, buf = _configure(fmt)
    monkeypatch.setattr(log, "time", _FrozenClock(NOW))
    _forbid_logging(monkeypatch)
    fields: dict[str, Any] = {
        "method": "GET",
        "route": "chat",
        "status": 200,
        "duration_ms": 1.25,
        "bytes": 1234,
        "cache": "hit",
        "tier": None,
        "cut": True,
        "ratio": 0.5,
    }
    log.access_line(fields, event=event)
    assert _written(handler, buf) == [_reference(fmt, fields, event)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_access_line_quoted_values_match_record_format(
    fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Values with a space, ``=``, ``"``, a newline or nothing are quoted alike."""
    handler, buf = _configure(fmt)
    monkeypatch.setattr(log, "time", _FrozenClock(NOW))
    _forbid_logging(monkeypatch)
    fields = {f"v{i}": value for i, value in enumerate(QUOTED)}
    log.access_line(fields)
    lines = _written(handler, buf)
    assert lines == [_reference(fmt, fields)]
    if fmt == "text":
        for key, value in fields.items():
            assert f" {key}={json.dumps(value)}" in lines[0]
    else:
        assert {k: json.loads(lines[0])[k] for k in fields} == fields


def test_text_kept_pairs_repeated_value_same_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A value rendered from the kept pairs reads as when first rendered."""
    handler, buf = _configure("text")
    monkeypatch.setattr(log, "time", _FrozenClock(NOW))
    _forbid_logging(monkeypatch)
    fields = {"route": "chat", "reason": "no store", "empty": ""}
    log.access_line(fields)
    log.access_line(fields)
    assert _written(handler, buf) == [_reference("text", fields)] * 2


def test_text_kept_pairs_long_values_same_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Values at and past the kept-value bound render the same every time."""
    handler, buf = _configure("text")
    monkeypatch.setattr(log, "time", _FrozenClock(NOW))
    _forbid_logging(monkeypatch)
    fields = {
        "at": "a" * log._MAX_KEPT_VALUE,
        "past": "b" * (log._MAX_KEPT_VALUE + 1),
        "quoted": " " * (log._MAX_KEPT_VALUE + 1),
    }
    log.access_line(fields)
    log.access_line(fields)
    assert _written(handler, buf) == [_reference("text", fields)] * 2


def test_text_kept_pairs_past_bound_same_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """More distinct values than are kept still render each one correctly."""
    handler, buf = _configure("text")
    monkeypatch.setattr(log, "time", _FrozenClock(NOW))
    _forbid_logging(monkeypatch)
    count = log._MAX_KEPT_PAIRS + 50
    values = [f"r{i}" if i % 2 else f"r {i}" for i in range(count)]
    # Again the first (kept) and the last (not kept) once the bound is reached.
    values += [values[0], values[-1]]
    for value in values:
        log.access_line({"route": value})
    expected = [_reference("text", {"route": value}) for value in values]
    assert _written(handler, buf) == expected


def test_text_kept_pairs_stay_within_bound() -> None:
    """The formatter keeps at most ``_MAX_KEPT_PAIRS`` short string pairs."""
    formatter = log.TextFormatter()
    for i in range(log._MAX_KEPT_PAIRS + 50):
        formatter.format_event(NOW, "INFO", "sidecar.access", "e", [("k", f"v{i}")])
    formatter.format_event(NOW, "INFO", "sidecar.access", "e", [("k", "x" * 100)])
    assert len(formatter._pairs) <= log._MAX_KEPT_PAIRS


@pytest.mark.parametrize("fmt", FORMATS)
def test_access_line_with_access_handler_gives_record(fmt: str) -> None:
    """A handler on ``sidecar.access`` receives a LogRecord with the fields."""
    handler, buf = _configure(fmt)
    extra = _ListHandler()
    log.access.addHandler(extra)
    fields = {"method": "POST", "route": "chat", "status": 502, "cache": "miss"}
    log.access_line(fields)
    [record] = extra.records
    assert (record.name, record.levelno, record.getMessage()) == (
        "sidecar.access",
        logging.INFO,
        "http.request",
    )
    assert {k: getattr(record, k) for k in fields} == fields
    # The record still propagates to the configured output, formatted as usual.
    assert _written(handler, buf) == [handler.format(record)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_access_line_with_handler_filter_is_filtered(fmt: str) -> None:
    """A filter on the configured handler sees access lines and can drop them."""
    handler, buf = _configure(fmt)
    handler.addFilter(lambda record: record.__dict__.get("route") != "secret")
    log.access_line({"route": "secret"})
    log.access_line({"route": "chat"})
    lines = _written(handler, buf)
    assert len(lines) == 1
    assert "secret" not in lines[0] and "chat" in lines[0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_access_line_level_above_info_writes_nothing(fmt: str) -> None:
    """At WARNING, an access line (INFO) is not written."""
    handler, buf = _configure(fmt, "WARNING")
    log.access_line({"route": "chat", "status": 200})
    assert _written(handler, buf) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_access_line_handler_level_above_info_writes_nothing(fmt: str) -> None:
    """A handler raised to WARNING after ``configure()`` drops access lines."""
    handler, buf = _configure(fmt)
    handler.setLevel(logging.WARNING)
    log.access_line({"route": "chat", "status": 200})
    assert _written(handler, buf) == []


def test_access_line_text_stamp_is_current_utc_time() -> None:
    """The text line starts with the UTC time of the call, to the millisecond."""
    handler, buf = _configure("text")
    before = time.time()
    log.access_line({"route": "chat"})
    after = time.time()
    [line] = _written(handler, buf)
    match = re.fullmatch(
        r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})Z INFO sidecar\.access"
        r" http\.request route=chat",
        line,
    )
    assert match is not None, line
    seconds = calendar.timegm(time.strptime(match[1], "%Y-%m-%dT%H:%M:%S"))
    stamp = seconds + int(match[2]) / 1000
    assert int(before * 1000) / 1000 <= stamp <= after


def test_access_line_json_ts_is_current_time() -> None:
    """The JSON line's ``ts`` is the epoch time of the call, to the microsecond."""
    handler, buf = _configure("json")
    before = time.time()
    log.access_line({"route": "chat"})
    after = time.time()
    [line] = _written(handler, buf)
    doc = json.loads(line)
    assert before - 1e-6 <= doc["ts"] <= after + 1e-6
    assert doc == {
        "ts": doc["ts"],
        "level": "INFO",
        "logger": "sidecar.access",
        "event": "http.request",
        "route": "chat",
    }


# -- batching -------------------------------------------------------------------


async def test_batching_holds_lines_for_the_interval_under_a_loop() -> None:
    """Under a running loop a line waits for the timed flush, then is written."""
    buf = io.StringIO()
    handler = log.BatchingStreamHandler(buf)
    flushed = asyncio.get_running_loop().create_future()
    real_flush = handler.flush

    def flush() -> None:
        real_flush()
        if not flushed.done():
            flushed.set_result(None)

    handler.flush = flush  # type: ignore[method-assign]
    handler.emit_line("one")
    handler.emit_line("two")
    assert buf.getvalue() == ""
    await asyncio.wait_for(flushed, 5.0)
    assert buf.getvalue() == "one\ntwo\n"


async def test_batching_writes_a_warning_at_once() -> None:
    """A record at WARNING or above is written with what waits before it."""
    buf = io.StringIO()
    handler = log.BatchingStreamHandler(buf)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.emit_line("queued")
    handler.emit(logging.LogRecord("sidecar.x", logging.WARNING, "", 0, "urgent", None, None))
    assert buf.getvalue() == "queued\nurgent\n"


async def test_batching_writes_at_once_past_the_byte_bound() -> None:
    """Lines past FLUSH_BYTES are written without waiting for the interval."""
    buf = io.StringIO()
    handler = log.BatchingStreamHandler(buf)
    line = "x" * 1000
    count = handler.FLUSH_BYTES // (len(line) + 1) + 1
    for _ in range(count):
        handler.emit_line(line)
    assert buf.getvalue() == (line + "\n") * count


def test_batching_without_a_loop_writes_at_once() -> None:
    """With no running loop (start-up, another thread) a line is written at once."""
    buf = io.StringIO()
    handler = log.BatchingStreamHandler(buf)
    handler.emit_line("now")
    assert buf.getvalue() == "now\n"
