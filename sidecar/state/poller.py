"""The ``upstream`` read model and the poller that keeps it current.

Every ``upstream.poll_interval`` the poller asks the upstream for its own
state and republishes it: for llama.cpp ``/health``, ``/slots``, ``/props``
and ``/metrics``; for vLLM ``/health`` and ``/metrics``; for any other
OpenAI-compatible server ``/v1/models``. Prometheus text is turned into JSON
by promjson.py. While the upstream is unreachable the interval doubles per
failed poll, up to ``max_backoff_s``, and resets on the first answer.
Not here: forwarding the upstream's paths to clients (proxy.py; they stay
reachable through the data port), the sidecar's own health (app.py).

Invariants:
- The poller uses its own ``aiohttp.ClientSession``, never the proxy's, so
  polling cannot take connections from client traffic.
- Published slots hold no free text: llama.cpp puts the prompt, the generated
  text, stop words and grammars in ``/slots``, and a dashboard viewer must not
  read what users asked. Only numbers, booleans and a few format names stay.
- ``/props`` is republished without its chat templates (kilobytes that never
  change and would bloat every snapshot).
- A disabled ``/metrics`` (llama.cpp answers 501 without ``--metrics``) is
  recorded once and probed again only every ``METRICS_REPROBE_POLLS`` polls
  or after the upstream comes back, and logged only when that changes.
- ``UpstreamModel`` replaces values wholesale and never mutates a nested one,
  so a shallow copy is a safe snapshot.

Known limitations: llama.cpp averages some ``/metrics`` gauges over the time
between two scrapes and resets them on each scrape, so this poller shortens
the window another scraper of the upstream's ``/metrics`` sees; read those
gauges from one place. Props are fetched every ``PROPS_EVERY_POLLS`` polls, so
a change there shows up within that many intervals. One upstream URL: with
``upstream.replicas`` the owner runs one poller per replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Mapping
from typing import Any, Final, Literal

import aiohttp
import yarl

from sidecar import log
from sidecar.state.promjson import metrics_to_json

UpstreamKind = Literal["llama.cpp", "vllm", "openai"]
KINDS: Final = ("llama.cpp", "vllm", "openai")

MAX_BODY_BYTES: Final = 4 * 1024 * 1024
METRICS_REPROBE_POLLS: Final = 30
PROPS_EVERY_POLLS: Final = 15
# Strings worth keeping in a slot: format names chosen by the server, not users.
_SLOT_TEXT_KEPT: Final = frozenset(
    {"chat_format", "reasoning_format", "speculative.types"}
)
_PROPS_DROPPED: Final = frozenset({"chat_template", "chat_template_tool_use"})
_DISABLED_STATUSES: Final = frozenset({404, 501})
_DROP: Final = object()


def public_url(url: str) -> str:
    """The URL without credentials or query (which may hold keys)."""
    parsed = yarl.URL(url)
    return str(parsed.with_user(None).with_password(None).with_query(None))


def without_text(value: Any, key: str | None = None) -> Any:
    """``value`` with every string removed, except format names; lists of only
    strings disappear rather than read as empty."""
    if isinstance(value, str):
        return value if key in _SLOT_TEXT_KEPT else _DROP
    if isinstance(value, dict):
        kept = {k: without_text(v, k) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v is not _DROP}
    if isinstance(value, list):
        items = [without_text(v) for v in value]
        kept_items = [v for v in items if v is not _DROP]
        return kept_items if kept_items or not items else _DROP
    return value


def _parse_json(body: bytes) -> Any:
    # NaN and Infinity become strings: the stream must stay valid JSON.
    return json.loads(body, parse_constant=lambda token: token)


class UpstreamModel:
    """The upstream's own state as last polled; written by the poller only."""

    def __init__(self, kind: str, url: str) -> None:
        self.version = 0
        self._doc: dict[str, Any] = {
            "kind": str(kind),
            "url": public_url(url),
            "status": "unknown",
            "since": None,
            "failures": 0,
            "error": None,
            "health": None,
            "slots": None,
            "slots_summary": None,
            "props": None,
            "models": None,
            "metrics": {"enabled": None, "status": None, "families": None},
            # Written by the sidecar, not polled: prompt tokens each replica
            # reported reusing and evaluating, and the balancer's view of them.
            "prompt_tokens": {},
            "replicas": None,
        }

    @property
    def status(self) -> str:
        return str(self._doc["status"])

    def update(self, **fields: Any) -> None:
        """Replace top-level fields; bumps the version only on a real change."""
        changed = False
        for name, value in fields.items():
            if name not in self._doc:
                raise KeyError(name)
            if self._doc[name] != value:
                self._doc[name] = value
                changed = True
        if changed:
            self.version += 1

    def add_prompt_tokens(self, replica: str, reused: int, evaluated: int) -> None:
        """Prompt tokens one answer from ``replica`` reported (token accounting)."""
        tokens = self._doc["prompt_tokens"]
        counts = tokens.setdefault(replica, {"reused": 0, "evaluated": 0})
        counts["reused"] += reused
        counts["evaluated"] += evaluated
        self.version += 1

    def set_status(self, status: str, error: str | None = None) -> bool:
        """Record the upstream's status; True when it changed."""
        changed = bool(status != self._doc["status"])
        since = round(time.time(), 3) if changed else self._doc["since"]
        self.update(status=status, error=error, since=since)
        return changed

    def snapshot(self) -> dict[str, Any]:
        doc = dict(self._doc)
        doc["prompt_tokens"] = {k: dict(v) for k, v in self._doc["prompt_tokens"].items()}
        return doc

    def __repr__(self) -> str:
        return f"<UpstreamModel v{self.version} {self._doc['kind']} {self.status}>"


