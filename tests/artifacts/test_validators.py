"""The conditional and range rules of validators.py, without HTTP."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from sidecar.artifacts.digest import Digest
from sidecar.artifacts.validators import (
    Decision,
    Outcome,
    Representation,
    decide,
    format_http_date,
    parse_http_date,
)

DIGEST = Digest(hashlib.sha256(b"weights").hexdigest())
OTHER = Digest(hashlib.sha256(b"other").hexdigest())
LAST_MODIFIED = 1_700_000_000
REP = Representation(DIGEST, 1000, LAST_MODIFIED)


def _decide(
    *fields: tuple[str, str], method: str = "GET", rep: Representation = REP
) -> Decision:
    return decide(method, CIMultiDict(fields), rep)


def test_decide_no_conditions_full_body() -> None:
    """Without conditions or Range the whole representation is sent."""
    assert _decide() == Decision(Outcome.FULL, 0, 1000)


def test_decide_if_none_match_exact_not_modified() -> None:
    """If-None-Match naming the strong tag gives 304."""
    assert _decide(("If-None-Match", f'"{DIGEST}"')).outcome is Outcome.NOT_MODIFIED


def test_decide_if_none_match_weak_form_not_modified() -> None:
    """If-None-Match compares weakly, so W/"<sha256>" matches (RFC 9110 13.1.2)."""
    assert _decide(("If-None-Match", f'W/"{DIGEST}"')).outcome is Outcome.NOT_MODIFIED


def test_decide_if_none_match_list_not_modified() -> None:
    """A list of tags matches when any member does."""
    value = f'"{OTHER}", W/"x,y", "{DIGEST}"'
    assert _decide(("If-None-Match", value)).outcome is Outcome.NOT_MODIFIED


def test_decide_if_none_match_split_lines_not_modified() -> None:
    """Several If-None-Match lines form one list."""
    fields = (("If-None-Match", f'"{OTHER}"'), ("If-None-Match", f'"{DIGEST}"'))
    assert _decide(*fields).outcome is Outcome.NOT_MODIFIED


def test_decide_if_none_match_star_not_modified() -> None:
    """``*`` matches any current representation."""
    assert _decide(("If-None-Match", "*")).outcome is Outcome.NOT_MODIFIED


def test_decide_if_none_match_other_tag_full_body() -> None:
    """A tag of other bytes does not match."""
    assert _decide(("If-None-Match", f'"{OTHER}"')).outcome is Outcome.FULL


def test_decide_if_none_match_unquoted_digest_full_body() -> None:
    """An entity-tag must be quoted; a bare digest is not one."""
    assert _decide(("If-None-Match", str(DIGEST))).outcome is Outcome.FULL


def test_decide_if_none_match_present_ignores_if_modified_since() -> None:
    """If-None-Match takes precedence over If-Modified-Since (RFC 9110 13.1.3)."""
    fields = (
        ("If-None-Match", f'"{OTHER}"'),
        ("If-Modified-Since", format_http_date(LAST_MODIFIED + 10)),
    )
    assert _decide(*fields).outcome is Outcome.FULL


def test_decide_if_modified_since_later_not_modified() -> None:
    """A date at or after Last-Modified gives 304."""
    for when in (LAST_MODIFIED, LAST_MODIFIED + 3600):
        assert (
            _decide(("If-Modified-Since", format_http_date(when))).outcome
            is Outcome.NOT_MODIFIED
        )


def test_decide_if_modified_since_earlier_full_body() -> None:
    """A date before Last-Modified gives the body."""
    fields = ("If-Modified-Since", format_http_date(LAST_MODIFIED - 1))
    assert _decide(fields).outcome is Outcome.FULL


def test_decide_if_modified_since_invalid_ignored() -> None:
    """An invalid date is ignored."""
    assert _decide(("If-Modified-Since", "yesterday")).outcome is Outcome.FULL


def test_decide_not_modified_beats_range() -> None:
    """Conditionals are evaluated before Range: a match is 304 even with Range."""
    fields = (("If-None-Match", f'"{DIGEST}"'), ("Range", "bytes=0-9"))
    assert _decide(*fields).outcome is Outcome.NOT_MODIFIED


def test_decide_head_with_not_modified_condition_not_modified() -> None:
    """HEAD gets 304 like GET."""
    fields = ("If-None-Match", f'"{DIGEST}"')
    assert _decide(fields, method="HEAD").outcome is Outcome.NOT_MODIFIED


def test_decide_range_closed_partial() -> None:
    """``a-b`` is the bytes a through b inclusive."""
    assert _decide(("Range", "bytes=10-19")) == Decision(Outcome.PARTIAL, 10, 10)


def test_decide_range_open_partial() -> None:
    """``a-`` runs to the end."""
    assert _decide(("Range", "bytes=990-")) == Decision(Outcome.PARTIAL, 990, 10)


def test_decide_range_suffix_partial() -> None:
    """``-n`` is the last n bytes."""
    assert _decide(("Range", "bytes=-7")) == Decision(Outcome.PARTIAL, 993, 7)


def test_decide_range_end_past_size_clamped() -> None:
    """A last position past the end is clamped to the last byte."""
    assert _decide(("Range", "bytes=500-99999")) == Decision(Outcome.PARTIAL, 500, 500)


def test_decide_range_suffix_longer_than_file_whole_as_partial() -> None:
    """A suffix longer than the file is the whole file, as a 206."""
    assert _decide(("Range", "bytes=-5000")) == Decision(Outcome.PARTIAL, 0, 1000)


def test_decide_range_unit_case_insensitive_partial() -> None:
    """Range units compare case-insensitively (RFC 9110 14.1)."""
    assert _decide(("Range", "Bytes=0-0")) == Decision(Outcome.PARTIAL, 0, 1)


def test_decide_range_start_at_end_unsatisfiable() -> None:
    """A first position at or past the end is unsatisfiable."""
    for spec in ("bytes=1000-", "bytes=1000-2000", "bytes=5000-6000"):
        assert _decide(("Range", spec)).outcome is Outcome.UNSATISFIABLE


def test_decide_range_zero_suffix_unsatisfiable() -> None:
    """``-0`` asks for no bytes: unsatisfiable."""
    assert _decide(("Range", "bytes=-0")).outcome is Outcome.UNSATISFIABLE


def test_decide_range_of_empty_file_unsatisfiable() -> None:
    """Every range of an empty representation is unsatisfiable."""
    empty = Representation(DIGEST, 0, LAST_MODIFIED)
    for spec in ("bytes=0-", "bytes=-5", "bytes=0-0"):
        assert _decide(("Range", spec), rep=empty).outcome is Outcome.UNSATISFIABLE


def test_decide_range_huge_numbers_no_error() -> None:
    """Thousands of digits neither raise nor wrap around."""
    big = "9" * 5000
    assert _decide(("Range", f"bytes={big}-")).outcome is Outcome.UNSATISFIABLE
    assert _decide(("Range", f"bytes=0-{big}")) == Decision(Outcome.PARTIAL, 0, 1000)
    assert _decide(("Range", f"bytes=-{big}")) == Decision(Outcome.PARTIAL, 0, 1000)


def test_decide_many_ranges_full_body() -> None:
    """Several ranges, overlapping or not, get the whole body (never multipart)."""
    for spec in (
        "bytes=0-1,5-6",
        "bytes=0-500,100-600",
        "bytes=0-0,0-0,0-0",
        "bytes=-1,-1",
    ):
        assert _decide(("Range", spec)) == Decision(Outcome.FULL, 0, 1000)


def test_decide_many_unsatisfiable_ranges_full_body() -> None:
    """Several ranges are ignored even when none is satisfiable."""
    assert _decide(("Range", "bytes=5000-,6000-")).outcome is Outcome.FULL


def test_decide_two_range_lines_full_body() -> None:
    """Two Range field lines are ignored."""
    fields = (("Range", "bytes=0-1"), ("Range", "bytes=2-3"))
    assert _decide(*fields).outcome is Outcome.FULL


def test_decide_range_empty_list_elements_ignored() -> None:
    """Empty elements of the range list do not count (RFC 9110 5.6.1)."""
    assert _decide(("Range", "bytes=, 0-4 ,")) == Decision(Outcome.PARTIAL, 0, 5)


def test_decide_invalid_range_full_body() -> None:
    """Invalid syntax, other units and non-ASCII digits are ignored."""
    for spec in (
        "bytes=5-2",
        "bytes=a-b",
        "bytes=-",
        "bytes=1 - 2",
        "items=0-1",
        "bytes 0-1",
        "bytes=\u0661-\u0662",
        "bytes=0x10-",
        "bytes=+1-2",
        "",
    ):
        assert _decide(("Range", spec)).outcome is Outcome.FULL, spec


def test_decide_range_on_head_ignored() -> None:
    """Range is defined for GET only (RFC 9110 14.2); HEAD gets the 200 headers."""
    assert _decide(("Range", "bytes=0-9"), method="HEAD").outcome is Outcome.FULL


def test_decide_if_range_strong_match_partial() -> None:
    """If-Range with the current strong tag honours the range."""
    fields = (("Range", "bytes=0-9"), ("If-Range", f'"{DIGEST}"'))
    assert _decide(*fields) == Decision(Outcome.PARTIAL, 0, 10)


def test_decide_if_range_stale_tag_full_body() -> None:
    """If-Range with another tag gets the whole body."""
    fields = (("Range", "bytes=0-9"), ("If-Range", f'"{OTHER}"'))
    assert _decide(*fields).outcome is Outcome.FULL


def test_decide_if_range_weak_tag_full_body() -> None:
    """If-Range uses strong comparison: a weak tag never matches (RFC 9110 13.1.5)."""
    fields = (("Range", "bytes=0-9"), ("If-Range", f'W/"{DIGEST}"'))
    assert _decide(*fields).outcome is Outcome.FULL


def test_decide_if_range_equal_date_partial() -> None:
    """If-Range with exactly Last-Modified honours the range."""
    fields = (("Range", "bytes=0-9"), ("If-Range", format_http_date(LAST_MODIFIED)))
    assert _decide(*fields).outcome is Outcome.PARTIAL


def test_decide_if_range_other_date_full_body() -> None:
    """If-Range with any other date gets the whole body."""
    for when in (LAST_MODIFIED - 1, LAST_MODIFIED + 1):
        fields = (("Range", "bytes=0-9"), ("If-Range", format_http_date(when)))
        assert _decide(*fields).outcome is Outcome.FULL


def test_decide_if_range_garbage_full_body() -> None:
    """An If-Range that is neither a tag nor a date gets the whole body."""
    fields = (("Range", "bytes=0-9"), ("If-Range", "whenever"))
    assert _decide(*fields).outcome is Outcome.FULL


def test_parse_http_date_three_forms_equal() -> None:
    """IMF-fixdate, RFC 850 and asctime forms parse to the same instant."""
    forms = (
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994",
    )
    assert {parse_http_date(f) for f in forms} == {784111777}


@given(
    size=st.integers(0, 5000),
    spec=st.one_of(
        st.tuples(st.integers(0, 6000), st.none() | st.integers(0, 6000)),
        st.tuples(st.none(), st.integers(0, 6000)),
    ),
)
def test_decide_well_formed_single_range_matches_arithmetic(
    size: int, spec: tuple[int | None, int | None]
) -> None:
    """A single well-formed range is 206 for exactly the clamped span, or 416."""
    first, last = spec
    text = f"bytes={'' if first is None else first}-{'' if last is None else last}"
    got = _decide(("Range", text), rep=Representation(DIGEST, size, LAST_MODIFIED))
    if first is None:
        assert last is not None
        if last == 0 or size == 0:
            assert got.outcome is Outcome.UNSATISFIABLE
        else:
            n = min(last, size)
            assert got == Decision(Outcome.PARTIAL, size - n, n)
    elif last is not None and last < first:
        assert got.outcome is Outcome.FULL
    elif first >= size:
        assert got.outcome is Outcome.UNSATISFIABLE
    else:
        end = size - 1 if last is None else min(last, size - 1)
        assert got == Decision(Outcome.PARTIAL, first, end - first + 1)


@given(size=st.integers(0, 5000), text=st.text(max_size=60))
def test_decide_any_range_text_gives_valid_decision(size: int, text: str) -> None:
    """Any Range text yields a full body, 416, or a span inside the file."""
    got = _decide(("Range", text), rep=Representation(DIGEST, size, LAST_MODIFIED))
    if got.outcome is Outcome.PARTIAL:
        assert 0 <= got.start and got.count >= 1 and got.start + got.count <= size
    else:
        assert got.outcome in (Outcome.FULL, Outcome.UNSATISFIABLE)
