"""The policy manifest: one YAML file turned into a typed, frozen model.

Owns the schema (the dataclasses below, whose field names are the YAML keys),
loading and validation, the override order (built-in defaults < the file <
environment variables < command-line flags), route matching (``Route``,
``Router``) and ``sidecar check-policy``. Not here: acting on a policy (each
stage reads its own section), reload on SIGHUP (``app.py`` calls
``load_manifest`` again and keeps the old manifest if it raises), duration
and size syntax (``units.py``).

Invariants:

- An empty file is a valid manifest: every section has defaults, and
  ``load_manifest(None)`` equals loading the shipped ``policies/default.yaml``.
- Every error reads ``FILE:LINE: dotted.path: what is wrong, what was
  expected`` (an override names its variable or flag instead of FILE:LINE);
  all errors are reported together (up to ``MAX_ERRORS``), never a traceback.
- Hostile files are refused cheaply: the file is capped at ``MAX_FILE_BYTES``
  before parsing, only ``yaml.SafeLoader`` composes it (nothing is ever
  constructed from tags), and node, alias and depth budgets stop expansion
  bombs while the node graph is walked.
- Durations are float seconds, sizes int bytes, lists tuples. ``==`` compares
  policy only: ``source``, ``digest`` and ``overrides`` are left out, so two
  loads of the same policy from different places compare equal.

Every key carries a ``kind`` (how its node is read and checked) in its
dataclass field's metadata, so the schema, the defaults and the validation
are one declaration; nested sections are fields whose default is a section.

Known limitations: ``https`` upstreams and upstream URLs with a path prefix
are refused (the proxy speaks plain HTTP/1.1 to a local server). Route paths
are matched on the raw, still percent-encoded path, so ``/v1/%6Dodels`` is not
``/v1/models``; write the form clients send. Only exact paths are checked for
being unreachable behind an earlier route; a pattern that shadows a later
route is not reported. The rule "admin beyond loopback needs a token" is
enforced when the admin port binds (``app.py``), not here: the token may come
from the environment, and ``check-policy`` reads the file alone, so it only
points the risk out in its summary. PyYAML's parser is pure Python, so a file
at the node budget takes about a second to refuse.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import hashlib
import ipaddress
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TextIO
from urllib.parse import urlsplit

import yaml

from sidecar import log
from sidecar.errors import ManifestError
from sidecar.units import (
    DURATION_EXAMPLE,
    SIZE_EXAMPLE,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
    quote,
)

# Budgets against hostile files. The shipped file is 10 KiB, about 400 nodes
# and no alias; composing costs PyYAML's pure-Python parser roughly 50 us a
# node, so the node budget also bounds a refused file near one second.
MAX_FILE_BYTES: Final = 1024 * 1024
MAX_NODES: Final = 20_000
MAX_ALIASES: Final = 100
MAX_DEPTH: Final = 64  # the schema nests 5 deep; far below the recursion limit
MAX_ERRORS: Final = 50
MIN_SECRET_CHARS: Final = 16  # tokens and keys: 16 printable ASCII at least
DEFAULTS_SOURCE: Final = "<defaults>"
DEFAULT_POLICY_PATH: Final = "policies/default.yaml"

_TAG: Final = "tag:yaml.org,2002:"
_NULL: Final = _TAG + "null"
_MERGE: Final = _TAG + "merge"
# Tags the manifest can hold. Anything else (``!!python/object``, ``!foo``)
# is refused: the file is plain data, and a tag there is a mistake or a probe.
_PLAIN_TAGS: Final = frozenset(
    _TAG + name
    for name in (
        "str",
        "int",
        "float",
        "bool",
        "null",
        "timestamp",
        "merge",
        "map",
        "seq",
    )
)
# Reads YAML 1.1 ints (``10_000``, ``0x10``) and bools (``yes``) from a node.
_SCALARS: Final = yaml.constructor.SafeConstructor()
_BAD: Final[Any] = object()  # a value that failed; its error is already recorded


# --- enumerations -------------------------------------------------------------


class UpstreamKind(enum.StrEnum):
    """The upstream's dialect: which state endpoints to poll, which fields."""

    LLAMA_CPP = "llama.cpp"
    VLLM = "vllm"
    OPENAI = "openai"


class ForwardedMode(enum.StrEnum):
    """Which forwarding headers the proxy adds to upstream requests."""

    X_FORWARDED = "x-forwarded"
    FORWARDED = "forwarded"
    NONE = "none"


class RouteKind(enum.StrEnum):
    """What a route's requests are, which decides how bodies are keyed."""

    CHAT = "chat"
    COMPLETION = "completion"
    INFILL = "infill"
    EMBEDDING = "embedding"
    TOKENIZE = "tokenize"
    DETOKENIZE = "detokenize"
    MODELS = "models"
    PROPS = "props"
    ARTIFACT = "artifact"
    PASSTHROUGH = "passthrough"


class CacheWhen(enum.StrEnum):
    """When a route's answers are stored: only deterministic ones, always, never."""

    DETERMINISTIC = "deterministic"
    ALWAYS = "always"
    NEVER = "never"


class PromptCacheMode(enum.StrEnum):
    """``force`` sets ``cache_prompt``, ``default`` leaves it, ``off`` clears it."""

    FORCE = "force"
    DEFAULT = "default"
    OFF = "off"


class DiskFallback(enum.StrEnum):
    """What happens when the disk tier cannot be opened or fails."""

    MEMORY_ONLY = "memory_only"
    QUARANTINE = "quarantine"
    FAIL = "fail"


# --- value kinds: how one YAML node becomes one field value ---------------------