@dataclasses.dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    body: bytes


class _UnreachableError(Exception):
    """No HTTP answer at all (refused, reset, timed out, too large)."""


class UpstreamPoller:
    """Polls one upstream on an interval and writes an ``UpstreamModel``."""

    def __init__(
        self,
        model: UpstreamModel,
        url: str,
        kind: str,
        *,
        interval_s: float = 2.0,
        max_backoff_s: float = 30.0,
        timeout_s: float = 5.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        kind = str(kind)  # the manifest's StrEnum or a plain string
        if kind not in KINDS:
            raise ValueError(f"upstream kind must be one of {KINDS}, got {kind!r}")
        self.model = model
        self.base_url = url.rstrip("/")
        self.kind = kind
        self.interval_s = interval_s
        self.max_backoff_s = max(max_backoff_s, interval_s)
        self._timeout_s = timeout_s
        # Says who is asking, so upstream logs (and test fakes) can tell the
        # sidecar's polling from client traffic.
        self._headers = {"User-Agent": "sidecar-poller/0.1", **(headers or {})}
        self._session: aiohttp.ClientSession | None = None
        # Strong reference to the polling task, so it is not collected.
        self._task: asyncio.Task[None] | None = None
        self.failures = 0
        self.polls = 0
        self._metrics_enabled: bool | None = None
        self._metrics_skipped = 0

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """Start polling in the background (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(
                self._run(), name="sidecar-upstream-poller"
            )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:
                # A bug in one poll must not end polling for the process.
                log.state.exception("state.upstream_poll_failed")
            await asyncio.sleep(self.next_delay())

    def next_delay(self) -> float:
        """The interval, doubled per consecutive failure, capped."""
        if self.failures == 0:
            return self.interval_s
        return min(self.max_backoff_s, self.interval_s * 2.0 ** min(self.failures, 30))

    # -- one poll -----------------------------------------------------------------

    async def poll_once(self) -> bool:
        """Poll every endpoint of this kind once; True if the upstream answered."""
        self.polls += 1
        probe = "/v1/models" if self.kind == "openai" else "/health"
        try:
            reply = await self._get(probe)
        except _UnreachableError as exc:
            self._record_down(str(exc))
            return False
        recovered = self.failures > 0 or self.model.status == "unknown"
        self.failures = 0
        self.model.update(failures=0)
        if self.kind == "openai":
            self._record_models(reply)
        else:
            self._record_health(reply)
        if self.kind == "llama.cpp" and reply.status == 200:
            await asyncio.gather(self._poll_slots(), self._poll_props(recovered))
        elif self.kind == "llama.cpp":
            self.model.update(slots=None, slots_summary=None)  # loading: none yet
        if self.kind != "openai":
            await self._poll_metrics(recovered)
        return True

    async def _get(self, path: str) -> _Reply:
        session = self._ensure_session()
        try:
            async with session.get(self.base_url + path) as response:
                body = await response.content.read(MAX_BODY_BYTES + 1)
                if len(body) > MAX_BODY_BYTES:
                    raise _UnreachableError("too_large")
                return _Reply(response.status, body)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _UnreachableError(type(exc).__name__) from exc

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                headers=self._headers,
                connector=aiohttp.TCPConnector(limit=4),
            )
        return self._session

    def _record_down(self, error: str) -> None:
        self.failures += 1
        # Slots of an upstream that does not answer are unknown, not idle.
        self.model.update(
            failures=self.failures, health=None, slots=None, slots_summary=None
        )
        if self.model.set_status("down", error=error):
            log.state.warning(
                "state.upstream_down",
                extra={"url": self.model.snapshot()["url"], "error": error},
            )

    def _record_health(self, reply: _Reply) -> None:
        # llama.cpp answers 503 while it loads the model; vLLM 200 with no body.
        if reply.status == 200:
            status, error = "up", None
        elif reply.status == 503:
            status, error = "loading", None
        else:
            status, error = "error", f"http_{reply.status}"
        try:
            health = _parse_json(reply.body) if reply.body.strip() else None
        except ValueError:
            health = None
        self.model.update(health=health)
        self._set_status(status, error)

    def _record_models(self, reply: _Reply) -> None:
        models = None
        if reply.status == 200:
            with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
                models = [str(m["id"]) for m in _parse_json(reply.body)["data"]]
        self.model.update(models=models)
        if reply.status == 200:
            self._set_status("up", None)
        else:
            self._set_status("error", f"http_{reply.status}")

    def _set_status(self, status: str, error: str | None) -> None:
        if self.model.set_status(status, error=error):
            log.state.info("state.upstream_status", extra={"status": status})

    async def _poll_slots(self) -> None:
        try:
            reply = await self._get("/slots")
            slots = _parse_json(reply.body) if reply.status == 200 else None
        except (_UnreachableError, ValueError):
            slots = None
        if not isinstance(slots, list):
            self.model.update(slots=None, slots_summary=None)
            return
        clean = [without_text(slot) for slot in slots if isinstance(slot, dict)]
        processing = sum(1 for slot in clean if slot.get("is_processing"))
        summary = {"total": len(clean), "processing": processing}
        self.model.update(slots=clean, slots_summary=summary)

    async def _poll_props(self, recovered: bool) -> None:
        due = recovered or self.model.snapshot()["props"] is None
        if not due and self.polls % PROPS_EVERY_POLLS != 0:
            return
        try:
            reply = await self._get("/props")
            props = _parse_json(reply.body) if reply.status == 200 else None
        except (_UnreachableError, ValueError):
            return  # keep the last good props; the next due poll retries
        if isinstance(props, dict):
            self.model.update(
                props={k: v for k, v in props.items() if k not in _PROPS_DROPPED}
            )

    async def _poll_metrics(self, recovered: bool) -> None:
        if self._metrics_enabled is False and not recovered:
            self._metrics_skipped += 1
            if self._metrics_skipped < METRICS_REPROBE_POLLS:
                return
        self._metrics_skipped = 0
        try:
            reply = await self._get("/metrics")
        except _UnreachableError:
            return
        if reply.status in _DISABLED_STATUSES:
            self._set_metrics(False, reply.status, None)
            return
        families = None
        if reply.status == 200:
            # An exposition that does not parse is published as no families.
            with contextlib.suppress(ValueError):
                families = metrics_to_json(reply.body.decode("utf-8", "replace"))
        self._set_metrics(True, reply.status, families)

    def _set_metrics(self, enabled: bool, status: int, families: Any) -> None:
        if enabled != self._metrics_enabled:
            log.state.info(
                "state.upstream_metrics", extra={"enabled": enabled, "status": status}
            )
        self._metrics_enabled = enabled
        self.model.update(
            metrics={"enabled": enabled, "status": status, "families": families}
        )

    def __repr__(self) -> str:
        return (
            f"<UpstreamPoller {self.kind} {self.model.status} "
            f"failures={self.failures} polls={self.polls}>"
        )
