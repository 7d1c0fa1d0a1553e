"""A corpus of (document, patch) pairs for checking an RFC 6902 applier.

Generated pairs: random documents, each patch made by ``jsonpatch.make_patch``
between two of them. Written cases: every operation, the ``-`` index, the
``~0``/``~1`` escapes, the empty key, the root, and the failures (missing
members, indexes out of range or with leading zeros, bad escapes, moves into
a child, failed tests). ``expected`` gives what python-json-patch does with
each pair: the result, or None for an error.
"""

from __future__ import annotations

import json
import random
from typing import Any

import jsonpatch
import jsonpointer

KEYS = ["a", "b", "c", "a/b", "m~n", "~1", "~0/", "", "0", "1", "-", "__proto__", "é"]


def _value(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randrange(-5, 50)
    if kind == 3:
        return rng.randrange(-50, 50) + 0.5
    if kind == 4:
        return rng.choice(["x", "y", "", "a/b", "~", "ü"])
    if kind in (5, 6):
        return {
            rng.choice(KEYS): _value(rng, depth + 1) for _ in range(rng.randrange(5))
        }
    return [_value(rng, depth + 1) for _ in range(rng.randrange(6))]


def _doc(rng: random.Random) -> dict[str, Any]:
    return {rng.choice(KEYS): _value(rng, 1) for _ in range(rng.randrange(1, 6))}


def _mutate(rng: random.Random, doc: Any) -> Any:
    """A near neighbour of ``doc``, so patches are small as in real streams."""
    out = json.loads(json.dumps(doc))
    for _ in range(rng.randrange(1, 4)):
        if isinstance(out, dict) and out and rng.random() < 0.5:
            key = rng.choice(sorted(out))
            child = out[key]
            if isinstance(child, list) and child and rng.random() < 0.5:
                index = rng.randrange(len(child))
                choice = rng.randrange(3)
                if choice == 0:
                    child.insert(index, _value(rng, 2))
                elif choice == 1:
                    del child[index]
                else:
                    child[index] = _value(rng, 2)
            elif rng.random() < 0.3:
                del out[key]
            else:
                out[key] = _value(rng, 1)
        elif isinstance(out, dict):
            out[rng.choice(KEYS)] = _value(rng, 1)
    return out


def generated(count: int, seed: int = 6902) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        before = _doc(rng)
        after = _mutate(rng, before) if i % 2 else _doc(rng)
        patch = jsonpatch.make_patch(before, after).patch
        cases.append({"doc": before, "patch": patch})
    return cases


def _case(doc: Any, *ops: dict[str, Any]) -> dict[str, Any]:
    return {"doc": doc, "patch": list(ops)}


WRITTEN = [
    _case({"a": 1}, {"op": "add", "path": "/b", "value": [1, {"c": 2}]}),
    _case({"a": [1, 2]}, {"op": "add", "path": "/a/1", "value": "x"}),
    _case({"a": [1, 2]}, {"op": "add", "path": "/a/-", "value": 3}),
    _case({"a": [1, 2]}, {"op": "add", "path": "/a/2", "value": 3}),
    _case({"a": [1, 2]}, {"op": "add", "path": "/a/3", "value": 3}),
    _case({"a": [1, 2]}, {"op": "add", "path": "/a/01", "value": 3}),
    _case({"a": [1, 2]}, {"op": "add", "path": "/a/-1", "value": 3}),
    _case({"a": {}}, {"op": "add", "path": "/a/b/c", "value": 3}),
    _case({"a": 1}, {"op": "add", "path": "", "value": [1]}),
    _case({"a": 1}, {"op": "add", "path": "/a", "value": 2}),
    _case({"a": 1, "b": 2}, {"op": "remove", "path": "/a"}),
    _case({"a": [1, 2, 3]}, {"op": "remove", "path": "/a/1"}),
    _case({"a": [1, 2, 3]}, {"op": "remove", "path": "/a/3"}),
    _case({"a": [1, 2, 3]}, {"op": "remove", "path": "/a/-"}),
    _case({"a": 1}, {"op": "remove", "path": "/b"}),
    _case({"a": 1}, {"op": "replace", "path": "/a", "value": {"n": None}}),
    _case({"a": 1}, {"op": "replace", "path": "/b", "value": 2}),
    _case({"a": [1]}, {"op": "replace", "path": "/a/-", "value": 2}),
    _case({"a": [1]}, {"op": "replace", "path": "/a/0", "value": 2}),
    _case({"a": 1}, {"op": "replace", "path": "", "value": {"z": 0}}),
    _case({"a": {"b": 1}, "c": {}}, {"op": "move", "from": "/a/b", "path": "/c/d"}),
    _case({"a": [1, 2, 3]}, {"op": "move", "from": "/a/0", "path": "/a/2"}),
    _case({"a": {"b": {}}}, {"op": "move", "from": "/a", "path": "/a/b/c"}),
    _case({"a": 1}, {"op": "move", "from": "/a", "path": "/a"}),
    _case({"a": 1}, {"op": "move", "from": "/x", "path": "/y"}),
    _case(
        {"a": {"b": [1]}},
        {"op": "copy", "from": "/a", "path": "/c"},
        {"op": "add", "path": "/c/b/-", "value": 2},
    ),
    _case({"a": 1}, {"op": "copy", "from": "/missing", "path": "/c"}),
    _case(
        {"a": "x", "n": 2, "o": {"p": [1, "q"]}},
        {"op": "test", "path": "/a", "value": "x"},
        {"op": "test", "path": "/n", "value": 2},
        {"op": "test", "path": "/o", "value": {"p": [1, "q"]}},
    ),
    _case({"a": 1}, {"op": "test", "path": "/a", "value": 2}),
    _case({"a": [1, 2]}, {"op": "test", "path": "/a", "value": [2, 1]}),
    _case(
        {"a": {"x": 1, "y": 2}}, {"op": "test", "path": "/a", "value": {"y": 2, "x": 1}}
    ),
    _case({"a": 1}, {"op": "test", "path": "", "value": {"a": 1}}),
    _case({"a/b": 1}, {"op": "replace", "path": "/a~1b", "value": 2}),
    _case({"m~n": 1}, {"op": "replace", "path": "/m~0n", "value": 2}),
    _case({"~1": 1}, {"op": "replace", "path": "/~01", "value": 2}),
    _case({"": 1}, {"op": "replace", "path": "/", "value": 2}),
    _case({"a": 1}, {"op": "add", "path": "/a~2b", "value": 2}),
    _case({"a": 1}, {"op": "add", "path": "a", "value": 2}),
    _case({"0": "x"}, {"op": "replace", "path": "/0", "value": "y"}),
    _case({"a": "s"}, {"op": "add", "path": "/a/b", "value": 1}),
    _case({"a": 1}, {"op": "add", "path": "/__proto__", "value": {"polluted": True}}),
    _case({"a": 1}, {"op": "frobnicate", "path": "/a"}),
    _case(
        {"a": 1},
        {"op": "add", "path": "/b", "value": 2},
        {"op": "test", "path": "/a", "value": 9},
    ),
]


def expected(case: dict[str, Any]) -> Any:
    """python-json-patch's result for the case, or None when it refuses."""
    try:
        return jsonpatch.apply_patch(case["doc"], case["patch"])
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException):
        return None
    except (KeyError, IndexError, TypeError, ValueError):
        return None
