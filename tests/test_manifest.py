"""The policy manifest: units, every error message, overrides, routing, CLI.

Error messages are asserted word for word, line numbers included: they are
the operator's interface, and a reworded message is a visible change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from sidecar import manifest as manifest_module
from sidecar.errors import ManifestError
from sidecar.manifest import (
    DEFAULT_POLICY_PATH,
    OTHER,
    CacheWhen,
    Manifest,
    PromptCacheMode,
    Route,
    Router,
    UpstreamKind,
    check_policy,
    load_manifest,
    resolve_policy_path,
)
from sidecar.units import (
    DURATION_UNITS,
    SIZE_UNITS,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / DEFAULT_POLICY_PATH
TOKEN = "t" * 16


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> str:
    """Write a dedented policy file and return its path as a string."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def only_error(path: str, **kwargs: object) -> str:
    """The single error a load raises; fails the test otherwise."""
    errors = errors_of(path, **kwargs)
    assert len(errors) == 1, errors
    return errors[0]


def errors_of(path: str, **kwargs: object) -> list[str]:
    """The errors a load raises; fails the test if the load succeeds."""
    kwargs.setdefault("env", {})
    with pytest.raises(ManifestError) as caught:
        load_manifest(path, **kwargs)  # type: ignore[arg-type]
    return caught.value.errors


# --- units ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("2s", 2.0), ("15m", 900.0), ("1h", 3600.0),
     ("7d", 604800.0), ("1.5s", 1.5), ("500us", 0.0005), ("0s", 0.0)],
)  # fmt: skip
def test_parse_duration_each_unit_gives_seconds(text: str, seconds: float) -> None:
    """Every duration unit converts to float seconds."""
    assert parse_duration(text) == seconds


def test_parse_duration_bare_number_names_the_units() -> None:
    """A bare number is refused, and the message says which units exist."""
    with pytest.raises(ValueError) as caught:
        parse_duration("30")
    assert str(caught.value) == (
        'missing unit, expected a duration such as "30s" (us, ms, s, m, h or d), '
        'got "30"'
    )


def test_parse_duration_spelled_out_unit_suggests_the_short_one() -> None:
    """``10sec`` is refused with a suggestion of ``s``."""
    with pytest.raises(ValueError) as caught:
        parse_duration("10sec")
    assert str(caught.value) == (
        'unknown unit "sec" in "10sec", expected one of us, ms, s, m, h, d; '
        'did you mean "s"?'
    )


def test_parse_duration_garbage_is_refused() -> None:
    """Text that is no duration at all gets the plain expectation."""
    with pytest.raises(ValueError) as caught:
        parse_duration("forever")
    assert str(caught.value) == 'expected a duration such as "30s", got "forever"'


@pytest.mark.parametrize(
    ("text", "size"),
    [("4MiB", 4 * 2**20), ("2GiB", 2 * 2**30), ("512KiB", 512 * 1024),
     ("100B", 100), ("1KB", 1000), ("3MB", 3_000_000), ("100", 100),
     ("1.5GiB", 3 * 2**29)],
)  # fmt: skip
def test_parse_size_each_unit_gives_bytes(text: str, size: int) -> None:
    """Decimal and binary units, and bare integers, convert to int bytes."""
    assert parse_size(text) == size


def test_parse_size_wrong_case_suggests_the_unit() -> None:
    """Units are case-sensitive; ``4mb`` suggests ``MB``."""
    with pytest.raises(ValueError) as caught:
        parse_size("4mb")
    assert str(caught.value) == (
        'unknown unit "mb" in "4mb", expected one of B, KB, MB, GB, TB, KiB, '
        'MiB, GiB, TiB; did you mean "MB"?'
    )


def test_parse_size_fraction_of_a_byte_is_refused() -> None:
    """A size must come to a whole number of bytes."""
    with pytest.raises(ValueError) as caught:
        parse_size("1.5B")
    assert str(caught.value) == (
        'not a whole number of bytes, expected a size such as "4MiB", got "1.5B"'
    )


@given(st.integers(0, 10**9), st.sampled_from(sorted(DURATION_UNITS)))
def test_parse_duration_integer_forms_are_exact(count: int, unit: str) -> None:
    """``N<unit>`` is N times the unit, correctly rounded to a float."""
    assert parse_duration(f"{count}{unit}") == float(count * DURATION_UNITS[unit])


@given(
    st.integers(0, 10**6), st.integers(0, 999), st.sampled_from(list(DURATION_UNITS))
)
def test_format_duration_round_trips(whole: int, millis: int, unit: str) -> None:
    """Whatever parse_duration returns, format_duration prints back exactly."""
    seconds = parse_duration(f"{whole}.{millis:03d}{unit}")
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(0, 2**50), st.sampled_from(sorted(SIZE_UNITS)))
def test_parse_size_integer_forms_are_exact(count: int, unit: str) -> None:
    """``N<unit>`` is exactly N times the unit's bytes."""
    assert parse_size(f"{count}{unit}") == count * SIZE_UNITS[unit]