def _describe(node: yaml.Node) -> str:
    """A node as the "got ..." part of an error message."""
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "an empty list" if not node.value else "a list"
    if node.tag == _NULL:
        return "null"
    if node.tag == _TAG + "str":
        return quote(node.value)
    text = str(node.value)  # a number or boolean as written, unquoted
    return text if len(text) <= 60 else text[:60] + "..."


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``; did you mean "x"?`` for the closest choice, or nothing."""
    names = list(choices)
    guess = {name.lower(): name for name in names}.get(word.lower())
    if guess is None:
        close = difflib.get_close_matches(word, names, n=1)
        guess = close[0] if close else None
    return f'; did you mean "{guess}"?' if guess else ""


class _Kind:
    """Reads one manifest value from its node; records errors on the walk."""

    expected = "a value"

    def read(self, node: yaml.Node, path: str, walk: _Walk) -> Any:
        raise NotImplementedError


class _Scalar(_Kind):
    """A value written as one YAML scalar; ``parse`` also serves overrides."""

    def read(self, node: yaml.Node, path: str, walk: _Walk) -> Any:
        if not isinstance(node, yaml.ScalarNode) or node.tag == _NULL:
            return walk.fail(
                node, path, f"expected {self.expected}, got {_describe(node)}"
            )
        try:
            return self.parse_node(node)
        except ValueError as exc:
            return walk.fail(node, path, str(exc))

    def parse_node(self, node: yaml.ScalarNode) -> Any:
        # The scalar's text, whatever YAML resolved it to: `mode: off` is the
        # enum value "off", not the YAML 1.1 boolean false.
        return self.parse(node.value)

    def parse(self, text: str) -> Any:
        raise NotImplementedError


class _Bool(_Scalar):
    expected = "true or false"

    def parse_node(self, node: yaml.ScalarNode) -> Any:
        if node.tag != _TAG + "bool":
            raise ValueError(f"expected {self.expected}, got {_describe(node)}")
        return _SCALARS.construct_yaml_bool(node)


class _Int(_Scalar):
    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high
        self.expected = f"an integer from {low} to {high}"

    def parse_node(self, node: yaml.ScalarNode) -> Any:
        if node.tag != _TAG + "int":
            raise ValueError(f"expected {self.expected}, got {_describe(node)}")
        try:
            value: int = _SCALARS.construct_yaml_int(node)
        except ValueError:  # resolved as an int but unreadable, such as 0x_
            raise ValueError(f"expected {self.expected}, got {node.value}") from None
        if not self.low <= value <= self.high:
            raise ValueError(f"{value} is out of range, expected {self.expected}")
        return value


class _Duration(_Scalar):
    expected = f"a duration such as {DURATION_EXAMPLE}"

    def __init__(self, low: str, high: str) -> None:
        self.low, self.high = parse_duration(low), parse_duration(high)

    def parse(self, text: str) -> float:
        seconds = parse_duration(text)
        if not self.low <= seconds <= self.high:
            raise ValueError(
                f"{quote(text)} is out of range, expected a duration from "
                f"{format_duration(self.low)} to {format_duration(self.high)}"
            )
        return seconds


class _Size(_Scalar):
    expected = f"a size such as {SIZE_EXAMPLE}"

    def __init__(self, low: str, high: str) -> None:
        self.low, self.high = parse_size(low), parse_size(high)

    def parse(self, text: str) -> int:
        size = parse_size(text)
        if not self.low <= size <= self.high:
            raise ValueError(
                f"{quote(text)} is out of range, expected a size from "
                f"{format_size(self.low)} to {format_size(self.high)}"
            )
        return size


class _Choice(_Scalar):
    def __init__(self, choices: type[enum.StrEnum]) -> None:
        self.choices = choices
        self.names = [member.value for member in choices]
        self.expected = "one of " + ", ".join(self.names)

    def parse(self, text: str) -> enum.StrEnum:
        if text not in self.names:
            raise ValueError(
                f"unknown value {quote(text)}, expected {self.expected}"
                + _did_you_mean(text, self.names)
            )
        return self.choices(text)


class _Text(_Scalar):
    """A string that must match ``pattern``; ``hint`` suggests a fix."""

    def __init__(self, pattern: str, expected: str, hint: Any = None) -> None:
        self.pattern = re.compile(pattern)
        self.expected = expected
        self.hint = hint

    def parse(self, text: str) -> str:
        if not self.pattern.fullmatch(text):
            guess = self.hint(text) if self.hint else None
            tail = f'; did you mean "{guess}"?' if guess and self.ok(guess) else ""
            raise ValueError(f"expected {self.expected}, got {quote(text)}{tail}")
        return text

    def ok(self, text: str) -> bool:
        return self.pattern.fullmatch(text) is not None


class _Secret(_Scalar):
    """A token or key: empty (unset) or long enough. Never echoed in errors."""

    expected = (
        f"an empty string or at least {MIN_SECRET_CHARS} printable characters "
        "without spaces"
    )

    def parse(self, text: str) -> str:
        if text and (len(text) < MIN_SECRET_CHARS or not _PRINTABLE.fullmatch(text)):
            raise ValueError(
                f"not a usable secret ({len(text)} characters, value not shown), "
                f"expected {self.expected}"
            )
        return text


_PRINTABLE: Final = re.compile(r"[\x21-\x7e]+")


class _HostPort(_Scalar):
    """``host:port`` or ``[v6]:port``; port 0 asks for an ephemeral port."""

    def __init__(self, example: str) -> None:
        self.expected = f"host:port such as {example}"

    def parse(self, text: str) -> str:
        try:
            split_host_port(text)
        except ValueError:
            raise ValueError(f"expected {self.expected}, got {quote(text)}") from None
        return text


class _HttpUrl(_Scalar):
    expected = 'an http:// URL such as "http://127.0.0.1:8080"'

    def parse(self, text: str) -> str:
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError:
            parts, port = None, None
        if parts is not None and parts.scheme.lower() == "https":
            raise ValueError(
                "https upstreams are not supported yet, expected an http:// URL"
            )
        if (
            parts is None
            or parts.scheme != "http"
            or not _valid_host(parts.hostname or "")
            or port == 0
            or parts.username is not None
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
        ):
            raise ValueError(
                f"expected {self.expected} (scheme, host and port only), "
                f"got {quote(text)}"
            )
        return text.rstrip("/")


class _List(_Kind):
    """A YAML sequence of one scalar kind; duplicates are errors."""

    def __init__(
        self, item: _Scalar, expected: str, *, non_empty: bool = False
    ) -> None:
        self.item = item
        self.expected = expected
        self.non_empty = non_empty

    def read(self, node: yaml.Node, path: str, walk: _Walk) -> Any:
        if not isinstance(node, yaml.SequenceNode) or (
            self.non_empty and not node.value
        ):
            return walk.fail(
                node, path, f"expected {self.expected}, got {_describe(node)}"
            )
        values: list[Any] = []
        first: dict[Any, int] = {}
        for index, item_node in enumerate(node.value):
            item_path = f"{path}[{index}]"
            value = self.item.read(item_node, item_path, walk)
            if value is _BAD:
                continue
            if value in first:
                walk.fail(
                    item_node,
                    item_path,
                    f"duplicate {quote(str(value))}, already listed as "
                    f"{path}[{first[value]}]",
                )
                continue
            first[value] = index
            values.append(value)
        return tuple(values)


class _Section(_Kind):
    """A nested mapping read into dataclass ``cls``; null means all defaults."""

    def __init__(self, cls: type[Any]) -> None:
        self.cls = cls
        self.expected = "a mapping of " + ", ".join(sorted(_kinds(cls)))

    def read(self, node: yaml.Node, path: str, walk: _Walk) -> Any:
        if isinstance(node, yaml.ScalarNode) and node.tag == _NULL:
            return self.cls()
        if not isinstance(node, yaml.MappingNode):
            return walk.fail(
                node, path, f"expected {self.expected}, got {_describe(node)}"
            )
        return self.cls(**walk.read_mapping(node, path, self.cls))


class _Routes(_Kind):
    """The route list: each a mapping; names unique; no unreachable path."""

    expected = "a list of routes, each a mapping with name and paths"

    def read(self, node: yaml.Node, path: str, walk: _Walk) -> Any:
        if not isinstance(node, yaml.SequenceNode):
            return walk.fail(
                node, path, f"expected {self.expected}, got {_describe(node)}"
            )
        routes: list[Route] = []
        names: dict[str, int] = {}
        for index, item in enumerate(node.value):
            item_path = f"{path}[{index}]"
            route = self._read_route(item, item_path, walk)
            if route is _BAD:
                continue
            if route.name in names:
                walk.fail(
                    walk.nodes[f"{item_path}.name"],
                    f"{item_path}.name",
                    f"duplicate route name {quote(route.name)}, already used by "
                    f"routes[{names[route.name]}]",
                )
                continue
            names[route.name] = index
            _check_reachable(route, item_path, routes, names, walk)
            routes.append(route)
        return tuple(routes)

    def _read_route(self, node: yaml.Node, path: str, walk: _Walk) -> Any:
        if not isinstance(node, yaml.MappingNode):
            expected = "a route (a mapping with name and paths)"
            return walk.fail(node, path, f"expected {expected}, got {_describe(node)}")
        values = walk.read_mapping(node, path, Route)
        for key in ("name", "paths"):
            if f"{path}.{key}" not in walk.nodes:
                expected = "every route to have a name and paths"
                walk.fail(node, path, f'missing key "{key}", expected {expected}')
        if "name" not in values or "paths" not in values:
            return _BAD  # missing or invalid, and reported either way
        return Route(**values)


def _check_reachable(
    route: Route, path: str, earlier: list[Route], names: dict[str, int], walk: _Walk
) -> None:
    """An exact path an earlier route takes for the same methods is an error."""
    for index, item in enumerate(walk.nodes[f"{path}.paths"].value):
        text = item.value if isinstance(item, yaml.ScalarNode) else None
        if text not in route._exact:
            continue
        for other in earlier:
            covers = not other.methods or set(route.methods or ["*"]) <= set(
                other.methods
            )
            if text in other._exact and covers:
                walk.fail(
                    item,
                    f"{path}.paths[{index}]",
                    f"{quote(text)} is already taken by routes[{names[other.name]}] "
                    f"({other.name}) for these methods, expected a path this route "
                    "can reach (first match wins)",
                )
                break


# --- schema ----------------------------------------------------------------------


def _key(kind: _Kind) -> dict[str, _Kind]:
    """Field metadata marking a manifest key and how its value is read."""
    return {"kind": kind}


def _kinds(cls: type[Any]) -> dict[str, _Kind]:
    """The manifest keys of dataclass ``cls``, each with how to read it.

    A field is a key if its metadata names a kind, or if its default is a
    nested section (a dataclass factory); other fields (``source``) are not.
    """
    kinds = _KINDS.get(cls)
    if kinds is None:
        kinds = {}
        for f in dataclasses.fields(cls):
            factory: Any = f.default_factory
            if "kind" in f.metadata:
                kinds[f.name] = f.metadata["kind"]
            elif isinstance(factory, type) and dataclasses.is_dataclass(factory):
                kinds[f.name] = _Section(factory)
        _KINDS[cls] = kinds
    return kinds


# Filled on first use, at import time (class bodies); read-only afterwards.
_KINDS: Final[dict[type[Any], dict[str, _Kind]]] = {}


_URL: Final = _HttpUrl()
_BOOL: Final = _Bool()
_HEADER: Final = _Text(
    r"[a-z0-9!#$%&'*+.^_`|~-]+",
    'a lower-case header name such as "x-api-key"',
    str.lower,
)
_HEADERS: Final = _List(_HEADER, "a list of lower-case header names")
_METHODS_KNOWN: Final = "GET|HEAD|POST|PUT|DELETE|PATCH|OPTIONS|CONNECT|TRACE"
_METHOD: Final = _Text(
    _METHODS_KNOWN, "an upper-case HTTP method such as POST", str.upper
)
_SEGMENT: Final = re.compile(r"[A-Za-z0-9\-._~%!$&'()+,;=:@]*")
_CAPTURE: Final = re.compile(r"\{([a-z_][a-z0-9_]*)\}")
_ROUTE_NAME: Final = r"[a-z][a-z0-9_]{0,31}"
_FOLDER: Final = _Text(r"[^\x00]+", "a folder path")


class _RouteName(_Text):
    def __init__(self) -> None:
        super().__init__(
            _ROUTE_NAME, f'a route name matching {_ROUTE_NAME} such as "chat"'
        )

    def parse(self, text: str) -> str:
        if text == OTHER_NAME:
            raise ValueError(
                f'"{OTHER_NAME}" is reserved for requests no route matches, '
                "expected another name"
            )
        return super().parse(text)


class _RoutePath(_Scalar):
    expected = 'a path such as "/v1/chat/completions", "/v1/models/{model}" or "/v1/*"'

    def parse(self, text: str) -> str:
        try:
            _path_pattern(text)
        except ValueError:
            raise ValueError(f"expected {self.expected}, got {quote(text)}") from None
        return text


@dataclass(frozen=True, slots=True)
class UpstreamPolicy:
    """The inference server: where it is, what it speaks, how long to wait."""

    url: str = field(default="http://127.0.0.1:8080", metadata=_key(_URL))
    replicas: tuple[str, ...] = field(
        default=(), metadata=_key(_List(_URL, "a list of http:// URLs"))
    )
    kind: UpstreamKind = field(
        default=UpstreamKind.LLAMA_CPP, metadata=_key(_Choice(UpstreamKind))
    )
    connect_timeout: float = field(default=2.0, metadata=_key(_Duration("1ms", "5m")))
    first_byte_timeout: float = field(
        default=300.0, metadata=_key(_Duration("1ms", "1d"))
    )
    idle_timeout: float = field(default=60.0, metadata=_key(_Duration("1ms", "1d")))
    pool_size: int = field(default=64, metadata=_key(_Int(0, 10_000)))
    pool_idle: float = field(default=4.0, metadata=_key(_Duration("0s", "1d")))
    poll_interval: float = field(default=2.0, metadata=_key(_Duration("100ms", "1h")))
    health_interval: float = field(default=5.0, metadata=_key(_Duration("100ms", "1h")))


@dataclass(frozen=True, slots=True)
class ListenPolicy:
    """The data port clients use, and how it shuts down."""

    data: str = field(
        default="127.0.0.1:8090", metadata=_key(_HostPort("127.0.0.1:8090"))
    )
    forwarded: ForwardedMode = field(
        default=ForwardedMode.X_FORWARDED, metadata=_key(_Choice(ForwardedMode))
    )
    drain_delay: float = field(default=1.0, metadata=_key(_Duration("0s", "5m")))
    grace: float = field(default=20.0, metadata=_key(_Duration("0s", "1h")))


@dataclass(frozen=True, slots=True)
class AdminPolicy:
    """The admin port; beyond loopback it needs ``token``."""

    listen: str = field(
        default="127.0.0.1:8091", metadata=_key(_HostPort("127.0.0.1:8091"))
    )
    token: str = field(default="", metadata=_key(_Secret()))


@dataclass(frozen=True, slots=True)
class ScopesPolicy:
    """Which headers identify a credential, and the key that hashes them."""

    credential_headers: tuple[str, ...] = field(
        default=("authorization", "x-api-key"), metadata=_key(_HEADERS)
    )
    secret: str = field(default="", metadata=_key(_Secret()))


@dataclass(frozen=True, slots=True)
class RouteCache:
    """Whether and how long a route's answers are stored."""

    when: CacheWhen = field(default=CacheWhen.NEVER, metadata=_key(_Choice(CacheWhen)))
    ttl: float = field(default=3600.0, metadata=_key(_Duration("0s", "365d")))
    public: bool = field(default=False, metadata=_key(_BOOL))
    significant_headers: tuple[str, ...] = field(default=(), metadata=_key(_HEADERS))
    finish_reasons: tuple[str, ...] = field(
        default=("stop",),
        metadata=_key(
            _List(
                _Text(r"[a-z][a-z0-9_]*", 'a finish reason such as "stop"'),
                "a list of finish reasons",
            )
        ),
    )


