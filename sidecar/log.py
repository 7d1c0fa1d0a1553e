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


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}


_NEEDS_QUOTES: Final = re.compile(r'[ ="\n]')
_PLAIN_TYPES: Final = frozenset({int, float, bool})


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

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            # One strftime a second, not one a line: the access log is on
            # the hot path of every request.
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        parts = [
            f"{self._stamp}.{int(record.msecs):03d}Z {record.levelname} {record.name}"
            f" {record.getMessage()}"
        ]
        standard = _STANDARD_ATTRS
        plain = _PLAIN_TYPES
        quote = _NEEDS_QUOTES.search
        for k, v in record.__dict__.items():
            if k in standard:
                continue
            if v is None or type(v) in plain:
                parts.append(f"{k}={v}")
                continue
            text = str(v)
            parts.append(f"{k}={json.dumps(text)}" if not text or quote(text) else f"{k}={text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, event, then the extras."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        doc.update(_extras(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes lines in batches: at most one write a loop iteration.

    Under load the event loop handles many requests per iteration; writing
    and flushing each access line on its own costs a system call per
    request. Lines logged while a loop runs are buffered and written by one
    callback scheduled on that loop; lines logged with no running loop are
    written at once. Nothing is lost at exit: ``flush()`` writes the buffer.
    """

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._pending:
            text = "\n".join(self._pending) + "\n"
            self._pending.clear()
            try:
                self.stream.write(text)
            except (OSError, ValueError):
                return
        super().flush()


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
