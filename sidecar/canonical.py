"""RFC 8785 (JSON Canonicalization Scheme) bytes, and strict body parsing.

The action cache hashes the canonical form of every request body, so bodies
that mean the same JSON must give the same bytes, byte for byte, and bodies
that mean different JSON must not.

``canonicalize(value)`` returns exactly what RFC 8785 prescribes (and what
the ``rfc8785`` package returns; the tests check it property by property),
an order of magnitude faster on chat bodies. Its fast path runs Python code
per nesting level rather than per value: ``_Shape`` surveys the value one
level at a time with ``gc.get_referents`` and C-level ``map``/``set``; only
the path down to each float is copied (for a chat body, the top object),
with the float replaced by an ``orjson.Fragment`` holding its ES6
``Number.prototype.toString`` form (section 3.2.2.3); then orjson writes the
document with sorted keys and the 53-bit integer limit. That output is exact because orjson's string escaping
is RFC 8785's (section 3.2.2.2: only ``"``, ``\\`` and controls escaped,
``\\b \\f \\n \\r \\t`` short, other controls as ``\\u00xx`` in lower-case hex,
everything else literal UTF-8; a test compares every code point), and
because orjson sorts keys by code point, which is RFC 8785's UTF-16 code unit
order (section 3.2.3) unless a key holds a character at or above U+E000.
Whatever the fast path cannot vouch for (such keys, tuples, subclasses of the
JSON types, values orjson refuses) goes to the exact pure-Python writer.

``parse_body(raw)`` parses a request body for the cache. It refuses
duplicate object keys (``DuplicateKeyError``: JSON leaves their meaning
open, so one reading's answer could be served to another) and values with no
canonical form (``NotCanonicalError``: NaN and Infinity literals, integers
beyond 2**53 - 1 in magnitude, numbers that overflow a double, lone
surrogates, nesting deeper than ``MAX_DEPTH``). Invalid JSON raises
``json.JSONDecodeError``. The fast path is orjson, which keeps the last of
duplicate keys silently, so duplicates are found by counting colons: every
``:`` in the raw bytes separates a member or sits inside a string, and
orjson's re-serialisation of the parsed value has one ``:`` per member plus
the colons of its strings. With no ``\\u003a`` escape in the body, the two
counts are equal exactly when no member was dropped (a dropped member takes
its separator, and any colons it held, out of the parsed value only). A
mismatch, an escaped colon, a float of 2**63 or more (maybe an integer
literal orjson widened) or an orjson error sends the body to the strict
path, ``json.loads`` with hooks, which names the problem.

Not here: which bodies are cacheable, and how the action key combines the
canonical body with route, scope and environment (``keys.py``).

Invariants: a value ``parse_body`` returns always canonicalizes;
``canonicalize`` never returns bytes for a value RFC 8785 cannot express.
Both errors subclass ``ValueError`` and ``SidecarError``.

Known limitations: RFC 8785 numbers are IEEE doubles, so bodies whose numbers
differ only beyond double precision (``0.1`` and ``0.10000000000000000001``)
share a canonical form and an action key, as they would for an upstream that
parses numbers as doubles. Values nested deeper than ``MAX_DEPTH`` levels are
refused as not canonical (forwarded, not cached), where the ``rfc8785``
package would accept them. On an interpreter whose ``gc.get_referents``
behaves otherwise (checked at import), both functions take their slow paths:
the exact writer, about as fast as the ``rfc8785`` package, and the strict
parser. Bodies with emoji or other characters at or above U+E000 pay a few
microseconds more, for checking that no key holds one.
"""

from __future__ import annotations

import gc
import json
import math
import re
from itertools import chain, compress
from typing import Any, Final

import orjson

from sidecar.errors import SidecarError

# Below orjson's own nesting limit for dumps (254 levels) and shallow enough
# for the recursive exact writer to stay far from Python's recursion limit.
MAX_DEPTH: Final = 200
_INT_LIMIT: Final = 2**53 - 1
# orjson parses integer literals beyond the 64-bit range as floats; a float
# this large may have been one, so the strict path reads the body again.
_INT64_AS_FLOAT: Final = float(2**63)
_SORTED_STRICT: Final = orjson.OPT_SORT_KEYS | orjson.OPT_STRICT_INTEGER
_SURROGATE: Final = re.compile("[\ud800-\udfff]")
_ESCAPED_COLON: Final = re.compile(rb"\\u003[aA]")


class NotCanonicalError(SidecarError, ValueError):
    """A value with no RFC 8785 form; the body is forwarded, not cached."""


class DuplicateKeyError(SidecarError, ValueError):
    """A JSON object names the same key twice."""