OTHER_NAME: Final = "other"


@dataclass(frozen=True, slots=True)
class Route:
    """One manifest route: which requests it takes and the policy they get."""

    name: str = field(metadata=_key(_RouteName()))
    paths: tuple[str, ...] = field(
        metadata=_key(
            _List(_RoutePath(), "a list of at least one path", non_empty=True)
        )
    )
    methods: tuple[str, ...] = field(
        default=(),
        metadata=_key(_List(_METHOD, "a list of HTTP methods such as [POST]")),
    )
    kind: RouteKind = field(
        default=RouteKind.PASSTHROUGH, metadata=_key(_Choice(RouteKind))
    )
    version: int = field(default=1, metadata=_key(_Int(1, 2**31 - 1)))
    coalesce: bool = field(default=False, metadata=_key(_BOOL))
    cache: RouteCache = field(default_factory=RouteCache)
    # Compiled from the fields above in __post_init__; not manifest keys.
    _exact: frozenset[str] = field(init=False, repr=False, compare=False)
    _patterns: tuple[re.Pattern[str], ...] = field(
        init=False, repr=False, compare=False
    )
    _methods: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        compiled = [(path, _path_pattern(path)) for path in self.paths]
        exact = frozenset(path for path, pattern in compiled if pattern is None)
        patterns = tuple(pattern for _, pattern in compiled if pattern is not None)
        object.__setattr__(self, "_exact", exact)
        object.__setattr__(self, "_patterns", patterns)
        object.__setattr__(self, "_methods", frozenset(self.methods))

    def accepts(self, method: str) -> bool:
        """Whether ``method`` is one of ``methods`` (an empty list takes any)."""
        return not self._methods or method in self._methods

    def matches(self, method: str, path: str) -> dict[str, str] | None:
        """The ``{name}`` captures if this route takes the request, else None."""
        if not self.accepts(method):
            return None
        if path in self._exact:
            return {}
        return self._capture(path)

    def _capture(self, path: str) -> dict[str, str] | None:
        for pattern in self._patterns:
            found = pattern.fullmatch(path)
            if found is not None:
                return found.groupdict()
        return None


