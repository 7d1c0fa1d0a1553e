"""Durations and sizes as operators write them in the manifest.

Owns the two text forms and their inverse: ``parse_duration("250ms")`` gives
float seconds, ``parse_size("4MiB")`` gives int bytes, and ``format_duration``
and ``format_size`` print a value back in the shortest exact form. Not here:
which range a given manifest key accepts (``manifest.py`` checks ranges).

Forms accepted:

- durations: a number then one unit, ``us``, ``ms``, ``s``, ``m``, ``h`` or
  ``d`` (``250ms``, ``1.5s``, ``7d``). A bare number is refused because
  ``30`` is ambiguous between seconds and milliseconds.
- sizes: a whole number of bytes (``100``), or a number then one unit:
  ``B``, decimal ``KB``/``MB``/``GB``/``TB`` (powers of 1000), binary
  ``KiB``/``MiB``/``GiB``/``TiB`` (powers of 1024). ``1.5GiB`` is allowed
  when it comes to a whole number of bytes.

Invariants: units are case-sensitive (``MB`` and ``mb`` are not guessed at;
the error suggests the right spelling); arithmetic is exact (fractions), so
``parse_duration(format_duration(x)) == x`` for every value these parsers
return. Every ``ValueError`` message reads "what is wrong, what was expected"
and names the text it got, so the manifest can print it after a key path.

Known limitations: no compound forms (``1h30m``) and no exponents; write
``90m``. Numbers are capped at 32 characters, which is far beyond any range a
manifest key accepts.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from fractions import Fraction
from typing import Final

DURATION_UNITS: Final[dict[str, Fraction]] = {
    "us": Fraction(1, 1_000_000),
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
    "d": Fraction(86400),
}

SIZE_UNITS: Final[dict[str, int]] = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}

# Spellings people write for a duration unit, mapped to the one we accept,
# so the error can say what they meant instead of only what is allowed.
_DURATION_ALIASES: Final = {
    "sec": "s", "secs": "s", "second": "s", "seconds": "s",
    "min": "m", "mins": "m", "minute": "m", "minutes": "m",
    "hr": "h", "hrs": "h", "hour": "h", "hours": "h",
    "day": "d", "days": "d", "msec": "ms", "usec": "us", "µs": "us",
}  # fmt: skip

_MAX_NUMBER_CHARS: Final = 32
_NUMBER_UNIT: Final = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([A-Za-zµ]*)")

DURATION_EXAMPLE: Final = '"30s"'
SIZE_EXAMPLE: Final = '"4MiB"'


def quote(text: str, limit: int = 60) -> str:
    """``text`` in double quotes for an error message, clipped to ``limit``."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return json.dumps(text, ensure_ascii=False)


def _split(text: str, expected: str) -> tuple[Fraction, str]:
    """The number and the unit of ``text``; ValueError naming ``expected``."""
    match = _NUMBER_UNIT.fullmatch(text.strip())
    if match is None or len(match.group(1)) > _MAX_NUMBER_CHARS:
        raise ValueError(f"expected {expected}, got {quote(text)}")
    return Fraction(match.group(1)), match.group(2)


def _unknown_unit(unit: str, text: str, units: list[str], guess: str | None) -> str:
    hint = f'; did you mean "{guess}"?' if guess else ""
    return (
        f'unknown unit "{unit}" in {quote(text)}, expected one of '
        f"{', '.join(units)}{hint}"
    )


def parse_duration(text: str) -> float:
    """Seconds in ``text`` such as ``"250ms"``; ValueError if it is not one."""
    number, unit = _split(text, f"a duration such as {DURATION_EXAMPLE}")
    if not unit:
        raise ValueError(
            f"missing unit, expected a duration such as {DURATION_EXAMPLE} "
            f"(us, ms, s, m, h or d), got {quote(text)}"
        )
    factor = DURATION_UNITS.get(unit)
    if factor is None:
        guess = _DURATION_ALIASES.get(unit.lower())
        if guess is None and unit.lower() in DURATION_UNITS:
            guess = unit.lower()
        raise ValueError(_unknown_unit(unit, text, list(DURATION_UNITS), guess))
    return float(number * factor)


def parse_size(text: str) -> int:
    """Bytes in ``text`` such as ``"4MiB"`` or ``"100"``; ValueError if not."""
    number, unit = _split(text, f"a size such as {SIZE_EXAMPLE}")
    if not unit:
        unit = "B"
    factor = SIZE_UNITS.get(unit)
    if factor is None:
        folded = {name.lower(): name for name in SIZE_UNITS}
        guess = folded.get(unit.lower()) or folded.get(unit.lower() + "b")
        raise ValueError(_unknown_unit(unit, text, list(SIZE_UNITS), guess))
    size = number * factor
    if size.denominator != 1:
        raise ValueError(
            f"not a whole number of bytes, expected a size such as "
            f"{SIZE_EXAMPLE}, got {quote(text)}"
        )
    return int(size)


def format_duration(seconds: float) -> str:
    """The shortest text ``parse_duration`` turns back into ``seconds``."""
    if seconds == 0:
        return "0s"
    exact: list[str] = []
    # Largest unit first, so that on a tie in length the larger unit wins.
    for unit, factor in reversed(DURATION_UNITS.items()):
        count = seconds / float(factor)
        number = str(int(count)) if count.is_integer() else _plain(count)
        if _round_trips(number + unit, seconds):
            exact.append(number + unit)
    # At most three decimals reads well (1.5h, 0.25s); 2.0576m does not.
    readable = [text for text in exact if _decimals(text) <= 3] or exact
    # Shortest wins; between equals, a whole number (250ms rather than 0.25s).
    best = min(readable, key=lambda text: (len(text), "." in text), default=None)
    return best or _plain(seconds) + "s"


def _plain(number: float) -> str:
    """``number`` in positional notation (no exponent) that reads back exactly."""
    return format(Decimal(repr(number)), "f")


def _decimals(text: str) -> int:
    return len(text.rstrip("usmhd").partition(".")[2])


def _round_trips(text: str, seconds: float) -> bool:
    try:
        return parse_duration(text) == seconds
    except ValueError:
        return False


def format_size(size: int) -> str:
    """The shortest exact text for ``size`` bytes: ``4MiB``, ``1KB``, ``100B``."""
    best = f"{size}B"
    for unit, factor in SIZE_UNITS.items():
        if size % factor == 0 and size:
            text = f"{size // factor}{unit}"
            if len(text) < len(best):
                best = text
    return best
