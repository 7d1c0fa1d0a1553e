"""Deltas: the RFC 6902 patch from one published document to the next, kept small.

``make_delta`` walks two JSON documents. Objects are compared member by
member here, and so are arrays of unchanged length (element by element);
arrays whose length changed go to ``jsonpatch.make_patch``, whose list diff
finds inserts and removals; a leaf or a type that changed becomes one
``replace``. Then, at every object or array that changed, it keeps whichever
is shorter as JSON: the operations below it, or one ``replace`` carrying its
new value. When most leaves of a subtree change in a window (a busy route's
counters all move together) the operations, with their long repeated paths,
outweigh the values and the single replace wins; when few change, the
operations win. The root is a candidate too (``replace`` at path ``""``), so
a delta is never much larger than a snapshot.
Not here: framing (sse.py), choosing when to publish (hub.py).

Invariants: the result is a valid RFC 6902 patch that turns ``before`` into
``after`` exactly, as ``jsonpatch.apply_patch`` applies it. Equality is JSON
equality: ``1``, ``1.0`` and ``true`` differ (as in ``jsonpatch``); member
order does not matter. Operations on different members of one object touch
disjoint subtrees, so their order between members is free; an array's
operations stay in ``make_patch``'s order, under the array's own path. Each
operation is serialised once; the event reuses those texts.

Known limitations: the choice is greedy per subtree by byte count and does
not consider compression on the wire (none is applied to event streams).
Values that moved between object members go out as a remove and an add, not
a ``move``.
"""

from __future__ import annotations

import dataclasses
import math
from json.encoder import encode_basestring_ascii
from typing import Any, Final

import jsonpatch

from sidecar.state.sse import dumps

# Below this many bytes of operations, looking for a shorter form costs more
# CPU than it could save.
SMALL_BYTES: Final = 96
# Deeper than this, a changed object is replaced whole: bounds the recursion.
MAX_DEPTH: Final = 32


@dataclasses.dataclass(frozen=True, slots=True)
class _Op:
    op: dict[str, Any]
    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class Delta:
    """One patch: its operations and each operation as compact JSON."""

    ops: list[dict[str, Any]]
    texts: list[str]

    def __bool__(self) -> bool:
        return bool(self.ops)

    def json(self) -> str:
        """The patch as a JSON array, built from the operations' texts."""
        return "[" + ",".join(self.texts) + "]"


def _escape(token: str) -> str:
    # RFC 6901 section 3: "~" first, so an escaped "/" is not escaped again.
    return "/" + token.replace("~", "~0").replace("/", "~1")


def _json_leaf(value: Any) -> str:
    """Compact JSON for a value, by hand for the common leaves (a hot path)."""
    kind = type(value)
    if kind is str:
        return encode_basestring_ascii(value)
    if kind is int:
        return int.__repr__(value)
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    return dumps(value)


def _op(kind: str, path: str, value: Any = None, *, has_value: bool = True) -> _Op:
    op: dict[str, Any] = {"op": kind, "path": path}
    text = '{"op":"' + kind + '","path":' + encode_basestring_ascii(path)
    if has_value:
        op["value"] = value
        text += ',"value":' + _json_leaf(value)
    return _Op(op, text + "}")


def _same_leaf(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False  # JSON types: 1, 1.0 and true all differ
    if isinstance(a, float):
        return bool(a.hex() == b.hex())  # 0.0 and -0.0 serialise differently
    return bool(a == b)


def _size(ops: list[_Op]) -> int:
    return sum(len(o.text) + 1 for o in ops)


def _shorter(path: str, ops: list[_Op], after: Any) -> list[_Op]:
    """``ops``, or one replace of the subtree at ``path`` if that is shorter."""
    if not ops or _size(ops) <= SMALL_BYTES:
        return ops
    replace = _op("replace", path, after)
    return [replace] if len(replace.text) + 1 < _size(ops) else ops


def _diff_objects(
    path: str, before: dict[str, Any], after: dict[str, Any], depth: int
) -> list[_Op]:
    ops = [
        _op("remove", path + _escape(key), has_value=False)
        for key in before
        if key not in after
    ]
    for key, value in after.items():
        if key not in before:
            ops.append(_op("add", path + _escape(key), value))
        else:
            ops.extend(_diff(path + _escape(key), before[key], value, depth + 1))
    return ops


def _diff_arrays(
    path: str, before: list[Any], after: list[Any], depth: int
) -> list[_Op]:
    if len(before) == len(after):
        # Same length (slots, fixed series): element i stays element i, and
        # diffing each element is exact and much cheaper than a list diff.
        ops = []
        for index, (old, new) in enumerate(zip(before, after, strict=True)):
            ops.extend(_diff(f"{path}/{index}", old, new, depth + 1))
        return ops
    ops = []
    for raw in jsonpatch.make_patch(before, after).patch:
        op = dict(raw, path=path + raw["path"])
        if "from" in raw:
            op["from"] = path + raw["from"]
        ops.append(_Op(op, dumps(op)))
    return ops


def _diff(path: str, before: Any, after: Any, depth: int) -> list[_Op]:
    if isinstance(before, dict) and isinstance(after, dict) and depth < MAX_DEPTH:
        ops = _diff_objects(path, before, after, depth)
    elif isinstance(before, list) and isinstance(after, list) and depth < MAX_DEPTH:
        ops = _diff_arrays(path, before, after, depth)
    elif isinstance(before, (dict, list)) and type(before) is type(after):
        # Past MAX_DEPTH: whole or nothing (== would call 1 and true equal).
        return [] if dumps(before) == dumps(after) else [_op("replace", path, after)]
    elif _same_leaf(before, after):
        return []
    else:
        return [_op("replace", path, after)]
    return _shorter(path, ops, after)


def make_delta(before: Any, after: Any) -> Delta:
    """The compact RFC 6902 patch from ``before`` to ``after`` (empty if equal)."""
    chosen = _diff("", before, after, 0)
    return Delta([o.op for o in chosen], [o.text for o in chosen])
