"""Digests of artifact bytes, and hashing a file descriptor into one.

Owns the ``Digest`` type (a lower-case sha256 hex string, validated on
construction), the one place a client-supplied string becomes a digest
(``Digest.parse``), and ``hash_fd``, which every other module calls to hash
a file: the index scan, the verification before serving and the CLI.
Not here: which file a digest names (index.py), when to hash (verify.py).

Invariants: a ``Digest`` always matches ``^[0-9a-f]{64}$`` in full (ASCII
only; upper-case hex, other Unicode digits and a trailing newline are all
refused, which ``re.match`` with ``$`` would have let through). ``hash_fd``
reads through the descriptor with ``pread`` at explicit offsets, so it
neither depends on nor moves the file position, and it reports the
fingerprint the file had before and after the read; a caller trusts the
digest only when the two agree.

Known limitations: sha256 only; an artifact named by another algorithm
(``sha512:``) is not served here.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Self

# Large reads keep the per-call overhead negligible; hashlib releases the GIL
# for updates this size, so hashing threads do not stall the event loop.
CHUNK_BYTES: Final = 4 * 1024 * 1024

_DIGEST_RE: Final = re.compile(r"[0-9a-f]{64}")

Progress = Callable[[int], None]


class Digest(str):
    """A sha256 in lower-case hex; ``short`` is the 12-character log form."""

    __slots__ = ()

    def __new__(cls, text: str) -> Self:
        if not isinstance(text, str) or not _DIGEST_RE.fullmatch(text):
            raise ValueError("a digest is 64 lower-case hex characters")
        return super().__new__(cls, text)

    @classmethod
    def parse(cls, text: str) -> Digest | None:
        """The digest ``text`` spells, or None when it is not exactly one."""
        return cls(text) if _DIGEST_RE.fullmatch(text) else None

    @property
    def short(self) -> str:
        return self[:12]

    @property
    def etag(self) -> str:
        """The strong entity tag for these bytes (RFC 9110 section 8.8.3)."""
        return f'"{self}"'


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What a file's metadata says about its bytes, for change detection.

    ``ctime_ns`` is the one field no unprivileged call can set: a write that
    restores the old mtime with ``os.utime`` still moves ctime forward.
    """

    dev: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Fingerprint:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True, slots=True)
class HashResult:
    """A digest and the fingerprints seen around the read that produced it."""

    digest: Digest
    before: Fingerprint
    after: Fingerprint
    nbytes: int

    @property
    def stable(self) -> bool:
        """The file did not change while it was read, so the digest holds."""
        return self.before == self.after and self.nbytes == self.before.size


def fingerprint_fd(fd: int) -> Fingerprint | None:
    """The open file's fingerprint, or None when it is not a regular file."""
    st = os.fstat(fd)
    return Fingerprint.of(st) if stat.S_ISREG(st.st_mode) else None


def hash_fd(fd: int, progress: Progress | None = None) -> HashResult:
    """Hash an open regular file from offset 0 to its end; blocking."""
    before = fingerprint_fd(fd)
    if before is None:
        raise OSError("not a regular file")
    hasher = hashlib.sha256()
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    offset = 0
    while True:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            break
        hasher.update(view[:n])
        offset += n
        if progress is not None:
            progress(n)
    after = fingerprint_fd(fd)
    if after is None:
        raise OSError("not a regular file")
    return HashResult(Digest(hasher.hexdigest()), before, after, offset)