def _too_deep() -> NotCanonicalError:
    return NotCanonicalError(f"nested deeper than {MAX_DEPTH} levels")


def _check_int(value: int) -> None:
    if not -_INT_LIMIT <= value <= _INT_LIMIT:
        raise NotCanonicalError("integer beyond 2**53 - 1 in magnitude")


def es6_number(value: float) -> str:
    """ECMAScript ``Number.prototype.toString`` of a finite double.

    ``repr`` gives the shortest round-tripping digits, which are the digits
    ES6 asks for; only the decimal point's placement and the switch to
    exponent form differ, and are redone here.
    """
    if not math.isfinite(value):
        raise NotCanonicalError(f"{value!r} has no JSON form")
    if value == 0:
        return "0"  # -0 too
    text = repr(value)
    if "e" not in text:
        # repr's fixed form covers 1e-4 <= |x| < 1e16, inside ES6's.
        return text.removesuffix(".0")
    mantissa, _, exponent = text.partition("e")
    sign = ""
    if mantissa.startswith("-"):
        sign, mantissa = "-", mantissa[1:]
    digits = mantissa.replace(".", "")
    k = len(digits)
    n = int(exponent) + 1  # the value is 0.DIGITS times 10**n
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


# -- the fast paths' survey ------------------------------------------------


def _referents_complete() -> bool:
    """Whether ``gc.get_referents`` behaves as the survey needs.

    CPython's traversal visits a str-keyed dict's values and a list's
    items, atomic ones included, and atoms (not GC objects) have no
    referents; the language does not promise either, so the fast paths run
    only where this probe confirms both.
    """
    values: list[Any] = [1.5, "s", 7, None, True, [], {}]
    as_dict = {str(i): value for i, value in enumerate(values)}
    wanted = {id(value) for value in values}
    in_list = {id(x) for x in gc.get_referents(values)}
    in_dict = {id(x) for x in gc.get_referents(as_dict)}
    atoms_silent = gc.get_referents(*values[:5]) == []
    return in_list == wanted and wanted <= in_dict and atoms_silent


_FAST: Final = _referents_complete()
_JSON_TYPES: Final = frozenset({str, int, float, bool, type(None), dict, list})
# isinstance(x, dict) as a C callable; the survey has ruled out subclasses.
_is_dict = dict.__instancecheck__
_is_float = frozenset({float}).__contains__
_HIGH_LEADS: Final = tuple(bytes([lead]) for lead in range(0xEE, 0xF5))


class _Shape:
    """What a breadth-first survey of a dict or list found.

    ``levels`` holds the values of each nesting level (the top container,
    then its items, and so on; the containers among them are dicts or lists);
    ``float_level`` is the deepest level holding a float (0: none; the top
    container's items are level 1); ``max_float`` is the largest float
    magnitude, measured only when asked for; ``plain`` is False when a value
    is not of an exact JSON type (a tuple, a subclass, ...).
    """

    __slots__ = ("float_level", "levels", "max_float", "plain")

    def __init__(
        self, value: dict[Any, Any] | list[Any], *, measure_floats: bool
    ) -> None:
        self.levels: list[list[Any]] = []
        self.float_level = 0
        self.max_float = 0.0
        self.plain = True
        level: list[Any] = [value]
        # One round per nesting level, no Python bytecode per value:
        # get_referents lists the children of every container on the level
        # (atoms are not GC objects and contribute none), map/set sort them.
        while True:
            self.levels.append(level)
            children = gc.get_referents(*level)
            kinds = set(map(type, children))
            if not kinds <= _JSON_TYPES:
                self.plain = False
                return
            if float in kinds:
                self.float_level = len(self.levels)
                if measure_floats:
                    floats = compress(children, map(_is_float, map(type, children)))
                    self.max_float = max(self.max_float, max(map(abs, floats)))
            if dict not in kinds and list not in kinds:
                return
            if len(self.levels) >= MAX_DEPTH:
                raise _too_deep()
            level = children

    def has_key_above_e000(self) -> bool:
        """Whether some key holds a character at or above U+E000.

        Below U+E000 a character is one UTF-16 code unit of the same value,
        so code point order and RFC 8785's UTF-16 order agree.
        """
        dicts = filter(_is_dict, chain.from_iterable(self.levels))
        keys = "".join(chain.from_iterable(dicts))
        return not keys.isascii() and max(keys) >= "\ue000"


def _may_hold_e000_or_above(data: bytes) -> bool:
    """Whether UTF-8 ``data`` may hold a character at or above U+E000.

    Such characters, and only they, start with a byte from 0xEE to 0xF4;
    seven memchr scans are far cheaper than decoding.
    """
    return any(lead in data for lead in _HIGH_LEADS)