@given(st.integers(0, 2**60))
def test_format_size_round_trips(size: int) -> None:
    """format_size prints any byte count in a form parse_size reads back."""
    assert parse_size(format_size(size)) == size


def test_format_size_prefers_the_shortest_form() -> None:
    """Printed sizes use the unit that gives the shortest exact text."""
    assert [format_size(n) for n in (0, 100, 1000, 1024, 4 * 2**20)] == [
        "0B", "100B", "1KB", "1KiB", "4MiB",
    ]  # fmt: skip


def test_format_duration_prefers_whole_numbers() -> None:
    """Printed durations pick the shortest form, whole numbers on a tie."""
    assert [format_duration(s) for s in (0.25, 1.5, 3600.0, 0.0)] == [
        "250ms", "1.5s", "1h", "0s",
    ]  # fmt: skip


# --- defaults and the shipped file ------------------------------------------------


def test_load_manifest_none_equals_the_shipped_file() -> None:
    """The built-in defaults and policies/default.yaml are the same policy."""
    defaults = load_manifest(None, env={})
    shipped = load_manifest(SHIPPED, env={})
    assert defaults == shipped
    provenance = {"source": "", "digest": ""}
    assert defaults.as_dict() | provenance == shipped.as_dict() | provenance


def test_load_manifest_empty_file_is_valid(tmp_path: Path) -> None:
    """An empty file (or only comments) is the default policy."""
    path = write(tmp_path, "# nothing here\n")
    assert load_manifest(path, env={}) == Manifest()


def test_load_manifest_defaults_source_and_digest() -> None:
    """Without a file the source is "<defaults>" and the digest hashes b""."""
    loaded = load_manifest(None, env={})
    assert loaded.source == "<defaults>"
    assert loaded.digest == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    assert loaded.overrides == ()


def test_load_manifest_digest_is_sha256_of_the_file(tmp_path: Path) -> None:
    """The digest of a file without overrides is the sha256 of its bytes."""
    path = write(tmp_path, "upstream:\n  kind: vllm\n")
    expected = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert load_manifest(path, env={}).digest == expected


def test_shipped_file_lists_every_key() -> None:
    """policies/default.yaml holds every key of the schema, routes included."""

    def keys(doc: object, prefix: str = "") -> set[str]:
        if isinstance(doc, dict):
            found = set()
            for key, value in doc.items():
                found |= {f"{prefix}{key}"} | keys(value, f"{prefix}{key}.")
            return found
        if isinstance(doc, list):
            return set().union(*(keys(item, prefix + "[].") for item in doc))
        return set()

    schema = Manifest().as_dict()
    del schema["source"], schema["digest"], schema["overrides"]
    shipped = yaml.safe_load(SHIPPED.read_text())
    assert keys(shipped) == keys(schema)


def test_shipped_file_comments_every_key() -> None:
    """Every key of a section has a comment right above it (routes excepted)."""
    lines = SHIPPED.read_text().splitlines()
    section = ""
    undocumented = []
    for number, line in enumerate(lines):
        if line and not line.startswith((" ", "#")):
            section = line.rstrip(":")
        key_line = line.startswith("  ") and line[2:3] not in (" ", "#")
        commented = lines[number - 1].lstrip().startswith("#")
        if section != "routes" and key_line and not commented:
            undocumented.append(f"{section}.{line.strip()}")
    assert undocumented == []


def test_default_routes_have_the_documented_policies() -> None:
    """The default routes, their kinds, cache modes and coalescing."""
    routes = {route.name: route for route in Manifest().routes}
    assert list(routes) == [
        "chat", "completion", "infill", "embedding", "tokenize", "detokenize",
        "models", "props",
    ]  # fmt: skip
    assert routes["chat"].paths == ("/v1/chat/completions", "/chat/completions")
    assert routes["chat"].cache.when is CacheWhen.DETERMINISTIC
    assert routes["embedding"].cache.when is CacheWhen.ALWAYS
    assert (routes["models"].cache.ttl, routes["models"].coalesce) == (30.0, True)
    assert routes["props"].methods == ("GET",)
    assert routes["props"].cache.when is CacheWhen.NEVER


# --- the model ----------------------------------------------------------------------


