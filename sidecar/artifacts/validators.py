"""Conditional and range requests against an immutable representation: pure.

Owns the decision, from the request's method and header fields alone, of
what answer a digest-addressed file gets: the whole body, one byte range,
304 or 416. No I/O, so every rule is pinned by fast tests
(tests/artifacts/test_validators.py). Not here: headers of the answer and
sending it (serve.py).

Rules, in RFC 9110's order of evaluation (section 13.2.2):

- ``If-None-Match`` (13.1.2): ``*`` or a list of entity-tags, compared
  weakly, so ``W/"<sha256>"`` matches; several field lines form one list.
  A match is 304 for GET and HEAD. When the field is present,
  ``If-Modified-Since`` is ignored, matched or not.
- ``If-Modified-Since`` (13.1.3): one valid HTTP-date at or after
  Last-Modified is 304; an invalid date or several lines are ignored.
- ``Range`` (14.2), GET only: one field line with unit ``bytes`` and one
  spec, ``a-b``, ``a-`` or ``-n``, is a 206 for the clamped span, or 416
  when unsatisfiable (``a`` at or past the end, ``-0``, any range of an
  empty file). Several specs (overlapping or not), several lines, other
  units and invalid syntax (``5-2``, spaces inside a spec, non-ASCII digits)
  get the whole body: a server may ignore Range (14.2), and a many-part
  answer built from a hostile header is never produced.
- ``If-Range`` (13.1.5): the range is honoured only when the validator is
  the strong entity-tag exactly (a weak one never matches) or an HTTP-date
  equal to Last-Modified; otherwise the whole body.
- ``If-Match`` and ``If-Unmodified-Since`` are not evaluated.

Invariants: a ``Decision`` for a partial answer always satisfies
``0 <= start``, ``1 <= count`` and ``start + count <= size``. Numbers of any
length are accepted without ``int()`` on huge strings (Python refuses more
than 4300 digits): past 20 digits a position counts as beyond any file.

Known limitations: ``If-Match`` and ``If-Unmodified-Since`` are ignored, so
a client naming another representation's tag gets the file, not 412;
under a digest the file cannot change, so only a confused client sees it.
"""

from __future__ import annotations

import email.utils
import enum
import re
from dataclasses import dataclass
from datetime import UTC
from typing import Final

from multidict import MultiMapping

from sidecar.artifacts.digest import Digest

_SPEC_RE: Final = re.compile(r"([0-9]*)-([0-9]*)")
_ETAG_RE: Final = re.compile(r'(?:W/)?"([^"]*)"')
_MAX_DIGITS: Final = 20
_BEYOND_ANY_FILE: Final = 10**_MAX_DIGITS
_MAX_DATE_CHARS: Final = 64


class Outcome(enum.Enum):
    FULL = "full"
    PARTIAL = "partial"
    NOT_MODIFIED = "not_modified"
    UNSATISFIABLE = "range_not_satisfiable"


@dataclass(frozen=True, slots=True)
class Representation:
    """What the validators compare against: one file's digest, size and date."""

    digest: Digest
    size: int
    last_modified: int  # whole seconds since the epoch, as HTTP-dates carry


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    start: int = 0
    count: int = 0


def decide(method: str, headers: MultiMapping[str], rep: Representation) -> Decision:
    """The answer a GET or HEAD with these header fields gets."""
    if _not_modified(headers, rep):
        return Decision(Outcome.NOT_MODIFIED)
    ranges = headers.getall("Range", [])
    if method == "GET" and len(ranges) == 1 and _if_range_holds(headers, rep):
        span = parse_range(ranges[0], rep.size)
        if span is Outcome.UNSATISFIABLE:
            return Decision(Outcome.UNSATISFIABLE)
        if isinstance(span, tuple):
            return Decision(Outcome.PARTIAL, span[0], span[1])
    return Decision(Outcome.FULL, 0, rep.size)


def none_match(headers: MultiMapping[str], digest: Digest) -> bool:
    """``If-None-Match`` is present and matches ``digest`` (weak comparison)."""
    lines = headers.getall("If-None-Match", [])
    if not lines:
        return False
    value = ", ".join(lines)
    if value.strip() == "*":
        return True
    return any(m.group(1) == digest for m in _ETAG_RE.finditer(value))


def _not_modified(headers: MultiMapping[str], rep: Representation) -> bool:
    if "If-None-Match" in headers:
        return none_match(headers, rep.digest)
    dates = headers.getall("If-Modified-Since", [])
    if len(dates) != 1:
        return False
    since = parse_http_date(dates[0])
    return since is not None and rep.last_modified <= since


def _if_range_holds(headers: MultiMapping[str], rep: Representation) -> bool:
    values = headers.getall("If-Range", [])
    if not values:
        return True
    if len(values) > 1:
        return False
    value = values[0].strip()
    if value.startswith(('"', "W/")):
        return value == rep.digest.etag
    return parse_http_date(value) == rep.last_modified


def parse_range(value: str, size: int) -> tuple[int, int] | Outcome | None:
    """(start, count) of a single byte range, ``UNSATISFIABLE``, or None.

    None means "answer with the whole body": not a bytes range, invalid, or
    more than one range.
    """
    unit, sep, spec_set = value.partition("=")
    if not sep or unit.lower() != "bytes":
        return None
    specs = [s.strip(" \t") for s in spec_set.split(",")]
    specs = [s for s in specs if s]  # RFC 9110 5.6.1: empty list elements are ignored
    if len(specs) != 1:
        return None
    match = _SPEC_RE.fullmatch(specs[0])
    if match is None or match.group(0) == "-":
        return None
    first, last = match.groups()
    if not first:
        return _suffix(_number(last), size)
    start = _number(first)
    end = _number(last) if last else None
    if end is not None and end < start:
        return None
    if start >= size:
        return Outcome.UNSATISFIABLE
    end = size - 1 if end is None else min(end, size - 1)
    return start, end - start + 1


def _suffix(length: int, size: int) -> tuple[int, int] | Outcome:
    if length == 0 or size == 0:
        return Outcome.UNSATISFIABLE
    start = max(0, size - length)
    return start, size - start


def _number(digits: str) -> int:
    return int(digits) if len(digits) <= _MAX_DIGITS else _BEYOND_ANY_FILE


def parse_http_date(text: str) -> int | None:
    """An HTTP-date (RFC 9110 5.6.7, all three forms) as epoch seconds, or None."""
    if len(text) > _MAX_DATE_CHARS:
        return None
    try:
        when = email.utils.parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp())


def format_http_date(epoch_s: int) -> str:
    """``Sun, 06 Nov 1994 08:49:37 GMT`` (IMF-fixdate)."""
    return email.utils.formatdate(epoch_s, usegmt=True)