def _with_fragments(container: Any, level: int, deepest: int) -> Any:
    """The container with its floats replaced by ES6 fragments.

    Only the path to each float is copied; ``level`` is the level of the
    container's items, and containers below ``deepest`` are not visited.
    """
    is_dict = type(container) is dict
    slots: Any = container.items() if is_dict else enumerate(container)
    copy: Any = None
    for slot, item in slots:
        kind = type(item)
        if kind is float:
            replaced: Any = orjson.Fragment(es6_number(item))
        elif level < deepest and (kind is dict or kind is list):
            replaced = _with_fragments(item, level + 1, deepest)
            if replaced is item:
                continue
        else:
            continue
        if copy is None:
            copy = dict(container) if is_dict else list(container)
        copy[slot] = replaced
    return container if copy is None else copy


# -- canonicalize ------------------------------------------------------------


def canonicalize(value: Any) -> bytes:
    """The RFC 8785 canonical UTF-8 bytes of a JSON value.

    Raises NotCanonicalError for NaN, infinities, integers beyond 2**53 - 1
    in magnitude, lone surrogates, non-string keys, non-JSON types and
    nesting deeper than MAX_DEPTH.
    """
    kind = type(value)
    if kind is float:
        return es6_number(value).encode()
    if not _FAST or not (kind is dict or kind is list):
        return _exact(value)
    shape = _Shape(value, measure_floats=False)
    if not shape.plain:
        return _exact(value)
    prepared = value
    if shape.float_level:
        prepared = _with_fragments(value, 1, shape.float_level)
    try:
        out = orjson.dumps(prepared, option=_SORTED_STRICT)
    except orjson.JSONEncodeError:
        # A big integer, a lone surrogate or a non-string key: the exact
        # writer raises the precise error.
        return _exact(value)
    if (
        not out.isascii()
        and _may_hold_e000_or_above(out)
        and shape.has_key_above_e000()
    ):
        return _exact(value)
    return out


def _exact(value: Any) -> bytes:
    out: list[bytes] = []
    _write(value, out, 0)
    return b"".join(out)


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


def _write_string(text: str, out: list[bytes]) -> None:
    try:
        # str.__str__ reduces a subclass (a str Enum member) to its text.
        out.append(orjson.dumps(str.__str__(text)))
    except orjson.JSONEncodeError:
        raise NotCanonicalError("string holds a lone surrogate") from None


def _write_array(
    items: list[Any] | tuple[Any, ...], out: list[bytes], depth: int
) -> None:
    if depth > MAX_DEPTH:
        raise _too_deep()
    out.append(b"[")
    for index, item in enumerate(items):
        if index:
            out.append(b",")
        _write(item, out, depth)
    out.append(b"]")


def _utf16_order(item: tuple[str, Any]) -> bytes:
    try:
        return item[0].encode("utf-16-be")
    except UnicodeEncodeError:
        raise NotCanonicalError("object key holds a lone surrogate") from None


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


# -- parse_body --------------------------------------------------------------


def parse_body(raw: bytes) -> Any:
    """Parse a JSON body for the cache; see the module docstring for errors."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _parse_strict(raw)
    if not _FAST or not (type(value) is dict or type(value) is list):
        return _parse_strict(raw)
    if _Shape(value, measure_floats=True).max_float >= _INT64_AS_FLOAT:
        return _parse_strict(raw)
    try:
        echo = orjson.dumps(value, option=orjson.OPT_STRICT_INTEGER)
    except orjson.JSONEncodeError:
        raise NotCanonicalError("integer beyond 2**53 - 1 in magnitude") from None
    if _ESCAPED_COLON.search(raw) or _colons(echo) != _colons(raw):
        return _parse_strict(raw)
    return value


def _colons(data: bytes) -> int:
    # replace() finds colons with memchr and is about twice as fast as
    # count(), which steps byte by byte, when colons are sparse.
    return len(data) - len(data.replace(b":", b""))


def _parse_strict(raw: bytes) -> Any:
    """json.loads with duplicate-key, constant and number checks."""
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        shown = bytes(raw).decode("utf-8", "replace")
        raise json.JSONDecodeError(
            "body is not valid UTF-8", shown, exc.start
        ) from None
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
    # from digit strings long enough to be slow or refused outright.
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
    if type(value) is str:
        if _SURROGATE.search(value):
            raise NotCanonicalError("string holds a lone surrogate")
    elif type(value) is dict or type(value) is list:
        if depth >= MAX_DEPTH:
            raise _too_deep()
        if type(value) is dict:
            for key in value:
                _check_strings(key, depth)
            value = value.values()
        for item in value:
            _check_strings(item, depth + 1)
