"""RFC 8785 canonical bytes and strict body parsing (sidecar/canonical.py).

Rules: canonicalize() is byte-identical to the rfc8785 package on every JSON
value and refuses (NotCanonicalError) exactly what it refuses; the RFC's own
examples come out as printed there; parse_body() returns what json.loads
would, refuses duplicate keys however they are spelled or hidden, reports
values with no canonical form, and raises JSONDecodeError for invalid JSON.
"""

from __future__ import annotations

import enum
import json
import math
import random
import struct
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.canonical import (
    MAX_DEPTH,
    DuplicateKeyError,
    NotCanonicalError,
    canonicalize,
    es6_number,
    parse_body,
)
from sidecar.errors import SidecarError

SAFE_INT = 2**53 - 1

# Keys that exercise UTF-16 ordering: BMP characters above the surrogate
# range sort after non-BMP ones in UTF-16, before them in code point order.
tricky_key = st.text(alphabet="a\x7f\u00e9\ue000\uffff\U00010000\U0001f600", max_size=3)
json_key = st.one_of(st.text(max_size=12), tricky_key)
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-SAFE_INT, SAFE_INT),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(json_key, inner, max_size=5),
    ),
    max_leaves=25,
)
# Leaves that rfc8785 refuses, mixed in with valid ones.
bad_leaf = st.one_of(
    st.integers(min_value=SAFE_INT + 1),
    st.integers(max_value=-SAFE_INT - 1),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=2),
)
maybe_bad_value = st.recursive(
    st.one_of(json_leaf, bad_leaf),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(json_key, inner, max_size=4),
    ),
    max_leaves=12,
)


# -- canonicalize against the reference ------------------------------------


@settings(max_examples=400, deadline=None)
@given(json_value)
def test_canonicalize_matches_rfc8785_package(value: Any) -> None:
    """For every JSON value the bytes equal rfc8785.dumps."""
    assert canonicalize(value) == rfc8785.dumps(value)


@settings(max_examples=300, deadline=None)
@given(maybe_bad_value)
def test_canonicalize_refuses_what_rfc8785_refuses(value: Any) -> None:
    """Where rfc8785 raises, canonicalize raises NotCanonicalError; else equal."""
    try:
        expected = rfc8785.dumps(value)
    except ValueError:
        with pytest.raises(NotCanonicalError):
            canonicalize(value)
    else:
        assert canonicalize(value) == expected


@settings(max_examples=2000, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_canonicalize_float_matches_rfc8785_package(value: float) -> None:
    """Every finite double, subnormals and -0.0 included, alone and nested."""
    assert canonicalize(value) == rfc8785.dumps(value)
    assert canonicalize({"x": [value]}) == rfc8785.dumps({"x": [value]})


def test_canonicalize_random_bit_patterns_match_rfc8785() -> None:
    """20,000 doubles drawn uniformly over bit patterns format as rfc8785 does."""
    rng = random.Random(8785)
    values = [struct.unpack("<d", rng.randbytes(8))[0] for _ in range(20_000)]
    finite = [v for v in values if math.isfinite(v)]
    assert canonicalize(finite) == rfc8785.dumps(finite)


def test_canonicalize_every_code_point_escaped_as_rfc8785() -> None:
    """Every non-surrogate code point, as a string value, serialises identically."""
    points = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    chunks = ["".join(points[i : i + 4096]) for i in range(0, len(points), 4096)]
    assert canonicalize(chunks) == rfc8785.dumps(chunks)


def test_canonicalize_tuples_and_subclasses_as_rfc8785() -> None:
    """Tuples are arrays, and int/str enum members serialise as their values."""

    class Level(enum.IntEnum):
        HIGH = 3

    class Color(enum.StrEnum):
        RED = "red"

    value = {"t": (1, 2.5, "x"), "level": Level.HIGH, "color": Color.RED}
    assert canonicalize(value) == rfc8785.dumps(value)


# -- the RFC's examples ------------------------------------------------------

# RFC 8785 Appendix B: IEEE 754 bit patterns and their canonical text.
APPENDIX_B = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]


def double(bits: str) -> float:
    return float(struct.unpack(">d", bytes.fromhex(bits))[0])


@pytest.mark.parametrize("bits, text", APPENDIX_B)
def test_canonicalize_appendix_b_numbers(bits: str, text: str) -> None:
    """Each Appendix B double serialises to the text the RFC prints."""
    assert es6_number(double(bits)) == text
    assert canonicalize([double(bits)]) == f"[{text}]".encode()


