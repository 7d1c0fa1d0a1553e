"""The data port's listener: sockets, connections, the idle sweep, shutdown.

Owns: ``HTTPServer``, which binds listening sockets, creates a
``Connection`` per accepted socket, closes keep-alive connections idle for
longer than ``keepalive_timeout_s`` and carries the steps a drain needs
(stop accepting, close idle connections, close everything). Not here: what
happens on a connection (connection.py).

Two handlers: ``handler``, a coroutine function called once per request,
and an optional ``quick`` one, a plain function tried first for a request
that has fully arrived when its turn comes, given the request and its body.
``quick`` returns the whole response as bytes (status line, fields, body;
framed for a connection that stays open) or None to leave the request to
``handler``. A small request arriving whole in one read on an idle
connection is offered to ``quick`` before it is even queued (reader.py). It exists for
answers that are ready in memory (cache hits): answering those from the
read callback costs no task wake-up, no coroutine and no response object,
which is most of what a small answer costs here. Quick answers are held
back ("corked") until the read callbacks of the loop iteration have run,
then sent together: one burst of writes wakes the client's side once, not
once per answer, and on the two-core bench machine that alone took a third
off a hit's CPU time (a connection's held answers always leave before
anything else it writes, so order is kept). ``after_quick``, when given, is
called right after those writes, once per loop iteration: the quick
handler's bookkeeping then costs no client its latency and no extra turn
of the loop.

Invariants: ``connections`` holds exactly the open connections (added when
made, removed when lost); ``in_flight`` counts handlers running right now.
The idle sweep runs every ``min(1 s, timeout / 4)``, so an idle connection
closes between ``timeout`` and ``timeout + interval`` after its last answer.

Known limitations: plain TCP only (no TLS, no Unix sockets); the idle
timeout also bounds how long a client may take to send a request head
(slow heads are cut with the idle ones, without a 408).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Final

from sidecar.http.connection import Connection
from sidecar.http.request import Request
from sidecar.http.response import StreamResponse

Handler = Callable[[Request], Awaitable[StreamResponse]]
# Given a request and its whole body, returns the complete response bytes,
# or None to pass the request on.
QuickHandler = Callable[[Request, bytes], "bytes | None"]

# Listen backlog, as aiohttp's. asyncio accepts up to this many connections
# in one loop turn, so a larger value lets a burst of new connections hold
# up the requests already in progress (and their upstream replies).
_BACKLOG: Final = 128
# How long ``close`` waits for cancelled handlers before aborting sockets.
_CLOSE_WAIT_S: Final = 1.0
# Loop iterations ``close`` waits for aborted transports to report the loss.
_LOST_WAIT_ROUNDS: Final = 10


class HTTPServer:
    """An HTTP/1.1 server calling ``handler`` once per request."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_header_bytes: int,
        max_headers: int = 512,
        keepalive_timeout_s: float = 75.0,
        max_target_bytes: int | None = None,
        quick: QuickHandler | None = None,
        after_quick: Callable[[], None] | None = None,
    ) -> None:
        self.handler = handler
        self.quick = quick
        # Called once the quick answers of a loop iteration are written (the
        # quick handler's own bookkeeping goes there, behind the writes).
        self.after_quick = after_quick
        # Header section budget: names, values and 4 bytes of framing each.
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        # The request target may be longer than a header field (long query
        # strings); twice the header budget unless given.
        self.max_target_bytes = (
            2 * max_header_bytes if max_target_bytes is None else max_target_bytes
        )
        self.keepalive_timeout_s = keepalive_timeout_s
        # Written by the connections: handlers running now, open connections.
        self.in_flight = 0
        self.connections: set[Connection] = set()
        # Connections holding quick answers to send once this loop iteration's
        # callbacks have run (see Connection.cork).
        self._corked: list[Connection] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._sweep_timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return (
            f"<HTTPServer listeners={len(self._servers)}"
            f" connections={len(self.connections)} in_flight={self.in_flight}>"
        )

    def corked(self, conn: Connection) -> None:
        """``conn`` holds answers to send: send them later in this iteration."""
        if not self._corked:
            conn.loop.call_soon(self._uncork_all)
        self._corked.append(conn)

    def _uncork_all(self) -> None:
        corked, self._corked = self._corked, []
        for conn in corked:
            conn.uncork()
        if self.after_quick is not None:
            self.after_quick()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on ``host:port`` (0 picks a free port); returns the bound address."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: Connection(self), host, port, backlog=_BACKLOG, reuse_address=True
        )
        self._servers.append(server)
        if self._sweep_timer is None:
            self._schedule_sweep(loop)
        sockets = server.sockets
        if not sockets:
            raise OSError(f"listening on {host}:{port} produced no socket")
        bound = sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    def stop_accepting(self) -> None:
        """Close the listening sockets; open connections carry on."""
        for server in self._servers:
            server.close()

    def close_idle(self) -> None:
        """Close connections between requests; busy ones close after their answer."""
        for conn in list(self.connections):
            conn.close_idle()

    async def close(self) -> None:
        """Stop accepting, cancel unfinished handlers and close every connection."""
        self.stop_accepting()
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        tasks = [
            c.task for c in self.connections if c.task is not None and not c.task.done()
        ]
        for conn in list(self.connections):
            conn.close_now()
        if tasks:
            await asyncio.wait(tasks, timeout=_CLOSE_WAIT_S)
        # Whatever is still open (a client not reading its answer) is reset;
        # the transports report the loss on the next loop iterations.
        for conn in list(self.connections):
            conn.abort()
        for _ in range(_LOST_WAIT_ROUNDS):
            if not self.connections:
                break
            await asyncio.sleep(0)
        for server in self._servers:
            try:
                async with asyncio.timeout(_CLOSE_WAIT_S):
                    await server.wait_closed()
            except TimeoutError:
                pass
        self._servers = []

    # -- the idle sweep ------------------------------------------------------

    def _schedule_sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        interval = min(1.0, max(0.01, self.keepalive_timeout_s / 4))
        self._sweep_timer = loop.call_later(interval, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        limit = self.keepalive_timeout_s
        for conn in list(self.connections):
            since = conn.idle_since
            if since is not None and now - since >= limit:
                conn.close_idle()
        self._schedule_sweep(loop)
