"""Server-sent event framing for the state streams.

Owns the bytes of every event the hub sends: ``snapshot`` (a whole read model),
``patch`` (one delta: an RFC 6902 JSON Patch against the model's previous
state), ``keepalive``, ``shutdown`` and the ``retry:`` hint, framed as the
WHATWG HTML "event stream" format (section 9.2) defines them.
Not here: deciding what to send or when (hub.py), writing to sockets
(views.py).

Invariants: every event carries ``event:``, ``id:`` and exactly one ``data:``
line; the data is compact JSON (no newline can occur in it, since JSON escapes
control characters inside strings) and never holds NaN or Infinity, which
``JSON.parse`` in a browser rejects. A frame ends with a blank line, so frames
can be concatenated into one write.

Known limitations: none of the optional fields beyond ``retry`` are used.
"""

from __future__ import annotations

import json
from typing import Any, Final

EVENT_SNAPSHOT: Final = "snapshot"
EVENT_PATCH: Final = "patch"
EVENT_KEEPALIVE: Final = "keepalive"
EVENT_SHUTDOWN: Final = "shutdown"

_SEPARATORS: Final = (",", ":")


def dumps(value: Any) -> str:
    """Compact JSON with non-finite numbers refused (a bug, not a client error)."""
    return json.dumps(value, separators=_SEPARATORS, allow_nan=False)


def encode_event(event: str, event_id: int, data: str) -> bytes:
    """One framed event; ``data`` must be a single line."""
    if "\n" in data or "\r" in data:
        raise ValueError("SSE data must be one line; JSON from dumps() always is")
    return f"event: {event}\nid: {event_id}\ndata: {data}\n\n".encode()


def encode_snapshot(model: str, state: dict[str, Any], event_id: int) -> bytes:
    """``event: snapshot`` with data ``{"model": NAME, "state": {...}}``."""
    return encode_event(
        EVENT_SNAPSHOT, event_id, dumps({"model": model, "state": state})
    )


def encode_delta(model: str, patch_json: str, event_id: int) -> bytes:
    """``event: patch`` with data ``{"model": NAME, "patch": [...]}`` (RFC 6902).

    ``patch_json`` is the patch already serialised (``Delta.json()``), so its
    operations are not encoded twice.
    """
    data = '{"model":' + dumps(model) + ',"patch":' + patch_json + "}"
    return encode_event(EVENT_PATCH, event_id, data)


def encode_keepalive(event_id: int) -> bytes:
    """An idle event; its id moves the client's resume point forward."""
    return encode_event(EVENT_KEEPALIVE, event_id, "{}")


def encode_shutdown(event_id: int) -> bytes:
    """The last event of a stream whose server is going away."""
    return encode_event(EVENT_SHUTDOWN, event_id, dumps({"reason": "shutdown"}))


def encode_retry(retry_s: float) -> bytes:
    """The reconnection delay hint, in whole milliseconds (at least 1)."""
    return f"retry: {max(1, round(retry_s * 1000))}\n\n".encode()
