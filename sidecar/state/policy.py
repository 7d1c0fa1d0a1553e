"""The ``policy`` read model: the manifest in force, its digest and reloads.

Owns what a dashboard shows about the manifest: its digest, where it came
from, when it was loaded, the counts of good and refused reloads and the last
refusal's message, and the manifest itself as JSON.
Not here: loading or validating manifests (sidecar/manifest.py), the reload
metric (metrics.py).

Invariants: the published manifest never holds a credential: any key whose
name looks like one (``token``, ``password``, ``secret``, ``api_key``,
``authorization``, ``credentials``) has its value replaced by ``"<redacted>"``,
at any depth. Values that are not JSON (durations as ``timedelta``, paths,
enums) are turned into strings once, at update time.

Known limitations: redaction goes by key name, so a secret stored under an
innocent name (a URL with a password in it, say) is published as written;
manifests should take secrets from the environment.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import time
from collections.abc import Mapping
from typing import Any, Final

REDACTED: Final = "<redacted>"
_SECRET_WORDS: Final = (
    "token",
    "password",
    "passwd",
    "secret",
    "api_key",
    "apikey",
    "authorization",
    "credential",
)
_MAX_ERROR_CHARS: Final = 2000


def _is_secret(key: str) -> bool:
    lowered = key.lower().replace("-", "_")
    return any(word in lowered for word in _SECRET_WORDS)


def to_json_ready(value: Any) -> Any:
    """A manifest value as plain JSON, credentials redacted by key name."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {
            str(k): REDACTED if _is_secret(str(k)) else to_json_ready(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_json_ready(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, enum.Enum):
        return to_json_ready(value.value)
    return str(value)


class PolicyModel:
    """The manifest in force; ``update`` on each good reload."""

    def __init__(
        self, manifest: Mapping[str, Any] | Any, digest: str, source: str | None = None
    ) -> None:
        self.version = 0
        self._reloads = {"ok": 0, "failed": 0}
        self._last_error: dict[str, Any] | None = None
        self._set(manifest, digest, source)

    def update(
        self, manifest: Mapping[str, Any] | Any, digest: str, source: str | None = None
    ) -> None:
        """A new manifest is in force (a reload that validated)."""
        self._set(manifest, digest, source)
        self._reloads["ok"] += 1
        self.version += 1

    def record_reload_failure(self, message: str) -> None:
        """A reload was refused; the old manifest stays in force."""
        self._reloads["failed"] += 1
        self._last_error = {
            "message": message[:_MAX_ERROR_CHARS],
            "at": round(time.time(), 3),
        }
        self.version += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "digest": self._digest,
            "source": self._source,
            "loaded_at": self._loaded_at,
            "reloads": dict(self._reloads),
            "last_error": dict(self._last_error) if self._last_error else None,
            # to_json_ready built a private tree; copy so the hub's base is ours.
            "manifest": to_json_ready(self._manifest),
        }

    def _set(
        self, manifest: Mapping[str, Any] | Any, digest: str, source: str | None
    ) -> None:
        self._manifest = to_json_ready(manifest)
        self._digest = digest
        self._source = source
        self._loaded_at = round(time.time(), 3)

    def __repr__(self) -> str:
        return f"<PolicyModel v{self.version} digest={self._digest[:12]}>"
