"""The cheap upstream the benchmarks talk to: fixed JSON and timed SSE streams.

Run as ``python -m bench.upstream --port P``. It answers, over HTTP/1.1 with
keep-alive:

- ``GET /bench/sse?events=N&interval_ms=I&pad=B``: an SSE stream of ``N``
  events, one every ``I`` ms, each one HTTP chunk reading
  ``id: SEQ`` / ``data: {"seq": SEQ, "sent_ns": T, "pad": "..."}``, then
  ``data: [DONE]``. ``T`` is ``time.monotonic_ns()`` taken just before the
  write; on Linux that clock is system-wide, so a client in another process
  computes the delay of each event as its arrival time minus ``T``.
- any other request: a small fixed JSON body (``FIXED_BODY``). nginx's
  ``return 200`` is cheaper still and is what the HTTP load test uses; this
  path is the fallback when nginx is missing.

Owns the event format too: ``encode_event`` writes it and ``sent_ns_of``
reads it back, so the client and the server cannot drift apart. Not here:
the client that measures delays (``bench/bench_proxy.py``).

Invariants: one asyncio task per connection on uvloop, nothing shared between
connections; every stream is bounded (``MAX_EVENTS``, ``MAX_INTERVAL_MS``).

Known limitations: a deliberately small HTTP/1.1 server for benchmarks, not
a general one: request bodies are read by ``Content-Length`` only (a chunked
request body gets 400 and a close), and pipelined requests are answered in
order but parsed one at a time. Timers on uvloop have millisecond resolution,
so intervals are whole milliseconds; send times are exact all the same.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Final
from urllib.parse import parse_qs, urlsplit

import uvloop

FIXED_BODY: Final = b'{"object":"list","data":[{"id":"bench-model","object":"model"}]}'
JSON_PATH: Final = "/bench/json"
SSE_PATH: Final = "/bench/sse"
DONE_DATA: Final = b"[DONE]"
MAX_EVENTS: Final = 100_000
MAX_INTERVAL_MS: Final = 10_000
MAX_PAD_BYTES: Final = 65_536
MAX_HEAD_BYTES: Final = 16_384

_JSON_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % len(FIXED_BODY)
)
_SSE_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
)
_BAD_REQUEST: Final = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
)


def encode_event(seq: int, sent_ns: int, pad: int = 0) -> bytes:
    """One SSE event carrying its sequence number and send time."""
    data = json.dumps(
        {"seq": seq, "sent_ns": sent_ns, "pad": "x" * pad}, separators=(",", ":")
    )
    return f"id: {seq}\ndata: {data}\n\n".encode()


def sent_ns_of(line: bytes) -> int | None:
    """The send time in a ``data:`` line of ``encode_event``, else None."""
    if not line.startswith(b"data:"):
        return None
    data = line[5:].strip()
    if data == DONE_DATA:
        return None
    value = json.loads(data)["sent_ns"]
    return int(value)


def sse_query(events: int, interval_ms: int, pad: int) -> str:
    """The path and query that asks for such a stream."""
    return f"{SSE_PATH}?events={events}&interval_ms={interval_ms}&pad={pad}"


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _int_param(query: dict[str, list[str]], name: str, default: int, limit: int) -> int:
    try:
        value = int(query.get(name, [str(default)])[0])
    except ValueError:
        return default
    return min(max(value, 0), limit)


async def _send_stream(writer: asyncio.StreamWriter, target: str) -> None:
    """Write the SSE stream ``target`` asks for, pacing from one start time."""
    query = parse_qs(urlsplit(target).query)
    events = _int_param(query, "events", 100, MAX_EVENTS)
    interval_ns = _int_param(query, "interval_ms", 5, MAX_INTERVAL_MS) * 1_000_000
    pad = _int_param(query, "pad", 0, MAX_PAD_BYTES)
    writer.write(_SSE_HEAD)
    start_ns = time.monotonic_ns()
    for seq in range(events):
        # Pace from the start, not from the previous send, so lateness in one
        # wake-up does not push every later event back.
        delay_ns = start_ns + seq * interval_ns - time.monotonic_ns()
        if delay_ns > 0:
            await asyncio.sleep(delay_ns / 1e9)
        writer.write(_chunk(encode_event(seq, time.monotonic_ns(), pad)))
        await writer.drain()
    writer.write(_chunk(b"data: " + DONE_DATA + b"\n\n") + b"0\r\n\r\n")
    await writer.drain()


async def _read_head(
    reader: asyncio.StreamReader,
) -> tuple[str, str, dict[str, str]] | None:
    """The method, target and lower-cased headers of the next request."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return None
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return parts[0], parts[1], headers


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer requests on one connection until the client closes it."""
    try:
        while (request := await _read_head(reader)) is not None:
            _method, target, headers = request
            if "transfer-encoding" in headers:
                writer.write(_BAD_REQUEST)
                break
            await reader.readexactly(int(headers.get("content-length", "0") or 0))
            if urlsplit(target).path == SSE_PATH:
                await _send_stream(writer, target)
            else:
                writer.write(_JSON_HEAD + FIXED_BODY)
            if headers.get("connection", "").lower() == "close":
                break
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        pass  # the client went away or sent garbage; nothing to answer
    finally:
        writer.close()


async def serve(host: str, port: int) -> None:
    """Listen on ``host:port`` until cancelled."""
    server = await asyncio.start_server(_serve, host, port, limit=MAX_HEAD_BYTES)
    print(
        f"bench.upstream.listening host={host} port={port}", file=sys.stderr, flush=True
    )
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.upstream", description=__doc__
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        uvloop.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
