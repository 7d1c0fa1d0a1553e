"""One client connection of the data port: queue, answer, in order, close.

Owns: the queue of parsed requests, running one handler at a time,
cancelling it when the client goes away, the server's own error answers,
flow control in both directions and the decision to keep the connection or
close it. Not here: parsing and refusing requests (reader.py), request
fields (request.py), response framing (response.py), listening sockets and
the idle sweep (server.py).

Invariants:
- Handlers run one at a time, in arrival order; the next starts only after
  the previous handler returned and its response ended.
- Reading pauses while more than ``HIGH_WATER_BYTES`` of request body, or
  ``MAX_PIPELINED`` requests, wait for handlers, and resumes below
  ``LOW_WATER_BYTES``; so a connection holds a bounded amount of memory.
- A handler is cancelled when the client disconnects before its response
  ended (aiohttp's ``handler_cancellation``); once the response ended it is
  left to finish.
- A handler that raises gets a 500 (a ``ClientRequestError``: its own
  status and code) in the OpenAI error shape when nothing was sent yet, and
  the connection is cut otherwise; no traceback reaches the client.
- The connection closes after a response unless both sides keep it alive,
  the request body arrived whole before the response started, and the body
  was framed exactly. When unread client bytes may remain, it half-closes
  and discards input for ``LINGER_S`` first, so the client reads the answer
  instead of a reset.

The server's quick handler (server.py), when there is one, is tried for
each request at the head of the queue while no handler runs: from the read
callback itself, and by the worker before it takes the next request. A
request it answers never reaches the handler. Its answers are held back
(``cork``) until the loop iteration's read callbacks have run; every other
write, close or shutdown of the connection sends them first, and at most
``CORK_BYTES`` are held before the rest waits for the worker.

Known limitations: no timeout while a handler runs or a body uploads (a
live stream may last hours); a client that half-closes its side is taken as
gone, as aiohttp and nginx do; a request with ``Upgrade`` or ``CONNECT`` is
answered as a plain request, then the connection closes. The handlers of
one connection run in one task, one after another (a task per request
costs as much as the parsing), so a context variable a handler sets is
still set for the next request on that connection; aiohttp gives each
request a fresh context.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from typing import TYPE_CHECKING, Final

from sidecar import log
from sidecar.errors import ClientRequestError, ErrorCode
from sidecar.http.reader import Refusal, RequestReader
from sidecar.http.request import EMPTY_BODY, Request
from sidecar.http.response import Response, StreamResponse, error_message

if TYPE_CHECKING:
    from sidecar.http.server import HTTPServer, QuickHandler

# Request body buffered and not yet read, per connection: reading pauses
# above the first and resumes below the second.
HIGH_WATER_BYTES: Final = 256 * 1024
LOW_WATER_BYTES: Final = 64 * 1024
# Requests parsed ahead of their handler; pipelining clients rarely send
# more, and each holds its head in memory.
MAX_PIPELINED: Final = 8
# How long to read and drop input after the last answer on a connection that
# may have unread bytes, so closing does not reset the answer away.
LINGER_S: Final = 2.0
# Quick answers held back on one connection before the rest of its requests
# wait for the worker (which sends the held ones first).
CORK_BYTES: Final = 256 * 1024


class Connection(asyncio.Protocol):
    """One client connection. Event-loop thread only."""

    def __init__(self, server: HTTPServer) -> None:
        self._server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self._reader = RequestReader(self, server)
        # Parsed requests (or a final refusal) waiting for their turn.
        self._pending: collections.deque[Request | Refusal] = collections.deque()
        # The worker task that runs the handlers, one request after another,
        # and the future it waits on while the queue is empty.
        self.task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None
        # The request being answered; its response, once prepared, and
        # whether that ended (both set by the response).
        self._active: Request | None = None
        self.response: StreamResponse | None = None
        self.response_done = False
        # Flow control.
        self._buffered = 0
        self._reading_paused = False
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # Lifecycle. idle_since: loop time since no request is being answered
        # (read by the server's idle sweep); None while one is.
        self.idle_since: float | None = self.loop.time()
        self._no_more = False  # parse nothing more; later input is dropped
        self._dropped_input = False
        self._refused = False
        self.closing = False  # close after the response in progress (read by it)
        self._lingering = False
        self._linger_timer: asyncio.TimerHandle | None = None
        self.lost = False
        # Quick answers not yet written (see ``cork``), and their size; the
        # last request the quick handler passed on.
        self._corked: list[bytes] | None = None
        self._corked_bytes = 0
        self._declined: Request | None = None

    def __repr__(self) -> str:
        if self.lost:
            state = "lost"
        elif self._lingering:
            state = "lingering"
        else:
            state = "idle" if self._active is None else "active"
        return (
            f"<Connection {self.peer} {state} pending={len(self._pending)}"
            f" buffered={self._buffered}>"
        )

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; no isinstance.
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and peername:
            self.peer = str(peername[0])
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._corked = None
        self._server.connections.discard(self)
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        gone = ConnectionResetError("the client closed the connection")
        self._reader.fail_body(gone)
        self._pending.clear()
        self._stop_worker()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(gone)

    def eof_received(self) -> bool:
        # The client sends nothing more. Taken as gone (as aiohttp and nginx
        # do): the transport closes and a running handler is cancelled.
        return False

    def data_received(self, data: bytes) -> None:
        if self._no_more:
            self._dropped_input = True
            return
        self._reader.feed(data)
        if self._active is None and self._pending and not self.lost:
            if self._server.quick is not None:
                self._answer_quick()
                if not self._pending:
                    return
            # Get the worker going: wake it, or start it for the first request.
            wakeup = self._wakeup
            if wakeup is not None:
                if not wakeup.done():
                    wakeup.set_result(None)
            elif self.task is None:
                self.task = self.loop.create_task(self._work())

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- what the reader calls -----------------------------------------------

    def queue(self, item: Request | Refusal) -> None:
        """A parsed request (or the final refusal), to be answered in turn."""
        self._pending.append(item)
        if len(self._pending) >= MAX_PIPELINED:
            self._update_reading()

    def end_requests(self, *, refused: bool = False, dropped: bool = False) -> None:
        """No more requests on this connection; later input is dropped."""
        self._no_more = True
        self._refused = self._refused or refused
        self._dropped_input = self._dropped_input or dropped

    # -- running handlers ----------------------------------------------------

    def _stop_worker(self) -> None:
        """Cancel the worker unless its handler is only finishing up.

        A handler whose response has ended is left to return (it may still
        be recording what it sent); the worker then sees the connection is
        gone and stops.
        """
        task = self.task
        if task is not None and not task.done():
            if self._active is None or not self.response_done:
                task.cancel()

    async def _work(self) -> None:
        """Answer queued requests in order until the connection is done.

        One task for the connection, not one per request: creating a task
        costs about as much as parsing a request. Handlers therefore share
        the task's context variables. This loop is the path of every
        request, so it is written out rather than split into coroutines.
        """
        server = self._server
        pending = self._pending
        try:
            while True:
                if pending and server.quick is not None:
                    self._answer_quick()
                if not pending:
                    if not self._may_wait():
                        return
                    self._wakeup = self.loop.create_future()
                    try:
                        await self._wakeup
                    finally:
                        self._wakeup = None
                    continue
                request = self._take_next()
                if request is None:
                    return
                self._active = request
                self.response = None
                self.response_done = False
                server.in_flight += 1
                try:
                    response = await server.handler(request)
                    # Complete what the handler returned; a Response goes
                    # out whole without a coroutine.
                    if response is not self.response:
                        if type(response) is Response:
                            response.send(request)
                        else:
                            await self._send_other(request, response)
                    if not self.response_done:
                        await response.write_eof()
                    if self.write_paused:
                        await self.drain()
                except asyncio.CancelledError:
                    if not self.lost:
                        self.abort()  # cancelled by other than connection_lost
                    raise
                except Exception as exc:
                    self._handler_failed(request, exc)
                    return
                finally:
                    server.in_flight -= 1
                    self._active = None
                if not self._keep_after(request):
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A fault of the server itself (handler faults are answered).
            log.server.error("server.connection_failed", exc_info=exc)
            self.abort()

    def _answer_quick(self) -> None:
        """Answer queued requests with the server's quick handler, in order.

        Called only between handlers. Stops at the first request the quick
        handler passes on (or whose body is still arriving), which then
        goes to the worker, so answers keep the order of the requests; a
        request passed on once is not offered again. Not while the client
        is slow to read or a close is pending, nor for a request that asks
        to close: the handler then answers, framing and pacing the answer.
        """
        quick = self._server.quick
        assert quick is not None
        pending = self._pending
        while pending and self._can_cork():
            request = pending[0]
            if (
                type(request) is not Request
                or request is self._declined
                or not request.keep_alive
                or not request.content.complete
            ):
                return
            body = request.content.whole()
            if body is None or not self._try_quick(quick, request, body):
                return
            pending.popleft()
            if request.content is not EMPTY_BODY:
                request.content.discard()
            if self._reading_paused:
                self._update_reading()
            self.idle_since = self.loop.time()

    def quick_ready(self) -> bool:
        """Whether a request whose head just arrived could be answered quickly.

        For the reader, which then holds the request out of the queue while
        its body arrives (``answer_held``).
        """
        return (
            self._server.quick is not None
            and self._active is None
            and not self._pending
            and not self._no_more
            and self._can_cork()
        )

    def _can_cork(self) -> bool:
        """Whether another quick answer may be held: the client keeps up,
        no close is pending and fewer than ``CORK_BYTES`` are held."""
        return (
            not self.write_paused
            and not self.closing
            and self._corked_bytes < CORK_BYTES
        )

    def answer_held(self, request: Request, body: bytes) -> bool:
        """Answer a request the reader held back, if the quick handler can.

        True when answered (the request is never queued); False to queue it.
        """
        quick = self._server.quick
        if quick is None or not self._try_quick(quick, request, body):
            return False
        # Its body was never counted as buffered, so reading needs no update.
        self.idle_since = self.loop.time()
        return True

    def _try_quick(self, quick: QuickHandler, request: Request, body: bytes) -> bool:
        """Offer ``request`` to the quick handler; True once its answer is corked."""
        transport = self.transport
        if self.lost or transport is None or transport.is_closing():
            return False
        try:
            answer = quick(request, body)
        except Exception as exc:
            # A fault of the quick handler: the full handler still answers.
            log.server.error("server.quick_handler_failed", exc_info=exc)
            self._declined = request
            return False
        if answer is None:
            self._declined = request
            return False
        self.cork(answer)
        return True

    def cork(self, data: bytes) -> None:
        """Hold ``data`` back until the server sends what its connections hold.

        Held answers go out before anything else this connection writes
        (``uncork`` is called first by every write, close and shutdown), so
        the order of the bytes on the connection never changes.
        """
        if self._corked is None:
            self._corked = [data]
            self._server.corked(self)
        else:
            self._corked.append(data)
        self._corked_bytes += len(data)

    def uncork(self) -> None:
        """Write the held answers now."""
        corked = self._corked
        if corked is None:
            return
        self._corked = None
        self._corked_bytes = 0
        transport = self.transport
        if self.lost or transport is None or transport.is_closing():
            return
        transport.write(corked[0] if len(corked) == 1 else b"".join(corked))

    def _may_wait(self) -> bool:
        """Nothing queued: True to wait for a request, False (closing) if done."""
        if self.lost:
            return False
        if self._no_more or self.closing:
            self._shutdown()
            return False
        self.idle_since = self.loop.time()
        return True

    def _take_next(self) -> Request | None:
        """The next request to answer; None after answering a final refusal."""
        item = self._pending.popleft()
        if self._reading_paused:
            self._update_reading()
        if isinstance(item, Refusal):
            self._send_error(item.code, item.message, head_only=False)
            return None
        self.idle_since = None
        return item

    async def _send_other(self, request: Request, response: object) -> None:
        """Send what the handler returned when it is not a plain Response."""
        if self.response is not None:
            raise RuntimeError("the handler returned another response than it sent")
        if isinstance(response, Response):
            response.send(request)
        elif isinstance(response, StreamResponse):
            await response.prepare(request)
        else:
            raise TypeError(
                f"the handler returned {type(response).__name__}, not a response"
            )

    def _handler_failed(self, request: Request, exc: Exception) -> None:
        """Answer what a handler raised (see the module docstring)."""
        if isinstance(exc, ClientRequestError):
            self._fail(request, exc.code, exc.message)
            return
        if self.lost or self.transport is None or self.transport.is_closing():
            # The client went away mid-write: nothing left to answer.
            self.abort()
            return
        log.server.error(
            "server.handler_failed",
            exc_info=exc,
            extra={"method": request.method, "target": log.clip(request.raw_path)},
        )
        self._fail(
            request, ErrorCode.UPSTREAM_FAILED, "internal error in the sidecar", 500
        )

    def _keep_after(self, request: Request) -> bool:
        """Whether the connection carries another request; closes it if not.

        The response decided at ``prepare`` (both sides' keep-alive, a body
        that had fully arrived); a drain may have asked to close since.
        """
        response = self.response
        if self.lost:
            return False
        if response is None or not response.keep_after or self.closing:
            self._shutdown()
            return False
        if request.content is not EMPTY_BODY:
            request.content.discard()
        return True

    def _fail(
        self, request: Request, code: ErrorCode, message: str, status: int | None = None
    ) -> None:
        """Answer an error if nothing was sent yet, else cut the connection."""
        if self.response is not None:
            self.abort()
            return
        self._send_error(
            code, message, status=status, head_only=request.method == "HEAD"
        )

    def _send_error(
        self,
        code: ErrorCode,
        message: str,
        *,
        status: int | None = None,
        head_only: bool,
    ) -> None:
        if self._corked is not None:
            self.uncork()
        transport = self.transport
        if self.lost or transport is None or transport.is_closing():
            return
        transport.write(
            error_message(code, message, status=status, head_only=head_only)
        )
        self._shutdown()

    # -- what requests and responses call ------------------------------------

    @property
    def open_transport(self) -> asyncio.Transport | None:
        """The transport for direct use (sendfile, abort): held answers sent first."""
        if self._corked is not None:
            self.uncork()
        return None if self.lost else self.transport

    def check_open(self) -> None:
        transport = self.transport
        if self.lost or transport is None or transport.is_closing():
            raise ConnectionResetError("the client connection is closed")

    def write(self, data: bytes) -> None:
        if self._corked is not None:
            self.uncork()
        transport = self.transport
        if self.lost or transport is None or transport.is_closing():
            raise ConnectionResetError("the client connection is closed")
        transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's buffer is over its high-water mark."""
        if not self.write_paused:
            return
        self.check_open()
        waiter = self._drain_waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self._drain_waiter = None

    def body_buffered(self, delta: int) -> None:
        self._buffered += delta
        # Only a crossing of the marks can change whether reading pauses.
        if self._reading_paused or self._buffered > HIGH_WATER_BYTES:
            self._update_reading()

    def _update_reading(self) -> None:
        transport = self.transport
        if self._lingering or self.lost or transport is None or transport.is_closing():
            return
        if self._buffered > HIGH_WATER_BYTES or len(self._pending) >= MAX_PIPELINED:
            if not self._reading_paused:
                self._reading_paused = True
                transport.pause_reading()
        elif self._reading_paused and self._buffered < LOW_WATER_BYTES:
            self._reading_paused = False
            transport.resume_reading()

    # -- closing -------------------------------------------------------------

    def _shutdown(self) -> None:
        """Close once the answer is flushed, lingering if input may be unread."""
        self._no_more = True
        if self._corked is not None:
            self.uncork()
        transport = self.transport
        if self.lost or transport is None or transport.is_closing() or self._lingering:
            return
        unread = (
            self._refused
            or self._dropped_input
            or self._reader.mid_message
            or self._reading_paused
            or bool(self._pending)
        )
        if not unread or not transport.can_write_eof():
            transport.close()
            return
        self._lingering = True
        self._pending.clear()
        transport.write_eof()
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        self._linger_timer = self.loop.call_later(LINGER_S, transport.close)

    def close_idle(self) -> None:
        """Close now if between requests, else after the current response."""
        self.closing = True
        if self._active is None and not self._pending and self.transport is not None:
            if self._corked is not None:
                self.uncork()
            self.transport.close()

    def close_now(self) -> None:
        """Cancel an unfinished handler and close (the server is shutting down)."""
        self.closing = True
        self._no_more = True
        self._stop_worker()
        if self.transport is not None:
            if self._corked is not None:
                self.uncork()
            self.transport.close()

    def abort(self) -> None:
        self._no_more = True
        self._corked = None  # a reset loses unsent bytes anyway
        if self.transport is not None:
            self.transport.abort()