@pytest.mark.parametrize("bits", ["7fffffffffffffff", "7ff0000000000000"])
def test_canonicalize_appendix_b_nan_and_infinity_refused(bits: str) -> None:
    """Appendix B's NaN and Infinity rows have no canonical form."""
    with pytest.raises(NotCanonicalError):
        canonicalize({"n": double(bits)})


def test_canonicalize_rfc_escaping_example() -> None:
    """The RFC's sample input (section 3.2.4) gives its printed output."""
    raw = (
        b'{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3,'
        b" 0.000000000000000000000000001],"
        b' "string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",'
        b' "literals": [null, true, false]}'
    )
    expected = (
        '{"literals":[null,true,false],'
        '"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    ).encode()
    assert canonicalize(parse_body(raw)) == expected


def test_canonicalize_rfc_sorting_example() -> None:
    """Keys sort by UTF-16 code units, as in the RFC's section 3.2.3 example."""
    value = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    order = list(json.loads(canonicalize(value)))
    assert order == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]


# -- canonicalize errors -----------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        2**53,
        {"a": [-(2**53)]},
        {"a": math.nan},
        [math.inf],
        {"a": "\ud800"},
        {"\udc00": 1},
        {1: "x"},
        {"a": {1, 2}},
        {"a": b"bytes"},
    ],
    ids=[
        "int",
        "nested-int",
        "nan",
        "inf",
        "surrogate",
        "surrogate-key",
        "int-key",
        "set",
        "bytes",
    ],
)
def test_canonicalize_unrepresentable_value_refused(value: Any) -> None:
    """Values RFC 8785 cannot express raise NotCanonicalError (a ValueError)."""
    with pytest.raises(NotCanonicalError) as caught:
        canonicalize(value)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, SidecarError)


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_canonicalize_depth_limit() -> None:
    """MAX_DEPTH levels of nesting canonicalise; one more is refused."""
    assert canonicalize(nested(MAX_DEPTH)) == b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
    with pytest.raises(NotCanonicalError, match="deeper"):
        canonicalize(nested(MAX_DEPTH + 1))
    with pytest.raises(NotCanonicalError, match="deeper"):
        canonicalize([*nested(MAX_DEPTH + 1), (1,)])  # the exact writer's path


# -- parse_body ----------------------------------------------------------------


def escape(ch: str) -> str:
    """``ch`` as \\uXXXX escapes of its UTF-16 code units."""
    data = ch.encode("utf-16-be")
    units = struct.unpack(f">{len(data) // 2}H", data)
    return "".join(f"\\u{unit:04x}" for unit in units)


def spell(value: Any, rng: random.Random, duplicate: bool = False) -> str:
    """JSON text for ``value`` in a random but equivalent spelling.

    Key order, white space and escapes vary; with ``duplicate``, one object
    member is written twice, the first time with a decoy value.
    """
    pending = [duplicate]

    def text(s: str) -> str:
        chars = [
            escape(ch) if ch in '"\\' or ord(ch) < 0x20 or rng.random() < 0.1 else ch
            for ch in s
        ]
        return '"' + "".join(chars) + '"'

    def go(v: Any) -> str:
        space = rng.choice(["", " ", "\n  "])
        if isinstance(v, dict):
            items = list(v.items())
            rng.shuffle(items)
            members = [f"{text(k)}{space}:{space}{go(item)}" for k, item in items]
            if pending[0] and members:
                pending[0] = False
                at = rng.randrange(len(members))
                members.insert(at, f"{text(items[at][0])}:{rng.random()!r}")
            return "{" + ("," + space).join(members) + "}"
        if isinstance(v, list):
            return "[" + ("," + space).join(go(item) for item in v) + "]"
        if isinstance(v, str):
            return text(v)
        return json.dumps(v)

    return go(value)


@settings(max_examples=300, deadline=None)
@given(json_value, st.integers(0, 2**32))
def test_parse_body_any_spelling_parses_to_value(value: Any, seed: int) -> None:
    """Any spelling of a JSON value parses back to it and canonicalises alike."""
    raw = spell(value, random.Random(seed)).encode()
    parsed = parse_body(raw)
    assert parsed == value
    assert canonicalize(parsed) == rfc8785.dumps(value)