def _path_pattern(path: str) -> re.Pattern[str] | None:
    """None for an exact path, else its regex; ValueError if not a route path."""
    if not path.startswith("/"):
        raise ValueError(path)
    segments = path[1:].split("/")
    parts: list[str] = []
    names: set[str] = set()
    for index, segment in enumerate(segments):
        capture = _CAPTURE.fullmatch(segment)
        if segment == "*" and index == len(segments) - 1:
            parts.append(".*")
        elif capture is not None and capture.group(1) not in names:
            names.add(capture.group(1))
            parts.append(f"(?P<{capture.group(1)}>[^/]+)")
        elif _SEGMENT.fullmatch(segment):
            parts.append(re.escape(segment))
        else:
            raise ValueError(path)
    if not names and segments[-1] != "*":
        return None
    return re.compile("/" + "/".join(parts), re.DOTALL)


def _route(
    name: str,
    kind: RouteKind,
    method: str,
    *paths: str,
    when: CacheWhen,
    ttl: float = 3600.0,
    coalesce: bool = False,
) -> Route:
    cache = RouteCache(when=when, ttl=ttl)
    methods = (method,)
    return Route(name, paths, methods, kind, coalesce=coalesce, cache=cache)


_DET, _ALWAYS, _NEVER = CacheWhen.DETERMINISTIC, CacheWhen.ALWAYS, CacheWhen.NEVER
DEFAULT_ROUTES: Final = (
    _route(
        "chat",
        RouteKind.CHAT,
        "POST",
        "/v1/chat/completions",
        "/chat/completions",
        when=_DET,
    ),
    _route(
        "completion",
        RouteKind.COMPLETION,
        "POST",
        "/v1/completions",
        "/completions",
        "/completion",
        when=_DET,
    ),
    _route("infill", RouteKind.INFILL, "POST", "/infill", when=_DET),
    _route(
        "embedding",
        RouteKind.EMBEDDING,
        "POST",
        "/v1/embeddings",
        "/embeddings",
        "/embedding",
        when=_ALWAYS,
    ),
    _route("tokenize", RouteKind.TOKENIZE, "POST", "/tokenize", when=_ALWAYS),
    _route("detokenize", RouteKind.DETOKENIZE, "POST", "/detokenize", when=_ALWAYS),
    _route(
        "models",
        RouteKind.MODELS,
        "GET",
        "/v1/models",
        "/models",
        when=_ALWAYS,
        ttl=30.0,
        coalesce=True,
    ),
    _route("props", RouteKind.PROPS, "GET", "/props", when=_NEVER, coalesce=True),
)

