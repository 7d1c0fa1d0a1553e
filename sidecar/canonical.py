"""RFC 8785 (JSON Canonicalization Scheme) bytes and strict body parsing.

The action cache hashes the canonical form of every request body, so two
bodies that mean the same JSON must give the same bytes, byte for byte, and
bodies that mean different JSON must not.

``canonicalize(value)`` returns exactly what RFC 8785 prescribes (and what
the ``rfc8785`` package returns, which the tests check property by
property), about 30 times faster on chat bodies. The fast path walks the
value once in Python, touching containers and numbers but not string bytes:
it replaces each float by an ``orjson.Fragment`` holding its ES6
``Number.prototype.toString`` form (RFC 8785 section 3.2.2.3) and checks the
integers, then lets orjson write the document with sorted keys. That is
exact because orjson's string escaping is RFC 8785's (section 3.2.2.2: only
``"``, ``\\`` and controls escaped, ``\\b \\f \\n \\r \\t`` short, other
controls ``\\u00xx`` in lower-case hex, everything else literal UTF-8; the
tests compare every code point), and because orjson sorts keys by code point,
which equals RFC 8785's UTF-16 code unit order (section 3.2.3) unless a key
holds a character at or above U+E000. Values the fast path cannot vouch for
(such keys, tuples, subclasses of the JSON types) take an exact pure-Python
path instead.

``parse_body(raw)`` parses a request body for the cache. It refuses
duplicate object keys (``DuplicateKeyError``: JSON leaves their meaning
open, so caching such a body could serve one reading's answer to another)
and values that have no canonical form (``NotCanonicalError``: NaN and
Infinity literals, integers beyond 2**53 - 1 in magnitude, numbers that
overflow a double, lone surrogates, nesting deeper than ``MAX_DEPTH``).
Invalid JSON raises ``json.JSONDecodeError``. The fast path is orjson, which
silently keeps the last of duplicate keys; duplicates are detected by
counting: every ``:`` in the raw bytes is either a member separator or
inside a string, so when no ``\\u`` escape could hide one, the raw colon
count equals the parsed tree's members plus the colons in its strings
exactly when no member was dropped. A mismatch (or an orjson error) sends
the body to the strict path, ``json.loads`` with a pair hook.

Not here: which bodies are cacheable and how the action key combines the
canonical body with route, scope and environment (``keys.py``).

Invariants: a value ``parse_body`` returns always canonicalizes;
``canonicalize`` never returns bytes for a value RFC 8785 cannot express.
Both errors subclass ``ValueError`` (and ``SidecarError``).

Known limitations: JSON numbers are IEEE doubles under RFC 8785, so two
bodies whose numbers differ only beyond double precision (``0.1`` and
``0.10000000000000000001``) share a canonical form and an action key, as
they would for any upstream that parses numbers as doubles. Values nested
deeper than ``MAX_DEPTH`` levels are refused as not canonical (they are
forwarded, not cached), where the ``rfc8785`` package would accept them.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Final

import orjson

from sidecar.errors import SidecarError

# Below orjson's own nesting limit for dumps (254 levels), and shallow enough
# for the recursive exact path to stay far from Python's recursion limit.
MAX_DEPTH: Final = 200
_INT_LIMIT: Final = 2**53 - 1
# orjson parses integer literals beyond the 64-bit range as floats; any float
# this large may have been such a literal, so the strict path re-reads it.
_INT64_AS_FLOAT: Final = float(2**63)
_SORTED: Final = orjson.OPT_SORT_KEYS
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


class NotCanonicalError(SidecarError, ValueError):
    """A value with no RFC 8785 form; the body is forwarded, not cached."""


class DuplicateKeyError(SidecarError, ValueError):
    """A JSON object names the same key twice."""


class _NeedsExactPath(Exception):
    """Raised inside the fast walk; the caller retries on the exact path."""


# -- numbers -----------------------------------------------------------


def es6_number(value: float) -> str:
    """ECMAScript ``Number.prototype.toString`` of a finite double.

    ``repr`` gives the shortest round-tripping digits, which is the digit
    string ES6 asks for; only the placement of the decimal point and the
    switch to exponent form differ, and are redone here.
    """
    if not math.isfinite(value):
        raise NotCanonicalError(f"{value!r} has no JSON form")
    if value == 0:
        return "0"  # -0 included
    text = repr(value)
    if "e" not in text:
        # repr's fixed form covers 1e-4 <= |x| < 1e16, inside ES6's.
        return text[:-2] if text.endswith(".0") else text
    mantissa, _, exponent = text.partition("e")
    sign = ""
    if mantissa.startswith("-"):
        sign, mantissa = "-", mantissa[1:]
    digits = mantissa.replace(".", "")
    k = len(digits)
    n = int(exponent) + 1  # the value is 0.DIGITS * 10**n
    if k <= n <= 21:
        return sign + digits + "0" * (n - k)
    if 0 < n <= 21:
        return sign + digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return sign + "0." + "0" * -n + digits
    power = f"e+{n - 1}" if n > 0 else f"e-{1 - n}"
    if k == 1:
        return sign + digits + power
    return sign + digits[0] + "." + digits[1:] + power


def _check_int(value: int) -> None:
    if not -_INT_LIMIT <= value <= _INT_LIMIT:
        raise NotCanonicalError("integer beyond 2**53 - 1 in magnitude")


def _too_deep() -> NotCanonicalError:
    return NotCanonicalError(f"nested deeper than {MAX_DEPTH} levels")


# -- canonicalize: fast path -------------------------------------------


def canonicalize(value: Any) -> bytes:
    """The RFC 8785 canonical UTF-8 bytes of a JSON value.

    Raises NotCanonicalError for NaN, infinities, integers beyond 2**53 - 1
    in magnitude, lone surrogates, non-string keys, other types, and nesting
    deeper than MAX_DEPTH.
    """
    try:
        prepared = _prepare(value, 0)
    except _NeedsExactPath:
        return _exact(value)
    try:
        return orjson.dumps(prepared, option=_SORTED)
    except orjson.JSONEncodeError:
        # The walk checked every type and number; only strings holding lone
        # surrogates are left for orjson to refuse.
        raise NotCanonicalError("string holds a lone surrogate") from None


def _prepare(value: Any, depth: int) -> Any:
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is int:
        _check_int(value)
        return value
    if kind is float:
        return orjson.Fragment(es6_number(value))
    if kind is dict:
        return _prepare_dict(value, depth + 1)
    if kind is list:
        return _prepare_list(value, depth + 1)
    raise _NeedsExactPath


def _prepare_dict(obj: dict[Any, Any], depth: int) -> dict[Any, Any]:
    """The dict, or a copy with floats replaced, if the fast path is exact."""
    if depth > MAX_DEPTH:
        raise _too_deep()
    copy: dict[Any, Any] | None = None
    for key, item in obj.items():
        if type(key) is not str or (not key.isascii() and max(key) >= "\ue000"):
            raise _NeedsExactPath
        kind = type(item)
        if kind is str or kind is bool or item is None:
            continue
        if kind is int:
            _check_int(item)
            continue
        replaced = _prepare(item, depth)
        if replaced is not item:
            if copy is None:
                copy = dict(obj)
            copy[key] = replaced
    return obj if copy is None else copy


def _prepare_list(items: list[Any], depth: int) -> list[Any]:
    if depth > MAX_DEPTH:
        raise _too_deep()
    copy: list[Any] | None = None
    for index, item in enumerate(items):
        kind = type(item)
        if kind is str or kind is bool or item is None:
            continue
        if kind is int:
            _check_int(item)
            continue
        replaced = _prepare(item, depth)
        if replaced is not item:
            if copy is None:
                copy = list(items)
            copy[index] = replaced
    return items if copy is None else copy


# -- canonicalize: exact path ------------------------------------------


def _exact(value: Any) -> bytes:
    out: list[bytes] = []
    _write(value, out, 0)
    return b"".join(out)


def _write_string(text: str, out: list[bytes]) -> None:
    try:
        # str.__str__ strips a subclass (a str Enum member) to its text.
        out.append(orjson.dumps(str.__str__(text)))
    except orjson.JSONEncodeError:
        raise NotCanonicalError("string holds a lone surrogate") from None


def _utf16_order(item: tuple[str, Any]) -> bytes:
    try:
        return item[0].encode("utf-16-be")
    except UnicodeEncodeError:
        raise NotCanonicalError("object key holds a lone surrogate") from None


def _write(value: Any, out: list[bytes], depth: int) -> None:
    if value is None:
        out.append(b"null")
    elif isinstance(value, bool):
        out.append(b"true" if value else b"false")
    elif isinstance(value, int):
        number = int(value)
        _check_int(number)
        out.append(str(number).encode())
    elif isinstance(value, float):
        out.append(es6_number(float(value)).encode())
    elif isinstance(value, str):
        _write_string(value, out)
    elif isinstance(value, (list, tuple)):
        _write_array(value, out, depth + 1)
    elif isinstance(value, dict):
        _write_object(value, out, depth + 1)
    else:
        raise NotCanonicalError(f"{type(value).__name__} is not a JSON type")


def _write_array(items: list[Any] | tuple[Any, ...], out: list[bytes], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _too_deep()
    out.append(b"[")
    for index, item in enumerate(items):
        if index:
            out.append(b",")
        _write(item, out, depth)
    out.append(b"]")


def _write_object(obj: dict[Any, Any], out: list[bytes], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _too_deep()
    if not all(isinstance(key, str) for key in obj):
        raise NotCanonicalError("object keys must be strings")
    out.append(b"{")
    for index, (key, item) in enumerate(sorted(obj.items(), key=_utf16_order)):
        if index:
            out.append(b",")
        _write_string(key, out)
        out.append(b":")
        _write(item, out, depth)
    out.append(b"}")


# -- parse_body ----------------------------------------------------------


def parse_body(raw: bytes) -> Any:
    """Parse a JSON body for the cache; see the module docstring for errors."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _parse_strict(raw)
    census = _Census()
    try:
        census.visit(value, 0)
    except _NeedsExactPath:
        return _parse_strict(raw)
    colons = raw.count(b":")
    if b"\\u" in raw:
        # An escaped colon is a colon in the parsed string but not in the
        # raw bytes; counting every \u003a spelling keeps the sum exact
        # (a spelling that was really an escaped backslash only ever makes
        # the sums differ, which costs a strict parse, never a wrong answer).
        colons += raw.count(b"\\u003a") + raw.count(b"\\u003A")
    if census.members + census.colons != colons:
        return _parse_strict(raw)
    return value