def has_member(value: Any) -> bool:
    if isinstance(value, dict):
        return bool(value) or any(has_member(v) for v in value.values())
    return isinstance(value, list) and any(has_member(v) for v in value)


@settings(max_examples=300, deadline=None)
@given(json_value.filter(has_member), st.integers(0, 2**32))
def test_parse_body_duplicate_key_anywhere_refused(value: Any, seed: int) -> None:
    """A key written twice in any object, however escaped, is refused."""
    raw = spell(value, random.Random(seed), duplicate=True).encode()
    with pytest.raises(DuplicateKeyError):
        parse_body(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a":1,"a":2}',
        b'[{"x":{"b":1,"b":1}}]',
        b'{"a":1,"\\u0061":2}',
        # A duplicate whose lost colon is made up for by an escaped one.
        b'{"a":1,"a":2,"c":"\\u003a"}',
        b'{"k\\u003A":1,"k:":2}',
    ],
    ids=["plain", "nested", "escaped-key", "escaped-colon-cover", "escaped-colon-key"],
)
def test_parse_body_duplicate_examples_refused(raw: bytes) -> None:
    """Duplicates are caught at any depth and behind any escape."""
    with pytest.raises(DuplicateKeyError):
        parse_body(raw)


def test_parse_body_escaped_colons_without_duplicates_accepted() -> None:
    """Escaped colons alone are not mistaken for duplicates."""
    assert parse_body(b'{"a\\u003a":"\\u003A:","b":[":"]}') == {"a:": "::", "b": [":"]}


@pytest.mark.parametrize(
    "raw",
    [
        b"NaN",
        b'{"t":Infinity}',
        b"[-Infinity]",
        b'{"n":9007199254740992}',
        b"[-9007199254740992]",
        b'{"n":123456789012345678901234567890}',
        b'{"n":-18446744073709551617}',
        b'{"n":1e400}',
        b'{"s":"\\ud800"}',
        b'{"\\udc00x":1}',
        b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1),
        b"[" * 5000 + b"]" * 5000,
    ],
    ids=[
        "nan", "infinity", "minus-infinity", "int-2-53", "int-minus-2-53",
        "int-huge", "int-below-int64", "overflow", "lone-surrogate",
        "lone-surrogate-key", "too-deep", "far-too-deep",
    ],
)  # fmt: skip
def test_parse_body_not_canonical_values_reported(raw: bytes) -> None:
    """Values with no RFC 8785 form raise NotCanonicalError."""
    with pytest.raises(NotCanonicalError):
        parse_body(raw)


def test_parse_body_largest_safe_integers_accepted() -> None:
    """Plus and minus 2**53 - 1 are the largest integers accepted."""
    assert parse_body(b"[9007199254740991,-9007199254740991]") == [SAFE_INT, -SAFE_INT]


def test_parse_body_large_float_literal_accepted() -> None:
    """A large number written as a float is a float, not an oversized integer."""
    assert parse_body(b'{"x":1e20,"y":-1.5e300}') == {"x": 1e20, "y": -1.5e300}


def test_parse_body_depth_limit_accepted_at_max() -> None:
    """MAX_DEPTH levels of nesting parse."""
    raw = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
    assert parse_body(raw) == nested(MAX_DEPTH)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"[1,]",
        b'{"a" 1}',
        b"\xff",
        b'"\xed\xa0\x80"',
        b"\xef\xbb\xbf{}",
        b"{} x",
    ],
    ids=[
        "empty",
        "truncated",
        "trailing-comma",
        "no-colon",
        "bad-utf8",
        "raw-surrogate",
        "bom",
        "trailing",
    ],
)
def test_parse_body_invalid_json_raises_decode_error(raw: bytes) -> None:
    """Invalid JSON raises json.JSONDecodeError, not the canonical errors."""
    with pytest.raises(json.JSONDecodeError):
        parse_body(raw)


def test_parse_body_scalar_documents_parse() -> None:
    """A body that is a bare scalar parses like any JSON text."""
    assert [parse_body(b) for b in (b"1", b'"x"', b"null", b"2.5")] == [
        1,
        "x",
        None,
        2.5,
    ]


def test_errors_are_value_errors() -> None:
    """Both refusals are ValueErrors, so callers may catch them together."""
    assert issubclass(DuplicateKeyError, ValueError)
    assert issubclass(NotCanonicalError, ValueError)