OTHER: Final = Route(name=OTHER_NAME, paths=("/*",), kind=RouteKind.PASSTHROUGH)


@dataclass(frozen=True, slots=True)
class MemoryTierPolicy:
    """The memory tier (W-TinyLFU): entry and byte ceilings."""

    max_entries: int = field(default=10_000, metadata=_key(_Int(1, 100_000_000)))
    max_bytes: int = field(default=256 * 2**20, metadata=_key(_Size("1KiB", "1TiB")))


@dataclass(frozen=True, slots=True)
class DiskTierPolicy:
    """The disk tier (LevelDB and zstd) under the data dir."""

    enabled: bool = field(default=True, metadata=_key(_BOOL))
    path: str = field(default="cache", metadata=_key(_FOLDER))
    max_bytes: int = field(default=4 * 2**30, metadata=_key(_Size("1MiB", "64TiB")))


@dataclass(frozen=True, slots=True)
class FlashTierPolicy:
    """A tier for large blobs on fast local storage (later)."""

    enabled: bool = field(default=False, metadata=_key(_BOOL))


@dataclass(frozen=True, slots=True)
class SharedTierPolicy:
    """A tier shared by many pods (later)."""

    enabled: bool = field(default=False, metadata=_key(_BOOL))


@dataclass(frozen=True, slots=True)
class CompressionPolicy:
    """zstd level and dictionary training for stored answers."""

    enabled: bool = field(default=True, metadata=_key(_BOOL))
    level: int = field(default=3, metadata=_key(_Int(1, 22)))
    dictionaries: bool = field(default=True, metadata=_key(_BOOL))
    dict_size: int = field(default=16 * 1024, metadata=_key(_Size("1KiB", "1MiB")))
    train_samples: int = field(default=200, metadata=_key(_Int(10, 2048)))


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """The action cache's tiers and the largest entry any tier stores."""

    max_entry_bytes: int = field(
        default=8 * 2**20, metadata=_key(_Size("1KiB", "1GiB"))
    )
    memory: MemoryTierPolicy = field(default_factory=MemoryTierPolicy)
    disk: DiskTierPolicy = field(default_factory=DiskTierPolicy)
    flash: FlashTierPolicy = field(default_factory=FlashTierPolicy)
    shared: SharedTierPolicy = field(default_factory=SharedTierPolicy)
    compression: CompressionPolicy = field(default_factory=CompressionPolicy)


@dataclass(frozen=True, slots=True)
class CoalescingPolicy:
    """Singleflight of identical in-flight requests, and its bounds."""

    enabled: bool = field(default=True, metadata=_key(_BOOL))
    follower_timeout: float = field(default=30.0, metadata=_key(_Duration("1ms", "1d")))
    max_waiters: int = field(default=10_000, metadata=_key(_Int(1, 1_000_000)))
    max_keys: int = field(default=10_000, metadata=_key(_Int(1, 1_000_000)))
    hit_for_miss: float = field(default=5.0, metadata=_key(_Duration("0s", "1h")))


@dataclass(frozen=True, slots=True)
class PromptCachePolicy:
    """What happens to llama.cpp's ``cache_prompt`` field."""

    mode: PromptCacheMode = field(
        default=PromptCacheMode.FORCE, metadata=_key(_Choice(PromptCacheMode))
    )


@dataclass(frozen=True, slots=True)
class SemanticPolicy:
    """The semantic cache stage (later)."""

    enabled: bool = field(default=False, metadata=_key(_BOOL))


@dataclass(frozen=True, slots=True)
class NegativePolicy:
    """The negative cache stage (later)."""

    enabled: bool = field(default=False, metadata=_key(_BOOL))


_ARTIFACT_PATTERN: Final = _Text(
    r"/[^{}\s?#]*\{sha256\}[^{}\s?#]*",
    'an upstream path with one {sha256} such as "/v2/blobs/sha256:{sha256}"',
)


@dataclass(frozen=True, slots=True)
class ArtifactsPolicy:
    """Model files served by digest, and content-addressed upstream paths."""

    dirs: tuple[str, ...] = field(
        default=(), metadata=_key(_List(_FOLDER, "a list of folder paths"))
    )
    upstream_patterns: tuple[str, ...] = field(
        default=(),
        metadata=_key(
            _List(_ARTIFACT_PATTERN, "a list of upstream paths with a {sha256} segment")
        ),
    )


@dataclass(frozen=True, slots=True)
class StatePolicy:
    """State streams: coalescing window, keep-alives, replay buffer."""

    coalesce: float = field(default=0.25, metadata=_key(_Duration("1ms", "10s")))
    idle_publish: float = field(default=2.0, metadata=_key(_Duration("100ms", "5m")))
    replay: int = field(default=1024, metadata=_key(_Int(1, 1_000_000)))
    subscriber_queue: int = field(default=256, metadata=_key(_Int(1, 100_000)))
    retry: float = field(default=2.0, metadata=_key(_Duration("100ms", "1h")))


@dataclass(frozen=True, slots=True)
class LimitsPolicy:
    """Capacity ceilings: sizes, upstream concurrency, subscribers."""

    max_body_bytes: int = field(
        default=64 * 2**20, metadata=_key(_Size("1KiB", "16GiB"))
    )
    max_header_bytes: int = field(
        default=32 * 1024, metadata=_key(_Size("1KiB", "1MiB"))
    )
    upstream_in_flight: int = field(default=256, metadata=_key(_Int(1, 100_000)))
    upstream_queue: int = field(default=1024, metadata=_key(_Int(0, 1_000_000)))
    queue_timeout: float = field(default=10.0, metadata=_key(_Duration("0s", "1h")))
    sse_subscribers: int = field(default=1000, metadata=_key(_Int(0, 1_000_000)))


