"""Action keys and cacheability decisions (sidecar/keys.py).

Properties: any two spellings of the same JSON request (key order, white
space, number forms) give one action key; changing any field that changes
the answer gives another; scope, route, version and environment all count.
"""

from __future__ import annotations

import json
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import canonical, keys

OUTPUT_FIELDS = [
    "model", "messages", "max_tokens", "seed", "stop", "tools", "tool_choice",
    "response_format", "grammar", "json_schema", "top_p", "min_p",
    "presence_penalty", "frequency_penalty", "logit_bias", "n_predict",
    "stream", "logprobs", "cache_prompt", "chat_template_kwargs",
]

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**53) + 1, 2**53 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def key_of(doc: Any, *, scope: str = "s", env: bytes = b"e", route: str = "chat",
           version: int = 1) -> bytes:
    return keys.action_key(
        route=route, version=version, method="POST", target="/v1/chat/completions",
        canonical_body=canonical.canonicalize(doc), environment=env,
        significant=[], scope=scope,
    )


def respell(doc: Any, rng: random.Random) -> bytes:
    """The same JSON value written differently: shuffled keys, odd spacing."""

    def shuffle(value: Any) -> Any:
        if isinstance(value, dict):
            items = list(value.items())
            rng.shuffle(items)
            return {k: shuffle(v) for k, v in items}
        if isinstance(value, list):
            return [shuffle(v) for v in value]
        return value

    text = json.dumps(shuffle(doc), indent=rng.choice([None, 1, 4]), ensure_ascii=rng.random() < 0.5)
    return text.encode()


@settings(max_examples=300, deadline=None)
@given(doc=st.dictionaries(st.text(max_size=10), json_value, max_size=6), seed=st.integers())
def test_keys_respelled_body_same_key(doc: dict[str, Any], seed: int) -> None:
    """Re-spelling a body (key order, white space, escapes) keeps its action key."""
    again = canonical.parse_body(respell(doc, random.Random(seed)))
    assert key_of(again) == key_of(doc)


@settings(max_examples=300, deadline=None)
@given(
    base=st.dictionaries(st.sampled_from(OUTPUT_FIELDS), json_value, max_size=6),
    field=st.sampled_from(OUTPUT_FIELDS),
    new=json_value,
)
def test_keys_changed_output_field_new_key(base: dict[str, Any], field: str, new: Any) -> None:
    """Changing any output-affecting field to another value changes the key."""
    changed = {**base, field: new}
    if canonical.canonicalize(changed) == canonical.canonicalize(base):
        return  # the same value spelled the same way: nothing changed
    assert key_of(changed) != key_of(base)


def test_keys_integer_and_float_zero_equal() -> None:
    """0 and 0.0 are one number in JSON, so one key (RFC 8785 section 3.2.2.3)."""
    assert key_of({"temperature": 0}) == key_of({"temperature": 0.0})


def test_keys_scope_route_version_environment_count() -> None:
    """The same body under another scope, route, version or environment is another action."""
    doc = {"temperature": 0}
    base = key_of(doc)
    assert len({base, key_of(doc, scope="t"), key_of(doc, route="completion"),
                key_of(doc, version=2), key_of(doc, env=b"f")}) == 5


def test_keys_significant_headers_count() -> None:
    """A declared significant header's value is part of the key."""
    common = dict(route="r", version=1, method="POST", target="/", canonical_body=b"{}",
                  environment=b"e", scope="s")
    a = keys.action_key(**common, significant=[("x-lang", "en")])  # type: ignore[arg-type]
    b = keys.action_key(**common, significant=[("x-lang", "fr")])  # type: ignore[arg-type]
    assert a != b


def test_keys_deterministic_rules() -> None:
    """Greedy sampling with one choice is deterministic; anything else is not."""
    assert keys.is_deterministic("chat", {"temperature": 0})
    assert keys.is_deterministic("chat", {"temperature": 0.7, "top_k": 1})
    assert not keys.is_deterministic("chat", {})
    assert not keys.is_deterministic("chat", {"temperature": 0, "n": 2})
    assert not keys.is_deterministic("chat", {"temperature": True})
    assert not keys.is_deterministic("chat", [1, 2])
    assert keys.is_deterministic("embedding", {"input": "x"})


def test_keys_request_decisions() -> None:
    """Route policy, method and Cache-Control decide before the body is read."""
    assert keys.request_decision("never", "chat", "POST", []).reason == "route_not_cacheable"
    assert keys.request_decision("deterministic", "chat", "GET", []).reason == "method_not_cacheable"
    assert keys.request_decision("deterministic", "chat", "POST", ["no-store"]).reason == "no_store"
    assert keys.request_decision("deterministic", "chat", "POST", ["max-age=0, no-cache"]).refresh
    assert keys.request_decision("always", "models", "GET", []).cacheable
    assert keys.request_decision("always", "passthrough", "GET", []).reason == "route_not_cacheable"


def test_keys_head_on_read_routes_forwarded() -> None:
    """HEAD on a cached GET route is forwarded, never answered from a GET entry."""
    assert keys.request_decision("always", "models", "HEAD", []).reason == "method_not_cacheable"
