"""The environment signature: what, besides the request, decides an answer.

Owns: reading the upstream's identity (the model it serves, its build, its
defaults) and turning it, with the manifest fields that change output, into
the signature every action key includes. When the upstream swaps its model
or build, the signature changes, so answers of the old model are never
served for the new one; they simply stop matching and age out.

Sources: llama.cpp's ``/props`` (model path and type, build, chat template,
special tokens, default sampling parameters) plus ``/v1/models`` (ids and
model metadata); other kinds, ``/v1/models`` alone. Fields that change while
the model does not (``is_sleeping``, slot counts, UI settings) are left out.

Until the identity has been read once, the signature is None and requests
are forwarded uncached (reason ``environment_unknown``): a cache that cannot
name the model behind an answer must not serve it. Refreshed on every
readiness probe (``upstream.health_interval``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Final

from sidecar import log
from sidecar.errors import SidecarError
from sidecar.upstream import Upstream

_PROBE: Final = [(b"User-Agent", b"sidecar-health/0.1"), (b"Accept", b"application/json")]
_PROPS_FIELDS: Final = (
    "model_path", "model_ftype", "build_info", "chat_template", "bos_token",
    "eos_token", "modalities",
)


async def _get_json(upstream: Upstream, path: str) -> Any:
    resp = await upstream.request("GET", path, list(_PROBE), probe=True)
    async with resp:
        body = b"".join([chunk async for chunk in resp.iter_chunks()])
    if resp.status != 200:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def _models_identity(doc: Any) -> Any:
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        return None
    return sorted(
        (
            {"id": m.get("id"), "meta": m.get("meta")}
            for m in doc["data"]
            if isinstance(m, dict)
        ),
        key=lambda m: str(m["id"]),
    )


def _props_identity(doc: Any) -> Any:
    if not isinstance(doc, dict):
        return None
    ident = {k: doc.get(k) for k in _PROPS_FIELDS}
    defaults = doc.get("default_generation_settings")
    if isinstance(defaults, dict):
        ident["defaults"] = defaults.get("params")
    return ident


class Environment:
    """The current upstream identity and the signature derived from it."""

    def __init__(self, kind: str, output_fields: dict[str, Any]) -> None:
        self.kind = kind
        self.output_fields = output_fields
        self.identity: dict[str, Any] | None = None
        self.signature: bytes | None = None

    def set_output_fields(self, fields: dict[str, Any]) -> None:
        """Manifest fields that change output (prompt_cache.mode, ...)."""
        self.output_fields = fields
        self._sign()

    def _sign(self) -> None:
        if self.identity is None:
            self.signature = None
            return
        doc = {"kind": self.kind, "upstream": self.identity, "policy": self.output_fields}
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
        self.signature = hashlib.sha256(text.encode()).digest()

    def set_identity(self, identity: dict[str, Any] | None) -> None:
        if identity != self.identity:
            if self.identity is not None:
                log.cache.info("cache.environment_changed")
            self.identity = identity
        self._sign()

    async def refresh(self, upstream: Upstream) -> bool:
        """Read the upstream's identity; False (and no change) if it cannot."""
        try:
            models = _models_identity(await _get_json(upstream, "/v1/models"))
            props = None
            if self.kind == "llama.cpp":
                props = _props_identity(await _get_json(upstream, "/props"))
        except SidecarError:
            return False
        if models is None and props is None:
            return False
        self.set_identity({"models": models, "props": props})
        return True
