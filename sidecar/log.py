"""Named loggers and the two output formats (text and JSON).

Every module logs through one of the loggers below. The message is a fixed,
dotted event name (``upstream.connect_failed``); variable data travels in
``extra`` and is printed as ``key=value`` pairs (text) or object fields (JSON).
That keeps lines greppable and lets a log pipeline index fields.

Never logged, anywhere: the ``Authorization`` header, cookies, API keys,
prompts or completions. Log digests, byte counts and token counts instead;
client-controlled strings go through ``clip()`` first.

``SIDECAR_LOG_FORMAT=text|json`` and ``SIDECAR_LOG_LEVEL`` choose the output;
``configure()`` is called once by the command line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, Final

access = logging.getLogger("sidecar.access")
proxy = logging.getLogger("sidecar.proxy")
upstream = logging.getLogger("sidecar.upstream")
cache = logging.getLogger("sidecar.cache")
coalesce = logging.getLogger("sidecar.coalesce")
sse = logging.getLogger("sidecar.sse")
manifest = logging.getLogger("sidecar.manifest")
server = logging.getLogger("sidecar.server")
artifacts = logging.getLogger("sidecar.artifacts")
state = logging.getLogger("sidecar.state")

MAX_CLIENT_TEXT: Final = 200

# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD_ATTRS: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName"}
)


def clip(text: str, limit: int = MAX_CLIENT_TEXT) -> str:
    """Cap a client-controlled string before it reaches a log line."""
    return text if len(text) <= limit else text[:limit] + "..."


def _extra_items(record: logging.LogRecord) -> list[tuple[str, Any]]:
    """The fields a record got from ``extra``, in the order they were given."""
    return [(k, v) for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS]


_NEEDS_QUOTES: Final = re.compile(r'[ ="\n]')
_PLAIN_TYPES: Final = frozenset({int, float, bool})
# Rendered ``key=value`` pairs a text formatter keeps, and the longest value.
_MAX_KEPT_PAIRS: Final = 4096
_MAX_KEPT_VALUE: Final = 64


def _format_value(value: Any) -> str:
    if value is None or isinstance(value, (int, float)):
        return str(value)
    text = str(value)
    if not text or _NEEDS_QUOTES.search(text):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """``2026-01-01T00:00:00.123Z INFO sidecar.access http.request key=value``."""

    _second = -1
    _stamp = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pairs: dict[tuple[str, str], str] = {}

    def format(self, record: logging.LogRecord) -> str:
        line = self.format_event(
            record.created, record.levelname, record.name, record.getMessage(),
            _extra_items(record),
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line

    def format_event(
        self,
        created: float,
        level: str,
        logger: str,
        event: str,
        fields: Iterable[tuple[str, Any]],
    ) -> str:
        """The line of one event, from its parts (``format`` and ``access_line``)."""
        return " ".join([self._start(created, level, logger, event), *self._rendered(fields)])

    def format_group(
        self,
        created: float,
        level: str,
        logger: str,
        event: str,
        head: Sequence[tuple[str, Any]],
        rows: Iterable[Sequence[tuple[str, Any]]],
        tail: Sequence[tuple[str, Any]],
    ) -> list[str]:
        """``format_event`` of ``head + row + tail`` for each row, sharing the work.

        The timestamp and the shared fields are rendered once for all rows.
        """
        start = " ".join([self._start(created, level, logger, event), *self._rendered(head)])
        end = self._rendered(tail)
        rendered = self._rendered
        return [" ".join([start, *rendered(row), *end]) for row in rows]

    def _start(self, created: float, level: str, logger: str, event: str) -> str:
        """What every line begins with: time, level, logger and event."""
        second = int(created)
        if second != self._second:
            # One strftime a second, not one a line: the access log is on
            # the hot path of every request.
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        # The millisecond as LogRecord computes ``msecs``.
        msecs = int((created - second) * 1000)
        return f"{self._stamp}.{msecs:03d}Z {level} {logger} {event}"

    def _rendered(self, fields: Iterable[tuple[str, Any]]) -> list[str]:
        """``key=value`` for each field, in order."""
        parts = []
        plain = _PLAIN_TYPES
        seen = self._pairs
        for k, v in fields:
            kind = type(v)
            if v is None or kind in plain:
                parts.append(f"{k}={v}")
                continue
            if kind is str:
                # Most string fields repeat (methods, routes, outcomes):
                # their rendering is kept, within a bound.
                pair = seen.get((k, v))
                if pair is None:
                    pair = _pair(k, v)
                    if len(seen) < _MAX_KEPT_PAIRS and len(v) <= _MAX_KEPT_VALUE:
                        seen[(k, v)] = pair
                parts.append(pair)
                continue
            parts.append(_pair(k, str(v)))
        return parts


def _pair(key: str, text: str) -> str:
    """``key=text``, the text in JSON quotes when empty or holding ``" =\\n``."""
    if not text or _NEEDS_QUOTES.search(text):
        return f"{key}={json.dumps(text)}"
    return f"{key}={text}"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, event, then the extras."""

    def format(self, record: logging.LogRecord) -> str:
        doc = self._doc(record.created, record.levelname, record.name, record.getMessage())
        doc.update(_extra_items(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))

    def format_event(
        self,
        created: float,
        level: str,
        logger: str,
        event: str,
        fields: Iterable[tuple[str, Any]],
    ) -> str:
        """The line of one event, from its parts (``format`` and ``access_line``)."""
        doc = self._doc(created, level, logger, event)
        doc.update(fields)
        return json.dumps(doc, default=str, separators=(",", ":"))

    def format_group(
        self,
        created: float,
        level: str,
        logger: str,
        event: str,
        head: Sequence[tuple[str, Any]],
        rows: Iterable[Sequence[tuple[str, Any]]],
        tail: Sequence[tuple[str, Any]],
    ) -> list[str]:
        """``format_event`` of ``head + row + tail`` for each row."""
        return [
            self.format_event(created, level, logger, event, [*head, *row, *tail])
            for row in rows
        ]

    @staticmethod
    def _doc(created: float, level: str, logger: str, event: str) -> dict[str, Any]:
        return {"ts": round(created, 6), "level": level, "logger": logger, "event": event}


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes lines in batches, as nginx's buffered access log does.

    Writing and flushing each access line on its own costs a system call
    per request, and on a busy host a write can take milliseconds; at low
    concurrency that lands on the next request. Lines logged while a loop
    runs are kept and written together ``FLUSH_INTERVAL_S`` later, or at
    once when ``FLUSH_BYTES`` are waiting, or with a record at WARNING or
    above (so problems show without delay). Lines logged with no running
    loop (another thread, start-up) are written at once. Nothing is lost at
    a normal exit: ``flush()``, which logging calls at shutdown, writes the
    buffer; a crash loses at most the last interval's lines.
    """

    FLUSH_INTERVAL_S: Final = 0.1
    FLUSH_BYTES: Final = 64 * 1024

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.emit_line(line, urgent=record.levelno >= logging.WARNING)

    def emit_line(self, line: str, *, urgent: bool = False) -> None:
        """Queue one formatted line (``emit`` without the record)."""
        self._pending.append(line)
        self._pending_bytes += len(line) + 1
        if urgent or self._pending_bytes >= self.FLUSH_BYTES:
            self.flush()
            return
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_later(self.FLUSH_INTERVAL_S, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        # Swapped, not cleared after the join: a line another thread adds
        # meanwhile goes into the next batch instead of being lost.
        pending, self._pending = self._pending, []
        self._pending_bytes = 0
        if pending:
            try:
                self.stream.write("\n".join(pending) + "\n")
            except (OSError, ValueError):
                return
        super().flush()


# The handler configure() installed, whose formatter access_line may call
# directly; None until then.
_direct: BatchingStreamHandler | None = None


def access_line(fields: dict[str, Any], event: str = "http.request") -> None:
    """Log one request at INFO on ``sidecar.access``, with ``fields`` as extras.

    Once ``configure()`` has set up the output, and while nothing has been
    added on the way (a handler, a filter, another level), the line is
    formatted and queued directly: the same text as through ``logging``,
    without building a LogRecord or walking the handler chain, which was
    most of an access line's cost. Otherwise it goes through ``logging``.
    """
    if not access.isEnabledFor(logging.INFO):
        return
    direct = _direct_output()
    if direct is None:
        access.info(event, extra=fields)
        return
    handler, formatter = direct
    handler.emit_line(
        formatter.format_event(time.time(), "INFO", access.name, event, fields.items())
    )


def access_group(
    head: Sequence[tuple[str, Any]],
    rows: Iterable[Sequence[tuple[str, Any]]],
    tail: Sequence[tuple[str, Any]] = (),
    event: str = "http.request",
) -> None:
    """``access_line`` for rows that share their first and last fields.

    Line ``i`` has the fields ``head + rows[i] + tail``; the shared parts
    (and, in text, the timestamp) are formatted once for all of them.
    """
    if not access.isEnabledFor(logging.INFO):
        return
    direct = _direct_output()
    if direct is None:
        for row in rows:
            access.info(event, extra=dict([*head, *row, *tail]))
        return
    handler, formatter = direct
    emit = handler.emit_line
    for line in formatter.format_group(
        time.time(), "INFO", access.name, event, head, rows, tail
    ):
        emit(line)


def _direct_output() -> tuple[BatchingStreamHandler, TextFormatter | JsonFormatter] | None:
    """The handler and formatter access lines may go to directly, or None."""
    handler = _direct
    if handler is None or not _direct_route(handler):
        return None
    formatter = handler.formatter
    assert isinstance(formatter, (TextFormatter, JsonFormatter))
    return handler, formatter


def _direct_route(handler: BatchingStreamHandler) -> bool:
    """True when an access record would reach ``handler`` alone, unfiltered."""
    parent = access.parent
    return (
        not access.handlers
        and not access.filters
        and access.propagate
        and parent is not None
        and parent.handlers == [handler]
        and not parent.filters
        and not parent.propagate
        and not handler.filters
        and handler.level <= logging.INFO
    )


def configure(fmt: str = "text", level: str = "INFO") -> None:
    """Route every ``sidecar.*`` logger to stderr in the chosen format."""
    # No caller lookup (a stack walk per record), no thread or process names:
    # none of them is printed, and together they were a third of an access
    # line's cost.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BatchingStreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("sidecar")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    global _direct
    _direct = handler
