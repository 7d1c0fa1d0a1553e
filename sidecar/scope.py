"""The caller's scope: who may receive a stored answer.

Owns: the server secret and the scope of a request. A scope is an HMAC-
SHA256 of the caller's credential (the first of ``scopes.credential_headers``
present on the request) under the server secret, so entries are never shared
across credentials, and a stored key or a log line never carries the
credential itself. A route marked ``cache.public`` uses the one scope
``shared``. A request with no credential gets the scope of the empty
credential: all anonymous callers share, as they present nothing to tell
them apart.

The secret comes from ``scopes.secret`` when set, else from
``<data dir>/scope.secret``, created on first start with 32 random bytes and
mode 0600. Losing that file only makes every stored entry unreachable (a
cold cache), never wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

SHARED: Final = "shared"
SECRET_FILE: Final = "scope.secret"


def load_secret(configured: str, data_dir: Path) -> bytes:
    """The configured secret, or the one kept in the data dir (made if absent)."""
    if configured:
        return configured.encode()
    path = data_dir / SECRET_FILE
    try:
        data = path.read_bytes()
        if len(data) >= 32:
            return data
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    data = secrets.token_bytes(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return data


class Scopes:
    """Computes scopes; holds the secret and the credential header names."""

    def __init__(self, secret: bytes, credential_headers: Sequence[str]) -> None:
        self._secret = secret
        self.credential_headers = tuple(h.lower() for h in credential_headers)

    def credential(self, headers: Mapping[str, str]) -> str:
        for name in self.credential_headers:
            value = headers.get(name)
            if value:
                return value
        return ""

    def scope(self, headers: Mapping[str, str], *, public: bool = False) -> str:
        """The scope of a request with these header fields."""
        if public:
            return SHARED
        return self.hmac(self.credential(headers))

    def hmac(self, text: str, purpose: str = "scope") -> str:
        """Hex HMAC-SHA256 of ``text`` for one purpose (scope, vLLM salt...)."""
        msg = purpose.encode() + b"\0" + text.encode("utf-8", "surrogateescape")
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()
