"""Header hygiene between client and upstream: hop-by-hop removal, forwarding.

Owns the rules for which header fields cross the proxy in each direction and
how the client's identity is passed on. Not here: cache-related headers
(``X-Sidecar-Cache``, ``Age``), which the cache stage adds.

Rules:
- Hop-by-hop fields (RFC 9110 section 7.6.1: Connection, Proxy-Connection,
  Keep-Alive, TE, Transfer-Encoding, Upgrade, plus every field the
  ``Connection`` header names) are connection-specific and never forwarded,
  in either direction. ``Proxy-Authenticate`` and ``Proxy-Authorization``
  are addressed to a proxy, and this one does not consume them, so they stop
  here too rather than leaking a proxy credential to the upstream.
- Framing (Content-Length, Transfer-Encoding) and Host are rewritten by the
  upstream client for the upstream connection; ``Expect`` is answered by the
  sidecar itself.
- ``X-Forwarded-For``/``-Proto``/``-Host`` and ``Forwarded`` from the client
  are dropped and rebuilt from the real peer (listen.forwarded chooses
  ``x-forwarded``, ``forwarded`` or ``none``): a client cannot spoof its
  address to the upstream. Chains of trusted proxies in front of the sidecar
  are not supported yet; behind a load balancer the upstream sees the
  balancer's address.
"""

from __future__ import annotations

from typing import Final

from multidict import CIMultiDict

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Rebuilt by the upstream client (Host, framing) or answered here (Expect).
_REQUEST_REWRITTEN: Final = frozenset({b"host", b"content-length", b"expect"})
_FORWARDING: Final = frozenset(
    {b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"}
)
_REQUEST_DROP: Final = HOP_BY_HOP | _REQUEST_REWRITTEN | _FORWARDING
# The response's Content-Length is re-set by the relay from what it writes.
_RESPONSE_DROP: Final = HOP_BY_HOP | {b"content-length"}


def _connection_tokens(headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...]) -> set[bytes]:
    """Field names listed in any ``Connection`` header, lower-cased."""
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return names


def request_headers(
    raw: tuple[tuple[bytes, bytes], ...],
    *,
    peer: str | None,
    host: str | None,
    mode: str,
) -> list[tuple[bytes, bytes]]:
    """The client's header fields as they should reach the upstream."""
    drop = _REQUEST_DROP
    if any(name.lower() == b"connection" for name, _ in raw):
        drop = drop | _connection_tokens(raw)
    out = [(name, value) for name, value in raw if name.lower() not in drop]
    if mode == "x-forwarded":
        if peer:
            out.append((b"X-Forwarded-For", peer.encode("latin-1")))
        out.append((b"X-Forwarded-Proto", b"http"))
        if host:
            out.append((b"X-Forwarded-Host", host.encode("latin-1", "replace")))
    elif mode == "forwarded":
        parts = []
        if peer:
            node = f'"[{peer}]"' if ":" in peer else peer
            parts.append(f"for={node}")
        parts.append("proto=http")
        if host:
            parts.append('host="' + host.replace("\\", "\\\\").replace('"', '\\"') + '"')
        out.append((b"Forwarded", ";".join(parts).encode("latin-1", "replace")))
    return out


def response_headers(raw: list[tuple[bytes, bytes]]) -> tuple[CIMultiDict[str], int]:
    """The upstream's header fields as the client should see them.

    Returns the headers and how many were dropped because their bytes are
    not valid UTF-8. The fields are kept as text end to end (the cache
    stores them, the read models and logs may show them), and text that is
    not UTF-8 could not be written back byte for byte.
    """
    drop = _RESPONSE_DROP
    if any(name.lower() == b"connection" for name, _ in raw):
        drop = drop | _connection_tokens(raw)
    out: CIMultiDict[str] = CIMultiDict()
    undecodable = 0
    for name, value in raw:
        if name.lower() in drop:
            continue
        try:
            out.add(name.decode("ascii"), value.decode("utf-8"))
        except UnicodeDecodeError:
            undecodable += 1
    return out, undecodable


def content_length(raw: list[tuple[bytes, bytes]]) -> int | None:
    """The upstream response's declared Content-Length, if any."""
    for name, value in raw:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