@dataclass(frozen=True, slots=True)
class FallbacksPolicy:
    """What a failed disk tier does, and when it is tried again."""

    disk: DiskFallback = field(
        default=DiskFallback.MEMORY_ONLY, metadata=_key(_Choice(DiskFallback))
    )
    reopen_interval: float = field(default=30.0, metadata=_key(_Duration("1s", "1d")))


_EMPTY_DIGEST: Final = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True, slots=True)
class Manifest:
    """A whole, validated policy. ``==`` compares policy, not provenance."""

    upstream: UpstreamPolicy = field(default_factory=UpstreamPolicy)
    listen: ListenPolicy = field(default_factory=ListenPolicy)
    admin: AdminPolicy = field(default_factory=AdminPolicy)
    scopes: ScopesPolicy = field(default_factory=ScopesPolicy)
    routes: tuple[Route, ...] = field(default=DEFAULT_ROUTES, metadata=_key(_Routes()))
    cache: CachePolicy = field(default_factory=CachePolicy)
    coalescing: CoalescingPolicy = field(default_factory=CoalescingPolicy)
    prompt_cache: PromptCachePolicy = field(default_factory=PromptCachePolicy)
    semantic: SemanticPolicy = field(default_factory=SemanticPolicy)
    negative: NegativePolicy = field(default_factory=NegativePolicy)
    artifacts: ArtifactsPolicy = field(default_factory=ArtifactsPolicy)
    state: StatePolicy = field(default_factory=StatePolicy)
    limits: LimitsPolicy = field(default_factory=LimitsPolicy)
    fallbacks: FallbacksPolicy = field(default_factory=FallbacksPolicy)
    source: str = field(default=DEFAULTS_SOURCE, compare=False)
    digest: str = field(default=_EMPTY_DIGEST, compare=False)
    overrides: tuple[str, ...] = field(default=(), compare=False)

    @property
    def upstream_urls(self) -> tuple[str, ...]:
        """The replicas if any are listed, else the single ``upstream.url``."""
        return self.upstream.replicas or (self.upstream.url,)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for the ``policy`` read model; secrets redacted."""
        doc: dict[str, Any] = _to_json(self)
        doc["admin"]["token"] = "<set>" if self.admin.token else ""
        doc["scopes"]["secret"] = "<set>" if self.scopes.secret else ""
        return doc


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _to_json(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not f.name.startswith("_")
        }
    if isinstance(value, tuple):
        return [_to_json(item) for item in value]
    if isinstance(value, enum.StrEnum):
        return value.value
    return value


# --- routing ---------------------------------------------------------------------


class Router:
    """First-match-wins routing compiled from the manifest's routes.

    Exact paths are one dict lookup; only routes with ``{name}`` or ``/*``
    paths listed before the exact match are tried as patterns, so the order
    of the manifest decides, as if every route were tried in turn.
    """

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = tuple(routes)
        exact: dict[str, list[tuple[int, Route]]] = {}
        self._patterned: list[tuple[int, Route]] = []
        for index, route in enumerate(self.routes):
            for path in route._exact:
                exact.setdefault(path, []).append((index, route))
            if route._patterns:
                self._patterned.append((index, route))
        self._exact = {path: tuple(entries) for path, entries in exact.items()}

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The first route taking ``method`` and raw ``path``, else ``OTHER``."""
        if "?" in path:
            path = path.partition("?")[0]
        best, found = len(self.routes), OTHER
        for index, route in self._exact.get(path, ()):
            if route.accepts(method):
                best, found = index, route
                break
        for index, route in self._patterned:
            if index >= best:
                break
            if route.accepts(method):
                captures = route._capture(path)
                if captures is not None:
                    return route, captures
        return found, {}


# --- host:port helpers -----------------------------------------------------------

_HOSTNAME: Final = re.compile(
    r"(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
    r"(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*",
    re.IGNORECASE,
)


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return _HOSTNAME.fullmatch(host) is not None
    return True


def split_host_port(text: str) -> tuple[str, int]:
    """``("::1", 8090)`` from ``"[::1]:8090"``; ValueError if not host:port."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or ipaddress.ip_address(host).version != 6:
            raise ValueError(text)
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host or not _valid_host(host):
            raise ValueError(text)
    if not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ValueError(text)
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (from ``split_host_port``) is only the loopback."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- walking the node tree -------------------------------------------------------


class _Refused(Exception):
    """The file is refused before validation: one message, no others."""


class _Walk:
    """Errors, and the node behind every key path read, for one file."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.nodes: dict[str, yaml.Node] = {}
        self._errors: list[tuple[int, str]] = []

    @property
    def errors(self) -> list[str]:
        """Every error so far, in file order (a stable sort by line)."""
        return [message for _, message in sorted(self._errors, key=lambda e: e[0])]

    def where(self, node: yaml.Node, path: str) -> str:
        line = f"{self.source}:{node.start_mark.line + 1}"
        return f"{line}: {path}" if path else line

    def fail(self, node: yaml.Node, path: str, message: str) -> Any:
        """Record an error at ``node``; returns ``_BAD`` for the caller."""
        line = node.start_mark.line
        self._errors.append((line, f"{self.where(node, path)}: {message}"))
        return _BAD

    def read_mapping(
        self, node: yaml.MappingNode, path: str, cls: type[Any]
    ) -> dict[str, Any]:
        """Field values for ``cls`` from ``node``; unknown keys are errors."""
        known = _kinds(cls)
        values: dict[str, Any] = {}
        for key_node, value_node in self._pairs(node, path):
            key = key_node.value
            key_path = f"{path}.{key}" if path else key
            kind = known.get(key)
            if kind is None:
                choices = ", ".join(sorted(known))
                hint = _did_you_mean(key, known)
                message = f"unknown key, expected one of {choices}{hint}"
                self.fail(key_node, key_path, message)
                continue
            self.nodes[key_path] = value_node
            value = kind.read(value_node, key_path, self)
            if value is not _BAD:
                values[key] = value
        return values

    def _pairs(
        self, node: yaml.MappingNode, path: str
    ) -> list[tuple[yaml.ScalarNode, yaml.Node]]:
        """Key and value nodes, merge keys (``<<``) applied, duplicates refused."""
        pairs: list[tuple[yaml.ScalarNode, yaml.Node]] = []
        lines: dict[str, int] = {}
        merged: list[tuple[yaml.ScalarNode, yaml.Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                merged.extend(self._merge_sources(value_node, path))
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.fail(
                    key_node, path, f"expected a plain key, got {_describe(key_node)}"
                )
                continue
            key = key_node.value
            if key in lines:
                key_path = f"{path}.{key}" if path else key
                self.fail(
                    key_node,
                    key_path,
                    f"duplicate key, already set on line {lines[key]}",
                )
                continue
            lines[key] = key_node.start_mark.line + 1
            pairs.append((key_node, value_node))
        # Explicit keys win over merged ones; among merged, the first wins.
        for key_node, value_node in merged:
            if key_node.value not in lines:
                lines[key_node.value] = key_node.start_mark.line + 1
                pairs.append((key_node, value_node))
        return pairs

    def _merge_sources(
        self, node: yaml.Node, path: str
    ) -> list[tuple[yaml.ScalarNode, yaml.Node]]:
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        pairs: list[tuple[yaml.ScalarNode, yaml.Node]] = []
        for source in sources:
            if not isinstance(source, yaml.MappingNode):
                expected = "a mapping (or a list of mappings) to merge with <<"
                self.fail(source, path, f"expected {expected}, got {_describe(source)}")
                continue
            pairs.extend(self._pairs(source, path))
        return pairs


class _Loader(yaml.SafeLoader):
    """SafeLoader with depth, node and alias budgets checked while composing.

    The composer turns aliases into shared nodes without copying, so these
    counts are a floor; ``_check_expansion`` then walks the graph as the
    validator will, and counts what aliases expand to.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0
        self._aliases = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _Refused(_too_many_aliases(mark.line))
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _Refused(_too_many_nodes(mark.line))
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(
                    f"{mark.line + 1}: nested deeper than {MAX_DEPTH} levels, "
                    f"expected at most {MAX_DEPTH}"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _too_many_aliases(line: int) -> str:
    return (
        f"{line + 1}: aliases used more than {MAX_ALIASES} times, expected at "
        f"most {MAX_ALIASES} (a guard against expansion bombs)"
    )


def _too_many_nodes(line: int) -> str:
    return (
        f"{line + 1}: more than {MAX_NODES} nodes, expected at most {MAX_NODES} "
        "(a guard against expansion bombs)"
    )


def _check_expansion(root: yaml.Node) -> None:
    """Walk the graph as validation will; refuse what aliases blow up."""
    seen: set[int] = set()
    stack = [root]
    visits = aliases = 0
    while stack:
        node = stack.pop()
        visits += 1
        if visits > MAX_NODES:
            raise _Refused(_too_many_nodes(node.start_mark.line))
        if id(node) in seen:
            aliases += 1
            if aliases > MAX_ALIASES:
                raise _Refused(_too_many_aliases(node.start_mark.line))
        seen.add(id(node))
        if node.tag not in _PLAIN_TAGS:
            raise _Refused(
                f"{node.start_mark.line + 1}: unsupported tag {quote(node.tag)}, "
                "expected plain YAML values"
            )
        if isinstance(node, yaml.SequenceNode):
            stack.extend(reversed(node.value))
        elif isinstance(node, yaml.MappingNode):
            for key, value in reversed(node.value):
                stack.extend((value, key))


def _compose(text: str, source: str) -> yaml.Node | None:
    """The document's node graph; ManifestError if YAML refuses or a budget does."""
    try:
        root: yaml.Node | None = yaml.compose(text, Loader=_Loader)
        if root is not None:
            _check_expansion(root)
        return root
    except _Refused as exc:
        raise ManifestError([f"{source}:{exc}"]) from None
    except yaml.MarkedYAMLError as exc:
        raise ManifestError([_syntax_error(exc, source)]) from None
    except yaml.YAMLError as exc:
        # A ReaderError (a control character, say) has a position, no mark.
        line = text[: getattr(exc, "position", 0)].count("\n") + 1
        reason = str(exc).splitlines()[0]
        raise ManifestError([f"{source}:{line}: YAML syntax error: {reason}"]) from None


def _syntax_error(exc: yaml.MarkedYAMLError, source: str) -> str:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else 1
    message = f"{source}:{line}: YAML syntax error: {exc.problem or exc.context}"
    if exc.context and exc.problem and exc.context_mark is not None:
        message += f" ({exc.context} on line {exc.context_mark.line + 1})"
    return message


# --- loading ---------------------------------------------------------------------


def _read(source: str) -> tuple[bytes, str]:
    """The file's bytes and text, capped before parsing; ManifestError if not."""
    try:
        with open(source, "rb") as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ManifestError(
            [f"{source}: cannot read the file ({exc.strerror or exc})"]
        ) from None
    if len(data) > MAX_FILE_BYTES:
        cap = format_size(MAX_FILE_BYTES)
        message = f"file too big (more than {cap}), expected at most {MAX_FILE_BYTES}"
        raise ManifestError([f"{source}: {message} bytes"])
    try:
        return data, data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        bad = f"not UTF-8 (byte {data[exc.start]:#04x}), expected a UTF-8 text file"
        raise ManifestError([f"{source}:{line}: {bad}"]) from None


def _build(root: yaml.Node | None, walk: _Walk) -> Manifest:
    """The manifest from the node tree; errors go to ``walk.errors``."""
    values: dict[str, Any] = {}
    if isinstance(root, yaml.MappingNode):
        values = walk.read_mapping(root, "", Manifest)
    elif root is not None and root.tag != _NULL:
        sections = ", ".join(sorted(_kinds(Manifest)))
        expected = f"a mapping of sections at the top level ({sections})"
        walk.fail(root, "", f"expected {expected}, got {_describe(root)}")
    manifest = Manifest(**values)
    if manifest.upstream.replicas and "upstream.url" in walk.nodes:
        walk.fail(
            walk.nodes["upstream.replicas"],
            "upstream.replicas",
            "set together with upstream.url, expected one or the other "
            "(replicas replace url)",
        )
    return manifest


# Override sources: the manifest key each sets, the variable, the flag.
_OVERRIDES: Final = (
    ("upstream", "SIDECAR_UPSTREAM", "--upstream"),
    ("listen", "SIDECAR_LISTEN", "--listen"),
    ("admin_listen", "SIDECAR_ADMIN_LISTEN", "--admin-listen"),
    ("admin_token", "SIDECAR_ADMIN_TOKEN", None),
)
_OVERRIDE_PATHS: Final = {
    "upstream": "upstream.url",
    "listen": "listen.data",
    "admin_listen": "admin.listen",
    "admin_token": "admin.token",
}
_LISTEN_KIND: Final = _HostPort("127.0.0.1:8090")
_ADMIN_KIND: Final = _HostPort("127.0.0.1:8091")


def _pick_overrides(
    env: Mapping[str, str], flags: Mapping[str, str | None]
) -> list[tuple[str, str, str]]:
    """(key, label, value) for each applied override: variables, then flags."""
    known_flags = {key for key, _, flag in _OVERRIDES if flag}
    unknown = sorted(set(flags) - known_flags)
    if unknown:
        raise ValueError(f"unknown override flags: {', '.join(unknown)}")
    given = {key: value for key, value in flags.items() if value is not None}
    picked = [
        (key, variable, env[variable])
        for key, variable, _ in _OVERRIDES
        if env.get(variable) and key not in given
    ]
    picked += [
        (key, flag, given[key]) for key, _, flag in _OVERRIDES if flag and key in given
    ]
    return picked


def _apply(manifest: Manifest, key: str, value: str) -> Manifest:
    """``manifest`` with one override applied; ValueError if it is invalid."""
    replace = dataclasses.replace
    if key == "upstream":
        urls = tuple(_URL.parse(item.strip()) for item in value.split(","))
        if len(set(urls)) != len(urls):
            raise ValueError(
                f"duplicate URL in {quote(value)}, expected distinct replicas"
            )
        if len(urls) == 1:
            upstream = replace(manifest.upstream, url=urls[0], replicas=())
        else:
            upstream = replace(manifest.upstream, replicas=urls)
        return replace(manifest, upstream=upstream)
    if key == "listen":
        return replace(
            manifest, listen=replace(manifest.listen, data=_LISTEN_KIND.parse(value))
        )
    if key == "admin_listen":
        return replace(
            manifest, admin=replace(manifest.admin, listen=_ADMIN_KIND.parse(value))
        )
    return replace(
        manifest, admin=replace(manifest.admin, token=_Secret().parse(value))
    )


def _check_listeners(manifest: Manifest, where: Mapping[str, str]) -> list[str]:
    """The two listeners must not collide, after every override is applied."""
    data, admin = manifest.listen.data, manifest.admin.listen
    data_host, data_port = split_host_port(data)
    admin_host, admin_port = split_host_port(admin)
    wildcard = {"0.0.0.0", "::"}
    overlap = data_host == admin_host or {data_host, admin_host} & wildcard
    if not data_port or data_port != admin_port or not overlap:
        return []
    place = where.get("admin.listen") or where["listen.data"]
    expected = "the admin and data listeners on different ports"
    return [f"{place}: {admin} collides with listen.data {data}, expected {expected}"]


def _load(
    path: str | os.PathLike[str] | None,
    env: Mapping[str, str],
    flags: Mapping[str, str | None],
) -> Manifest:
    source = DEFAULTS_SOURCE if path is None else os.fsdecode(path)
    data = b""
    walk = _Walk(source)
    manifest = Manifest()
    if path is not None:
        data, text = _read(source)
        manifest = _build(_compose(text, source), walk)

    where = {p: walk.where(node, p) for p, node in walk.nodes.items()}
    errors = walk.errors
    applied: list[str] = []
    digest = hashlib.sha256(data)
    for key, label, value in _pick_overrides(env, flags):
        try:
            manifest = _apply(manifest, key, value)
        except ValueError as exc:
            errors.append(f"{label}: {exc}")
            continue
        applied.append(label)
        where[_OVERRIDE_PATHS[key]] = label
        shown = "<set>" if key == "admin_token" else value
        digest.update(f"\0{label}={shown}".encode())

    if not errors:
        errors = _check_listeners(manifest, where)
    if errors:
        raise ManifestError(_capped(list(dict.fromkeys(errors)), source))
    return dataclasses.replace(
        manifest, source=source, digest=digest.hexdigest(), overrides=tuple(applied)
    )


def _capped(errors: list[str], source: str) -> list[str]:
    if len(errors) <= MAX_ERRORS:
        return errors
    hidden = len(errors) - MAX_ERRORS
    return [*errors[:MAX_ERRORS], f"{source}: {hidden} more errors not shown"]


def load_manifest(
    path: str | os.PathLike[str] | None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, str | None] | None = None,
) -> Manifest:
    """Load and validate a manifest, then apply environment and flag overrides.

    ``path`` None means the built-in defaults; ``env`` None means
    ``os.environ``; ``flags`` keys are ``upstream``, ``listen`` and
    ``admin_listen`` (None values are flags not given). Raises ManifestError
    with every problem found.
    """
    manifest = _load(
        path,
        os.environ if env is None else env,
        flags or {},
    )
    log.manifest.info(
        "manifest.loaded",
        extra={
            "source": manifest.source,
            "digest": manifest.digest[:12],
            "routes": len(manifest.routes),
            "overrides": ",".join(manifest.overrides),
        },
    )
    return manifest


def resolve_policy_path(
    flag: str | None, env: Mapping[str, str] | None = None
) -> str | None:
    """Which manifest to load: --policy, SIDECAR_POLICY, the shipped file, None."""
    env = os.environ if env is None else env
    if flag:
        return flag
    if env.get("SIDECAR_POLICY"):
        return env["SIDECAR_POLICY"]
    if os.path.isfile(DEFAULT_POLICY_PATH):
        return DEFAULT_POLICY_PATH
    return None


def check_policy(
    path: str, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """``sidecar check-policy FILE``: 0 and a summary, or 1 and every error.

    The file is checked alone: environment variables are not applied, so the
    result does not depend on the shell it runs in.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        manifest = _load(path, {}, {})
    except ManifestError as exc:
        for line in exc.errors:
            print(line, file=err)
        return 1
    for line in _summary(manifest):
        print(line, file=out)
    return 0


def _summary(manifest: Manifest) -> list[str]:
    upstream = ", ".join(manifest.upstream_urls)
    routes = ", ".join(route.name for route in manifest.routes) or "(none)"
    lines = [
        f"{manifest.source}: ok",
        f"  digest    {manifest.digest}",
        f"  upstream  {upstream} ({manifest.upstream.kind})",
        f"  routes    {routes}",
        f"  data      {manifest.listen.data}",
        f"  admin     {manifest.admin.listen}",
    ]
    admin_host = split_host_port(manifest.admin.listen)[0]
    if not manifest.admin.token and not is_loopback(admin_host):
        lines.append(
            "  note      admin.listen is beyond loopback: `sidecar serve` "
            "needs SIDECAR_ADMIN_TOKEN"
        )
    return lines