def test_manifest_is_frozen() -> None:
    """Assigning to a loaded manifest or a section raises."""
    loaded = load_manifest(None, env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.source = "elsewhere"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.upstream.url = "http://x:1"  # type: ignore[misc]


def test_manifest_units_and_lists_are_typed(tmp_path: Path) -> None:
    """Durations are float seconds, sizes int bytes, lists tuples, enums enums."""
    path = write(
        tmp_path,
        """\
        upstream: {idle_timeout: 90s, kind: vllm}
        cache: {max_entry_bytes: 2MiB}
        artifacts: {dirs: [/models]}
        """,
    )
    loaded = load_manifest(path, env={})
    assert loaded.upstream.idle_timeout == 90.0
    assert loaded.upstream.kind is UpstreamKind.VLLM
    assert loaded.cache.max_entry_bytes == 2 * 2**20
    assert loaded.artifacts.dirs == ("/models",)


def test_manifest_off_is_an_enum_value_not_a_boolean(tmp_path: Path) -> None:
    """``mode: off`` reads as the value "off", not YAML 1.1's false."""
    path = write(tmp_path, "prompt_cache:\n  mode: off\n")
    assert load_manifest(path, env={}).prompt_cache.mode is PromptCacheMode.OFF


def test_manifest_null_section_means_defaults(tmp_path: Path) -> None:
    """A section left empty (``cache:``) takes its defaults."""
    path = write(tmp_path, "cache:\nlimits:\n")
    assert load_manifest(path, env={}) == Manifest()


def test_manifest_merge_keys_apply_and_explicit_keys_win(tmp_path: Path) -> None:
    """``<<: *anchor`` merges a mapping; keys written beside it take precedence."""
    path = write(
        tmp_path,
        """\
        routes:
          - &base {name: a, paths: [/a], cache: {when: always, ttl: 5m}}
          - <<: *base
            name: b
            paths: [/b]
        """,
    )
    routes = load_manifest(path, env={}).routes
    assert [(r.name, r.paths, r.cache.ttl) for r in routes] == [
        ("a", ("/a",), 300.0),
        ("b", ("/b",), 300.0),
    ]


def test_upstream_urls_are_replicas_when_listed(tmp_path: Path) -> None:
    """``upstream_urls`` is the replica list if any, else the single url."""
    path = write(tmp_path, "upstream:\n  replicas: [http://a:1, http://b:2/]\n")
    assert load_manifest(path, env={}).upstream_urls == ("http://a:1", "http://b:2")
    assert Manifest().upstream_urls == ("http://127.0.0.1:8080",)


def test_as_dict_redacts_secrets(tmp_path: Path) -> None:
    """admin.token and scopes.secret show "<set>", or "" when unset."""
    path = write(tmp_path, f"admin:\n  token: {TOKEN}\n")
    doc = load_manifest(path, env={}).as_dict()
    assert doc["admin"]["token"] == "<set>"
    assert doc["scopes"]["secret"] == ""
    assert TOKEN not in json.dumps(doc)


def test_as_dict_is_json_ready() -> None:
    """as_dict holds only JSON types: lists, strings, numbers, booleans."""
    doc = Manifest().as_dict()
    assert json.loads(json.dumps(doc)) == doc
    assert doc["routes"][0]["paths"] == ["/v1/chat/completions", "/chat/completions"]
    assert doc["state"]["coalesce"] == 0.25
    assert doc["upstream"]["kind"] == "llama.cpp"


# --- every error class, word for word ----------------------------------------------


def test_error_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    """An unknown key lists the valid ones and suggests the nearest."""
    path = write(
        tmp_path,
        """\
        upstream:
          url: http://127.0.0.1:8080
        listen:
          data: 127.0.0.1:8090

        cache:
          memroy: {max_entries: 10}
        """,
    )
    assert only_error(path) == (
        f"{path}:7: cache.memroy: unknown key, expected one of compression, disk, "
        'flash, max_entry_bytes, memory, shared; did you mean "memory"?'
    )


def test_error_unknown_key_without_a_close_match(tmp_path: Path) -> None:
    """With no near key, the message lists the valid keys only."""
    path = write(tmp_path, "fallbacks:\n  zzz: 1\n")
    assert only_error(path) == (
        f"{path}:2: fallbacks.zzz: unknown key, expected one of disk, reopen_interval"
    )


def test_error_unknown_section(tmp_path: Path) -> None:
    """An unknown top-level key is an error with a suggestion."""
    path = write(tmp_path, "limit:\n  max_body_bytes: 1MiB\n")
    assert only_error(path) == (
        f"{path}:1: limit: unknown key, expected one of admin, artifacts, cache, "
        "coalescing, fallbacks, limits, listen, negative, prompt_cache, routes, "
        'scopes, semantic, state, upstream; did you mean "limits"?'
    )


def test_error_wrong_type_duration(tmp_path: Path) -> None:
    """A duration that is not one quotes what it got."""
    path = write(tmp_path, "state:\n  retry: forever\n")
    assert only_error(path) == (
        f'{path}:2: state.retry: expected a duration such as "30s", got "forever"'
    )


def test_error_wrong_type_mapping_for_scalar(tmp_path: Path) -> None:
    """A mapping where a scalar belongs names both."""
    path = write(tmp_path, "coalescing:\n  enabled: {yes: 1}\n")
    assert only_error(path) == (
        f"{path}:2: coalescing.enabled: expected true or false, got a mapping"
    )


def test_error_wrong_type_integer(tmp_path: Path) -> None:
    """A quoted number is a string, not an integer."""
    path = write(tmp_path, 'limits:\n  upstream_queue: "12"\n')
    assert only_error(path) == (
        f"{path}:2: limits.upstream_queue: expected an integer from 0 to 1000000, "
        'got "12"'
    )


def test_error_bare_number_duration(tmp_path: Path) -> None:
    """A bare number for a duration asks for a unit."""
    path = write(tmp_path, "upstream:\n  idle_timeout: 30\n")
    assert only_error(path) == (
        f"{path}:2: upstream.idle_timeout: missing unit, expected a duration such "
        'as "30s" (us, ms, s, m, h or d), got "30"'
    )


def test_error_out_of_range_integer(tmp_path: Path) -> None:
    """An integer outside its range gives the range."""
    path = write(tmp_path, "upstream:\n  pool_size: 20000\n")
    assert only_error(path) == (
        f"{path}:2: upstream.pool_size: 20000 is out of range, expected an integer "
        "from 0 to 10000"
    )


def test_error_out_of_range_duration(tmp_path: Path) -> None:
    """A duration outside its range gives the range in readable units."""
    path = write(tmp_path, "state:\n  coalesce: 0s\n")
    assert only_error(path) == (
        f'{path}:2: state.coalesce: "0s" is out of range, expected a duration from '
        "1ms to 10s"
    )


def test_error_bad_size(tmp_path: Path) -> None:
    """A size that is not one quotes what it got."""
    path = write(tmp_path, "cache:\n  disk:\n    max_bytes: lots\n")
    assert only_error(path) == (
        f'{path}:3: cache.disk.max_bytes: expected a size such as "4MiB", got "lots"'
    )


def test_error_out_of_range_size(tmp_path: Path) -> None:
    """A size outside its range gives the range in readable units."""
    path = write(tmp_path, "limits:\n  max_header_bytes: 2MiB\n")
    assert only_error(path) == (
        f'{path}:2: limits.max_header_bytes: "2MiB" is out of range, expected a '
        "size from 1KiB to 1MiB"
    )


def test_error_bad_enum_suggests_the_closest(tmp_path: Path) -> None:
    """An unknown enum value lists the values and suggests the nearest."""
    path = write(tmp_path, "fallbacks:\n  disk: quarantined\n")
    assert only_error(path) == (
        f'{path}:2: fallbacks.disk: unknown value "quarantined", expected one of '
        'memory_only, quarantine, fail; did you mean "quarantine"?'
    )


def test_error_duplicate_key(tmp_path: Path) -> None:
    """A key set twice in one mapping is an error naming the first line."""
    path = write(
        tmp_path,
        """\
        listen:
          grace: 10s
          drain_delay: 1s
          grace: 20s
        """,
    )
    assert only_error(path) == (
        f"{path}:4: listen.grace: duplicate key, already set on line 2"
    )


def test_error_https_url(tmp_path: Path) -> None:
    """An https upstream is refused with its own message."""
    path = write(tmp_path, "upstream:\n  url: https://llm.internal:8443\n")
    assert only_error(path) == (
        f"{path}:2: upstream.url: https upstreams are not supported yet, expected "
        "an http:// URL"
    )


def test_error_bad_url(tmp_path: Path) -> None:
    """A URL with a path, or no http scheme, is refused."""
    path = write(tmp_path, "upstream:\n  url: http://127.0.0.1:8080/v1\n")
    assert only_error(path) == (
        f'{path}:2: upstream.url: expected an http:// URL such as "http://127.0.0.1'
        ':8080" (scheme, host and port only), got "http://127.0.0.1:8080/v1"'
    )


@pytest.mark.parametrize("value", ["nope", "127.0.0.1:99999", "::1:8090", ":80"])
def test_error_bad_host_port(tmp_path: Path, value: str) -> None:
    """Not host:port, a port out of range, or bare IPv6, is refused."""
    path = write(tmp_path, f'admin:\n  listen: "{value}"\n')
    assert only_error(path) == (
        f"{path}:2: admin.listen: expected host:port such as 127.0.0.1:8091, "
        f'got "{value}"'
    )


@pytest.mark.parametrize("value", ["[::1]:8090", "0.0.0.0:0", "localhost:80"])
def test_host_port_forms_accepted(tmp_path: Path, value: str) -> None:
    """Bracketed IPv6, port 0 and host names are valid listeners."""
    path = write(tmp_path, f'listen:\n  data: "{value}"\n')
    assert load_manifest(path, env={}).listen.data == value


def test_error_duplicate_route_name(tmp_path: Path) -> None:
    """Route names are unique; the second use names the first."""
    path = write(
        tmp_path,
        """\
        routes:
          - name: chat
            paths: [/a]
          - name: chat
            paths: [/b]
        """,
    )
    assert only_error(path) == (
        f'{path}:4: routes[1].name: duplicate route name "chat", already used by '
        "routes[0]"
    )


def test_error_reserved_route_name(tmp_path: Path) -> None:
    """The name "other" belongs to unmatched requests; no route may take it."""
    path = write(tmp_path, "routes:\n  - {name: other, paths: [/a]}\n")
    assert only_error(path) == (
        f'{path}:2: routes[0].name: "other" is reserved for requests no route '
        "matches, expected another name"
    )


def test_error_bad_route_name(tmp_path: Path) -> None:
    """Route names follow the metric-label pattern."""
    path = write(tmp_path, "routes:\n  - {name: Chat, paths: [/a]}\n")
    assert only_error(path) == (
        f"{path}:2: routes[0].name: expected a route name matching "
        '[a-z][a-z0-9_]{0,31} such as "chat", got "Chat"'
    )


def test_error_route_missing_paths(tmp_path: Path) -> None:
    """A route without paths is an error on the route's line."""
    path = write(tmp_path, "routes:\n  - name: chat\n    kind: chat\n")
    assert only_error(path) == (
        f'{path}:2: routes[0]: missing key "paths", expected every route to have '
        "a name and paths"
    )


def test_error_bad_route_path(tmp_path: Path) -> None:
    """Paths start with /, use whole {name} segments and end /* at most."""
    path = write(tmp_path, 'routes:\n  - {name: a, paths: ["/v1/*/x"]}\n')
    assert only_error(path) == (
        f'{path}:2: routes[0].paths[0]: expected a path such as "/v1/chat/'
        'completions", "/v1/models/{model}" or "/v1/*", got "/v1/*/x"'
    )


def test_error_lower_case_method_suggests_upper(tmp_path: Path) -> None:
    """Methods are upper-case; "post" suggests "POST"."""
    path = write(tmp_path, "routes:\n  - {name: a, paths: [/a], methods: [post]}\n")
    assert only_error(path) == (
        f"{path}:2: routes[0].methods[0]: expected an upper-case HTTP method such "
        'as POST, got "post"; did you mean "POST"?'
    )


def test_error_duplicate_list_entry(tmp_path: Path) -> None:
    """A value listed twice is an error naming the first index."""
    path = write(tmp_path, "scopes:\n  credential_headers: [x-key, x-key]\n")
    assert only_error(path) == (
        f'{path}:2: scopes.credential_headers[1]: duplicate "x-key", already '
        "listed as scopes.credential_headers[0]"
    )


def test_error_unreachable_route_path(tmp_path: Path) -> None:
    """An exact path an earlier route takes for the same methods is an error."""
    path = write(
        tmp_path,
        """\
        routes:
          - {name: a, paths: [/x]}
          - name: b
            methods: [GET]
            paths:
              - /y
              - /x
        """,
    )
    assert only_error(path) == (
        f'{path}:7: routes[1].paths[1]: "/x" is already taken by routes[0] (a) for '
        "these methods, expected a path this route can reach (first match wins)"
    )


def test_error_url_and_replicas_both_set(tmp_path: Path) -> None:
    """``url`` and a non-empty ``replicas`` together are ambiguous."""
    path = write(
        tmp_path,
        "upstream:\n  url: http://a:1\n  replicas: [http://b:1, http://c:1]\n",
    )
    assert only_error(path) == (
        f"{path}:3: upstream.replicas: set together with upstream.url, expected "
        "one or the other (replicas replace url)"
    )


def test_error_short_secret_is_not_echoed(tmp_path: Path) -> None:
    """A token too short to be safe is refused without printing it."""
    path = write(tmp_path, "admin:\n  token: hunter2\n")
    assert only_error(path) == (
        f"{path}:2: admin.token: not a usable secret (7 characters, value not "
        "shown), expected an empty string or at least 16 printable characters "
        "without spaces"
    )


def test_error_top_level_not_a_mapping(tmp_path: Path) -> None:
    """The document must be a mapping of sections."""
    path = write(tmp_path, "- upstream\n- listen\n")
    assert only_error(path) == (
        f"{path}:1: expected a mapping of sections at the top level (admin, "
        "artifacts, cache, coalescing, fallbacks, limits, listen, negative, "
        "prompt_cache, routes, scopes, semantic, state, upstream), got a list"
    )


def test_error_yaml_syntax_has_its_line(tmp_path: Path) -> None:
    """A YAML syntax error names the line the parser stopped at."""
    path = write(tmp_path, "upstream:\n  url: http://a:1\n  kind: [vllm\nlisten: {}\n")
    assert only_error(path) == (
        f"{path}:4: YAML syntax error: expected ',' or ']', but got ':' "
        "(while parsing a flow sequence on line 3)"
    )


def test_error_control_character_has_its_line(tmp_path: Path) -> None:
    """A character YAML does not allow is a syntax error on its line."""
    path = write(tmp_path, "upstream:\n  kind: a\x07b\n")
    assert only_error(path) == (
        f"{path}:2: YAML syntax error: unacceptable character #x0007: special "
        "characters are not allowed"
    )


def test_error_unsupported_tag(tmp_path: Path) -> None:
    """Language-specific tags are refused; nothing is ever constructed."""
    path = write(tmp_path, "upstream:\n  url: !!python/object:os.system x\n")
    assert only_error(path) == (
        f'{path}:2: unsupported tag "tag:yaml.org,2002:python/object:os.system", '
        "expected plain YAML values"
    )


def test_error_not_utf8(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are refused with their line."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"upstream:\n  kind: caf\xe9\n")
    assert only_error(str(path)) == (
        f"{path}:2: not UTF-8 (byte 0xe9), expected a UTF-8 text file"
    )


def test_error_file_too_big(tmp_path: Path) -> None:
    """A file over 1 MiB is refused before it is parsed."""
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (1024 * 1024 + 1))
    assert only_error(str(path)) == (
        f"{path}: file too big (more than 1MiB), expected at most 1048576 bytes"
    )


def test_error_missing_file(tmp_path: Path) -> None:
    """A file that cannot be read is one error, not a traceback."""
    path = tmp_path / "absent.yaml"
    assert only_error(str(path)) == (
        f"{path}: cannot read the file (No such file or directory)"
    )


def test_error_alias_bomb_refused_quickly(tmp_path: Path) -> None:
    """A billion-laughs file is refused in well under a second."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 9):
        refs = ", ".join([f"*a{level - 1}"] * 9)
        lines.append(f"a{level}: &a{level} [{refs}]")
    path = write(tmp_path, "\n".join(lines) + "\n")
    started = time.perf_counter()
    errors = errors_of(path)
    assert time.perf_counter() - started < 0.5
    assert errors == [
        (
            f"{path}:1: aliases used more than 100 times, expected at most 100 "
            "(a guard against expansion bombs)"
        )
    ]


def test_error_many_aliases_refused_while_composing(tmp_path: Path) -> None:
    """More than 100 alias uses in the text itself stops the parse."""
    refs = ", ".join(["*a"] * 101)
    path = write(tmp_path, f"a: &a [1]\nb: [{refs}]\n")
    assert only_error(path) == (
        f"{path}:2: aliases used more than 100 times, expected at most 100 "
        "(a guard against expansion bombs)"
    )


def test_error_node_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the node budget the file is refused at the node that crossed it."""
    monkeypatch.setattr(manifest_module, "MAX_NODES", 10)
    items = "".join(f"    - /d{i}\n" for i in range(20))
    path = write(tmp_path, f"artifacts:\n  dirs:\n{items}")
    # Nodes 1-5 are the mappings, keys and list; the 11th is the 6th item.
    assert only_error(path) == (
        f"{path}:8: more than 10 nodes, expected at most 10 (a guard against "
        "expansion bombs)"
    )


def test_error_node_budget_counts_alias_expansion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small text whose aliases expand past the node budget is refused."""
    monkeypatch.setattr(manifest_module, "MAX_NODES", 50)
    path = write(
        tmp_path, "a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\nb: [*a, *a, *a, *a, *a]\n"
    )
    assert only_error(path) == (
        f"{path}:1: more than 50 nodes, expected at most 50 (a guard against "
        "expansion bombs)"
    )


def test_error_nesting_too_deep(tmp_path: Path) -> None:
    """Deep nesting is refused before Python's recursion limit is near."""
    path = write(tmp_path, "x: " + "[" * 200 + "\n")
    assert only_error(path) == (
        f"{path}:1: nested deeper than 64 levels, expected at most 64"
    )


def test_errors_all_reported_in_file_order(tmp_path: Path) -> None:
    """Every error in a file is reported at once, sorted by line."""
    path = write(
        tmp_path,
        """\
        upstream:
          kind: tgi
        state:
          retry: 0
        limits:
          sse_subscribers: -1
        """,
    )
    assert errors_of(path) == [
        (
            f'{path}:2: upstream.kind: unknown value "tgi", expected one of '
            "llama.cpp, vllm, openai"
        ),
        (
            f"{path}:4: state.retry: missing unit, expected a duration such as "
            '"30s" (us, ms, s, m, h or d), got "0"'
        ),
        (
            f"{path}:6: limits.sse_subscribers: -1 is out of range, expected an "
            "integer from 0 to 1000000"
        ),
    ]


def test_errors_capped_at_fifty(tmp_path: Path) -> None:
    """Past 50 errors the rest are counted, not listed."""
    items = "".join(f"    - X-H{i}\n" for i in range(60))
    path = write(tmp_path, f"scopes:\n  credential_headers:\n{items}")
    errors = errors_of(path)
    assert len(errors) == 51
    assert errors[-1] == f"{path}: 10 more errors not shown"


# --- overrides ---------------------------------------------------------------------


def test_override_env_beats_file(tmp_path: Path) -> None:
    """SIDECAR_UPSTREAM replaces upstream.url from the file."""
    path = write(tmp_path, "upstream:\n  url: http://file:1\n")
    loaded = load_manifest(path, env={"SIDECAR_UPSTREAM": "http://env:2"})
    assert loaded.upstream.url == "http://env:2"
    assert loaded.overrides == ("SIDECAR_UPSTREAM",)


def test_override_flag_beats_env() -> None:
    """--listen wins over SIDECAR_LISTEN, which is then not applied."""
    loaded = load_manifest(
        None,
        env={"SIDECAR_LISTEN": "127.0.0.1:1", "SIDECAR_UPSTREAM": "http://env:2"},
        flags={"listen": "127.0.0.1:2", "upstream": None, "admin_listen": None},
    )
    assert loaded.listen.data == "127.0.0.1:2"
    assert loaded.overrides == ("SIDECAR_UPSTREAM", "--listen")


def test_override_list_sets_replicas() -> None:
    """A comma-separated SIDECAR_UPSTREAM sets the replicas."""
    env = {"SIDECAR_UPSTREAM": "http://a:1, http://b:2"}
    loaded = load_manifest(None, env=env)
    assert loaded.upstream_urls == ("http://a:1", "http://b:2")


def test_override_single_url_clears_file_replicas(tmp_path: Path) -> None:
    """One URL from the environment replaces replicas listed in the file."""
    path = write(tmp_path, "upstream:\n  replicas: [http://a:1, http://b:1]\n")
    loaded = load_manifest(path, env={"SIDECAR_UPSTREAM": "http://c:1"})
    assert loaded.upstream_urls == ("http://c:1",)


def test_override_admin_token_from_env() -> None:
    """SIDECAR_ADMIN_TOKEN sets admin.token; the digest does not contain it."""
    loaded = load_manifest(None, env={"SIDECAR_ADMIN_TOKEN": TOKEN})
    assert loaded.admin.token == TOKEN
    assert loaded.overrides == ("SIDECAR_ADMIN_TOKEN",)
    assert loaded.digest != Manifest().digest


def test_override_empty_variable_is_not_set() -> None:
    """An empty environment variable counts as unset."""
    loaded = load_manifest(None, env={"SIDECAR_LISTEN": ""})
    assert loaded.overrides == ()


def test_override_changes_the_digest() -> None:
    """The digest covers the applied overrides as well as the file."""
    plain = load_manifest(None, env={})
    moved = load_manifest(None, env={}, flags={"listen": "127.0.0.1:9000"})
    assert plain.digest != moved.digest


def test_override_bad_env_value_names_the_variable() -> None:
    """An invalid override is an error naming the variable, not a file line."""
    with pytest.raises(ManifestError) as caught:
        load_manifest(None, env={"SIDECAR_LISTEN": "nope"})
    assert caught.value.errors == [
        ('SIDECAR_LISTEN: expected host:port such as 127.0.0.1:8090, got "nope"')
    ]


def test_override_bad_flag_value_names_the_flag() -> None:
    """An invalid flag is an error naming the flag."""
    with pytest.raises(ManifestError) as caught:
        load_manifest(None, env={}, flags={"upstream": "https://x:1"})
    assert caught.value.errors == [
        ("--upstream: https upstreams are not supported yet, expected an http:// URL")
    ]


def test_override_unknown_flag_is_a_programming_error() -> None:
    """Flag keys other than upstream, listen and admin_listen raise ValueError."""
    with pytest.raises(ValueError):
        load_manifest(None, env={}, flags={"admin-listen": "127.0.0.1:1"})


def test_override_listener_collision() -> None:
    """The admin listener may not take the data listener's port."""
    with pytest.raises(ManifestError) as caught:
        load_manifest(None, env={"SIDECAR_ADMIN_LISTEN": "0.0.0.0:8090"})
    assert caught.value.errors == [
        (
            "SIDECAR_ADMIN_LISTEN: 0.0.0.0:8090 collides with listen.data "
            "127.0.0.1:8090, expected the admin and data listeners on different ports"
        )
    ]


def test_override_file_and_env_errors_reported_together(tmp_path: Path) -> None:
    """File errors and override errors come back in one ManifestError."""
    path = write(tmp_path, "listen:\n  grace: soon\n")
    errors = errors_of(path, env={"SIDECAR_UPSTREAM": "ftp://x"})
    assert errors == [
        f'{path}:2: listen.grace: expected a duration such as "30s", got "soon"',
        (
            'SIDECAR_UPSTREAM: expected an http:// URL such as "http://127.0.0.1:'
            '8080" (scheme, host and port only), got "ftp://x"'
        ),
    ]


def test_resolve_policy_path_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--policy beats SIDECAR_POLICY beats the shipped file beats defaults."""
    monkeypatch.chdir(tmp_path)
    env = {"SIDECAR_POLICY": "env.yaml"}
    assert resolve_policy_path("flag.yaml", env) == "flag.yaml"
    assert resolve_policy_path(None, env) == "env.yaml"
    assert resolve_policy_path(None, {}) is None
    (tmp_path / "policies").mkdir()
    (tmp_path / DEFAULT_POLICY_PATH).write_text("")
    assert resolve_policy_path(None, {}) == DEFAULT_POLICY_PATH


# --- routing -----------------------------------------------------------------------


def test_router_exact_path() -> None:
    """An exact path and method give the route and no captures."""
    route, captures = Router(Manifest().routes).match("POST", "/v1/chat/completions")
    assert (route.name, captures) == ("chat", {})


def test_router_method_filters() -> None:
    """A path whose route does not take the method falls to OTHER."""
    assert Router(Manifest().routes).match("GET", "/v1/chat/completions") == (
        OTHER,
        {},
    )


def test_router_no_match_is_other() -> None:
    """An unknown path is the built-in OTHER route: passthrough, never cached."""
    route, captures = Router(Manifest().routes).match("GET", "/slots")
    assert (route.name, route.kind, route.cache.when) == (
        "other",
        "passthrough",
        CacheWhen.NEVER,
    )
    assert captures == {}


def test_router_captures_named_segments() -> None:
    """``{name}`` captures one raw, still percent-encoded segment."""
    router = Router([Route(name="model", paths=("/v1/models/{model}",))])
    route, captures = router.match("GET", "/v1/models/org%2Fm")
    assert (route.name, captures) == ("model", {"model": "org%2Fm"})
    assert router.match("GET", "/v1/models/a/b")[0] is OTHER


def test_router_trailing_star_takes_the_rest() -> None:
    """``/v2/*`` takes every path below /v2/, and not /v2 itself."""
    router = Router([Route(name="blobs", paths=("/v2/*",))])
    assert router.match("GET", "/v2/blobs/sha256:ab")[0].name == "blobs"
    assert router.match("GET", "/v2")[0] is OTHER


def test_router_first_match_wins_over_a_later_exact_path() -> None:
    """A pattern listed first beats an exact path listed after it."""
    first = Route(name="all", paths=("/v1/*",), methods=("GET",))
    later = Route(name="models", paths=("/v1/models",))
    router = Router([first, later])
    assert router.match("GET", "/v1/models")[0].name == "all"
    assert router.match("POST", "/v1/models")[0].name == "models"


def test_router_ignores_the_query() -> None:
    """A query string does not change the route."""
    assert Router(Manifest().routes).match("GET", "/props?x=1")[0].name == "props"


def test_route_matches_reports_captures() -> None:
    """Route.matches gives captures, {} for exact, None for no match."""
    route = Route(name="r", paths=("/a", "/b/{id}"), methods=("GET",))
    assert route.matches("GET", "/a") == {}
    assert route.matches("GET", "/b/7") == {"id": "7"}
    assert route.matches("POST", "/a") is None
    assert route.matches("GET", "/c") is None


# --- check-policy ------------------------------------------------------------------


def test_check_policy_valid_file_prints_a_summary() -> None:
    """A valid file exits 0 with source, digest, upstream, routes, listeners."""
    out, err = io.StringIO(), io.StringIO()
    assert check_policy(str(SHIPPED), out=out, err=err) == 0
    digest = load_manifest(SHIPPED, env={}).digest
    assert out.getvalue().splitlines() == [
        f"{SHIPPED}: ok",
        f"  digest    {digest}",
        "  upstream  http://127.0.0.1:8080 (llama.cpp)",
        (
            "  routes    chat, completion, infill, embedding, tokenize, "
            "detokenize, models, props"
        ),
        "  data      127.0.0.1:8090",
        "  admin     127.0.0.1:8091",
    ]
    assert err.getvalue() == ""


def test_check_policy_invalid_file_prints_every_error(tmp_path: Path) -> None:
    """An invalid file exits 1 with each error on stderr and nothing on stdout."""
    path = write(tmp_path, "upstream:\n  kind: tgi\nstate:\n  retry: x\n")
    out, err = io.StringIO(), io.StringIO()
    assert check_policy(path, out=out, err=err) == 1
    assert out.getvalue() == ""
    assert len(err.getvalue().splitlines()) == 2


def test_check_policy_missing_file_is_one_line(tmp_path: Path) -> None:
    """A missing file exits 1 with a one-line error, no traceback."""
    out, err = io.StringIO(), io.StringIO()
    path = tmp_path / "none.yaml"
    assert check_policy(str(path), out=out, err=err) == 1
    assert (
        err.getvalue() == f"{path}: cannot read the file (No such file or directory)\n"
    )


def test_check_policy_ignores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """check-policy judges the file alone: a bad variable does not fail it."""
    monkeypatch.setenv("SIDECAR_LISTEN", "nope")
    out, err = io.StringIO(), io.StringIO()
    assert check_policy(str(SHIPPED), out=out, err=err) == 0


def test_check_policy_notes_an_exposed_admin_port(tmp_path: Path) -> None:
    """An admin port beyond loopback without a token is pointed out."""
    path = write(tmp_path, "admin:\n  listen: 0.0.0.0:8091\n")
    out = io.StringIO()
    assert check_policy(path, out=out, err=io.StringIO()) == 0
    assert out.getvalue().splitlines()[-1] == (
        "  note      admin.listen is beyond loopback: `sidecar serve` needs "
        "SIDECAR_ADMIN_TOKEN"
    )


def test_manifest_equality_ignores_provenance(tmp_path: Path) -> None:
    """Two sources of the same policy compare equal; digests still differ."""
    path = write(tmp_path, "upstream:\n  kind: llama.cpp\n")
    loaded = load_manifest(path, env={})
    assert loaded == Manifest()
    assert loaded.digest != Manifest().digest
