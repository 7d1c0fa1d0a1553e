"""Action keys and the cacheability decisions behind them.

Owns: whether a request may be answered from or stored in the action cache
(pure functions of the route, the request and its parsed body), the reason
words clients and metrics see when it may not, and the action key itself.
Not here: parsing and canonical JSON (canonical.py), the caller's scope
(scope.py), the upstream's identity (environment.py), storage (cache/).

The action key is sha256 over, each part length-prefixed so no two inputs
can collide by concatenation:

    "sidecar-action/1", route name, route version, method, raw target,
    RFC 8785 canonical body (as it will be sent upstream), environment
    signature, significant headers (sorted "name: value"), scope

A request is deterministic, and so cacheable under ``when: deterministic``,
when the request itself guarantees one answer: greedy sampling (temperature
0, or top_k 1) and a single choice (n absent or 1) on generation routes;
always on embedding, tokenize, detokenize, models and props routes.
``when: always`` caches any successful answer; ``when: never`` nothing.

Known limitation: a sampler chain that is greedy for other reasons (for
example llama.cpp's ``samplers: ["top_k"]`` with ``top_k: 1`` spelled via
``dynatemp``) is only recognised through temperature and top_k; such
requests are forwarded uncached, which costs a repeat upstream call, never
a wrong answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

_KEY_DOMAIN: Final = b"sidecar-action/1"

# Route kinds whose answer depends on sampling; the rest are deterministic
# by nature.
GENERATION_KINDS: Final = frozenset({"chat", "completion", "infill"})
READ_KINDS: Final = frozenset({"models", "props"})
CACHEABLE_KINDS: Final = GENERATION_KINDS | READ_KINDS | {
    "embedding", "tokenize", "detokenize",
}


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether to use the cache for one request, and why not if not."""

    cacheable: bool
    reason: str | None = None
    refresh: bool = False


BYPASS_NEVER: Final = Decision(False, "route_not_cacheable")
BYPASS_METHOD: Final = Decision(False, "method_not_cacheable")
BYPASS_NO_STORE: Final = Decision(False, "no_store")
CACHEABLE: Final = Decision(True)
REFRESH: Final = Decision(True, "refresh", refresh=True)


def _cache_directives(values: Iterable[str]) -> set[str]:
    """Lower-cased Cache-Control directive names (RFC 9111 section 5.2)."""
    names: set[str] = set()
    for value in values:
        for part in value.split(","):
            name = part.split("=", 1)[0].strip().lower()
            if name:
                names.add(name)
    return names


def request_decision(when: str, kind: str, method: str, cache_control: Iterable[str]) -> Decision:
    """What the route and the request's headers allow, before the body is read."""
    if when == "never" or kind not in CACHEABLE_KINDS:
        return BYPASS_NEVER
    if kind in READ_KINDS:
        # HEAD is forwarded: a stored GET answer would give it a body length
        # the relay must not send, and storing HEAD answers saves nothing.
        if method != "GET":
            return BYPASS_METHOD
    elif method != "POST":
        return BYPASS_METHOD
    directives = _cache_directives(cache_control)
    if "no-store" in directives:
        return BYPASS_NO_STORE
    if "no-cache" in directives:
        return REFRESH
    return CACHEABLE


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def is_deterministic(kind: str, body: Any) -> bool:
    """True when the request's own fields guarantee a single answer."""
    if kind not in GENERATION_KINDS:
        return True
    if not isinstance(body, dict):
        return False
    n = body.get("n", 1)
    if _number(n) != 1.0:
        return False
    temperature = _number(body.get("temperature"))
    if temperature is not None and temperature <= 0.0:
        return True
    top_k = _number(body.get("top_k"))
    return top_k == 1.0


def body_decision(when: str, kind: str, body: Any) -> Decision:
    """What the parsed body allows (determinism), after ``request_decision``."""
    if when == "always" or is_deterministic(kind, body):
        return CACHEABLE
    return Decision(False, "not_deterministic")


def response_directives(headers: Iterable[tuple[str, str]]) -> set[str]:
    """The upstream response's Cache-Control directive names."""
    return _cache_directives(v for k, v in headers if k.lower() == "cache-control")


def action_key(
    *,
    route: str,
    version: int,
    method: str,
    target: str,
    canonical_body: bytes,
    environment: bytes,
    significant: Iterable[tuple[str, str]],
    scope: str,
) -> bytes:
    """The 32-byte action key of one request (see the module docstring)."""
    h = hashlib.sha256()

    def part(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)

    part(_KEY_DOMAIN)
    part(route.encode())
    part(str(version).encode())
    part(method.encode())
    part(target.encode("utf-8", "surrogateescape"))
    part(canonical_body)
    part(environment)
    for name, value in sorted(significant):
        part(f"{name}: {value}".encode("utf-8", "surrogateescape"))
    part(scope.encode())
    return h.digest()