class _Census:
    """Counts members and string colons of an orjson-parsed value.

    Also enforces what orjson does not: the integer range and the depth.
    Raises _NeedsExactPath for floats that may have been integer literals.
    """

    __slots__ = ("members", "colons")

    def __init__(self) -> None:
        self.members = 0
        self.colons = 0

    def visit(self, value: Any, depth: int) -> None:
        kind = type(value)
        if kind is str:
            self.colons += value.count(":")
        elif kind is int:
            _check_int(value)
        elif kind is float:
            if abs(value) >= _INT64_AS_FLOAT:
                raise _NeedsExactPath
        elif kind is dict:
            if depth >= MAX_DEPTH:
                raise _too_deep()
            self.members += len(value)
            for key, item in value.items():
                self.colons += key.count(":")
                self.visit(item, depth + 1)
        elif kind is list:
            if depth >= MAX_DEPTH:
                raise _too_deep()
            for item in value:
                self.visit(item, depth + 1)


def _parse_strict(raw: bytes) -> Any:
    """json.loads with duplicate, constant and integer checks."""
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        shown = bytes(raw).decode("utf-8", "replace")
        raise json.JSONDecodeError("body is not valid UTF-8", shown, exc.start) from None
    try:
        value = json.loads(
            text,
            object_pairs_hook=_unique_object,
            parse_constant=_refuse_constant,
            parse_int=_bounded_int,
            parse_float=_finite_float,
        )
    except RecursionError:
        raise _too_deep() from None
    _check_strings(value, 0)
    return value


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                shown = key if len(key) <= 40 else key[:40] + "..."
                raise DuplicateKeyError(f"duplicate key {shown!r} in a JSON object")
            seen.add(key)
    return obj


def _refuse_constant(name: str) -> Any:
    raise NotCanonicalError(f"{name} is not a JSON number")


def _bounded_int(text: str) -> int:
    # 2**53 - 1 has 16 digits; checking the length first keeps int() away
    # from digit strings long enough to be slow or refused.
    if len(text.lstrip("-")) > 16:
        raise NotCanonicalError("integer beyond 2**53 - 1 in magnitude")
    number = int(text)
    _check_int(number)
    return number


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise NotCanonicalError("number overflows a double")
    return number


def _check_strings(value: Any, depth: int) -> None:
    """Refuse lone surrogates (from escapes) and excessive nesting."""
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise NotCanonicalError("string holds a lone surrogate")
    elif isinstance(value, (dict, list)):
        if depth >= MAX_DEPTH:
            raise _too_deep()
        if isinstance(value, dict):
            for key in value:
                _check_strings(key, depth + 1)
            value = value.values()
        for item in value:
            _check_strings(item, depth + 1)
