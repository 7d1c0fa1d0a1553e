"""Deltas: exact RFC 6902 patches, never much longer than the new document."""

from __future__ import annotations

import json
from typing import Any

import hypothesis.strategies as st
import jsonpatch
from hypothesis import given, settings

from sidecar.state.delta import SMALL_BYTES, make_delta
from sidecar.state.sse import dumps
from tests.state.test_property import DOCS, VALUES, canonical

# A replace at the root costs this much more than the document itself.
ROOT_REPLACE_OVERHEAD = len('[{"op":"replace","path":"","value":}]')


@settings(max_examples=200, deadline=None)
@given(before=DOCS, after=DOCS)
def test_delta_applied_gives_after(
    before: dict[str, Any], after: dict[str, Any]
) -> None:
    """Applying the delta to the old document gives the new one exactly."""
    delta = make_delta(before, after)
    assert canonical(jsonpatch.apply_patch(before, delta.ops)) == canonical(after)


@settings(max_examples=100, deadline=None)
@given(before=DOCS, after=DOCS)
def test_delta_never_much_longer_than_document(
    before: dict[str, Any], after: dict[str, Any]
) -> None:
    """A delta costs at most a root replace (the document plus a few bytes),
    or SMALL_BYTES when it is too small to be worth shortening."""
    delta = make_delta(before, after)
    bound = max(len(dumps(after)) + ROOT_REPLACE_OVERHEAD, SMALL_BYTES + 1)
    assert len(delta.json()) <= bound


@settings(max_examples=100, deadline=None)
@given(doc=DOCS, key=st.sampled_from(["a", "b/c", "~x"]), value=VALUES)
def test_delta_json_is_the_operations(
    doc: dict[str, Any], key: str, value: Any
) -> None:
    """The serialised patch is exactly the list of operations."""
    after = dict(doc, **{key: value})
    delta = make_delta(doc, after)
    assert json.loads(delta.json()) == delta.ops


def test_delta_equal_documents_is_empty() -> None:
    """No change, no operations; an empty delta is false."""
    delta = make_delta({"a": [1, {"b": 2}]}, {"a": [1, {"b": 2}]})
    assert not delta and delta.json() == "[]"


def test_delta_sparse_change_keeps_fine_operations() -> None:
    """One counter out of many moved: one replace of that counter."""
    before = {"routes": {f"r{i}": {"hits": i, "misses": i} for i in range(20)}}
    after = json.loads(json.dumps(before))
    after["routes"]["r3"]["hits"] = 99
    assert make_delta(before, after).ops == [
        {"op": "replace", "path": "/routes/r3/hits", "value": 99}
    ]


def test_delta_dense_change_replaces_the_subtree() -> None:
    """Every counter of a route moved: one replace of the route is shorter."""
    fields = [f"counter_{i}" for i in range(12)]
    chat = dict.fromkeys(fields, 2)
    before = {"routes": {"chat": dict.fromkeys(fields, 1)}, "static": {"x": 1}}
    after = {"routes": {"chat": chat}, "static": {"x": 1}}
    assert make_delta(before, after).ops == [
        {"op": "replace", "path": "/routes/chat", "value": chat}
    ]


def test_delta_move_across_subtrees_is_exact() -> None:
    """A value that moved between members still arrives exactly."""
    big = {"payload": list(range(40))}
    before = {"a": {"x": big, "keep": 1}, "b": {"other": 2}}
    after = {"a": {"keep": 1}, "b": {"other": 2, "y": big}}
    delta = make_delta(before, after)
    assert jsonpatch.apply_patch(before, delta.ops) == after


def test_delta_type_change_is_a_change() -> None:
    """1, 1.0, true and -0.0 versus 0.0 are different JSON values."""
    for old, new in ((1, True), (1, 1.0), (0.0, -0.0), ([1], [True])):
        delta = make_delta({"a": old}, {"a": new})
        assert canonical(jsonpatch.apply_patch({"a": old}, delta.ops)) == canonical(
            {"a": new}
        )


def test_delta_member_order_is_not_a_change() -> None:
    """Objects are unordered: the same members in another order give no ops."""
    assert not make_delta(
        {"a": 1, "b": {"x": 1, "y": 2}}, {"b": {"y": 2, "x": 1}, "a": 1}
    )


def test_delta_escaped_keys_round_trip() -> None:
    """Keys with '/' and '~' are escaped in the pointers the delta builds."""
    fields = [f"f{i}" for i in range(12)]
    before = {"a/b": {"m~n": dict.fromkeys(fields, 0)}}
    after = {"a/b": {"m~n": dict.fromkeys(fields, 1)}}
    delta = make_delta(before, after)
    assert delta.ops[0]["path"] == "/a~1b/m~0n"
    assert jsonpatch.apply_patch(before, delta.ops) == after
