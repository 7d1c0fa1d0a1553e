"""Errors the sidecar raises and the JSON error bodies clients see.

Exception tree::

    SidecarError
     +-- ManifestError        a manifest (file, override) that does not validate
     +-- ClientRequestError   the client's request is refused (4xx)
     +-- OverloadedError      shed: concurrency ceiling and queue full (503)
     +-- UpstreamError        the upstream failed to give a usable answer (5xx)
          +-- UpstreamConnectError   refused, unreachable, reset before a reply
          +-- UpstreamTimeoutError   connect, first byte or idle gap exceeded
          +-- UpstreamProtocolError  a reply that is not valid HTTP/1.1

Foreign errors (OSError, httptools, plyvel, zstd) are translated once, at the
module that talks to them, so handlers only ever see this tree. Every error a
client receives from the sidecar itself has the OpenAI shape
``{"error": {"message", "type", "code"}}`` and a status from ``ErrorCode``;
there is never a traceback in a body.
"""

from __future__ import annotations

import enum
import json
from typing import Final


class ErrorCode(enum.Enum):
    """Stable error codes, each mapped to the HTTP status clients see."""

    BAD_REQUEST = ("bad_request", 400, "invalid_request_error")
    AMBIGUOUS_FRAMING = ("ambiguous_framing", 400, "invalid_request_error")
    DUPLICATE_KEYS = ("duplicate_keys", 400, "invalid_request_error")
    UNAUTHORIZED = ("unauthorized", 401, "authentication_error")
    NOT_FOUND = ("not_found", 404, "invalid_request_error")
    PAYLOAD_TOO_LARGE = ("payload_too_large", 413, "invalid_request_error")
    RANGE_NOT_SATISFIABLE = ("range_not_satisfiable", 416, "invalid_request_error")
    HEADERS_TOO_LARGE = ("headers_too_large", 431, "invalid_request_error")
    UPSTREAM_FAILED = ("upstream_failed", 502, "upstream_error")
    OVERLOADED = ("overloaded", 503, "overloaded_error")
    DRAINING = ("draining", 503, "overloaded_error")
    UPSTREAM_TIMEOUT = ("upstream_timeout", 504, "upstream_error")

    def __init__(self, code: str, status: int, kind: str) -> None:
        self.code = code
        self.status = status
        self.kind = kind


JSON_CONTENT_TYPE: Final = "application/json"


def error_body(code: ErrorCode, message: str) -> bytes:
    """The OpenAI-shaped JSON body for an error the sidecar produces."""
    doc = {"error": {"message": message, "type": code.kind, "code": code.code}}
    return json.dumps(doc, separators=(",", ":")).encode()


class SidecarError(Exception):
    """Base of every error the sidecar raises on purpose."""


class ManifestError(SidecarError):
    """A manifest that does not validate; ``errors`` holds every message.

    Each message reads ``FILE:LINE: dotted.path: what is wrong, what was
    expected`` (overrides from the environment or flags name the variable or
    flag instead of FILE:LINE).
    """

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class ClientRequestError(SidecarError):
    """The client's request is refused with a 4xx and a clear message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class OverloadedError(SidecarError):
    """The request is shed (503 with ``Retry-After``) to protect the upstream."""

    def __init__(self, message: str, retry_after_s: float = 1.0,
                 code: ErrorCode = ErrorCode.OVERLOADED) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.code = code


class UpstreamError(SidecarError):
    """The upstream gave no usable answer; maps to 502 unless a subclass says."""

    code: ErrorCode = ErrorCode.UPSTREAM_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UpstreamConnectError(UpstreamError):
    """Connection refused, unreachable, or reset before a complete reply."""


class UpstreamTimeoutError(UpstreamError):
    """A connect, time-to-first-byte or idle-gap timeout expired."""

    code = ErrorCode.UPSTREAM_TIMEOUT


class UpstreamProtocolError(UpstreamError):
    """The upstream's bytes are not a valid HTTP/1.1 response."""
