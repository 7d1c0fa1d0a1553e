"""A lean HTTP/1.1 server for the data port, on asyncio (uvloop) and httptools.

Owns: accepting client connections, parsing requests with llhttp, running
the handler for each request in order, and writing its response. The
request and response classes carry the subset of aiohttp's server API the
proxy uses, under the same names and meanings, so moving a handler from
``aiohttp.web`` is an import change. Not here: what a request means
(proxy.py); the admin port, which stays on aiohttp (its cost does not
matter there).

Why not aiohttp's ``web.Server``: it spends most of a small request's time
in its own machinery. Answering a fixed 64-byte JSON body on one core at 64
connections (``python -m bench.bench_server``), this server handled about
twice aiohttp's requests per second (31k to 40k against 16k to 18k across
runs on a shared machine; nginx ``return 200``: 93k to 126k).

Modules: ``request`` (Request, Body), ``reader`` (parsing, head limits,
refusals), ``response`` (StreamResponse, Response, framing), ``connection``
(the queue, handlers, flow control, closing), ``server`` (listening, idle
sweep, shutdown).
"""

from sidecar.http.request import (
    Body,
    HttpVersion,
    HttpVersion10,
    HttpVersion11,
    Request,
)
from sidecar.http.response import Response, StreamResponse, http_date
from sidecar.http.server import Handler, HTTPServer

__all__ = [
    "Body",
    "HTTPServer",
    "Handler",
    "HttpVersion",
    "HttpVersion10",
    "HttpVersion11",
    "Request",
    "Response",
    "StreamResponse",
    "http_date",
]
