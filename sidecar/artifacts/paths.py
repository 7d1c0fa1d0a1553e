"""The folders artifacts may come from, and the only way a file in them is opened.

Owns ``Roots`` (the configured ``artifacts.dirs`` plus the sidecar's own
content-addressed store, each resolved once) and ``Roots.open``, the single
function through which the serving path and the index open an artifact.
Not here: which digest a path holds (index.py).

Invariants: no path that comes from a client ever reaches this module;
paths come from walking the roots. ``open`` refuses, before any ``open``
call, a path whose fully resolved form (every symlink followed) is not
inside a root or differs from the path given (a symlink was swapped in
since the path was recorded); it opens with ``O_NOFOLLOW``; and where
``/proc/self/fd`` exists it reads back what the kernel actually opened and
refuses that too when it lies outside the roots, which closes the window
between the check and the open.

Known limitations: a symlink swapped in between the check and the open
makes the kernel open the target for the instant before the read-back
refuses it; no byte of it is read or served. Without ``/proc`` (not Linux)
that read-back is skipped and the window stays open to anyone who can
write into a configured folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

_OPEN_FLAGS: Final = (
    os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
)
_PROC_FD: Final = "/proc/self/fd"


class OutsideRootsError(OSError):
    """A path resolves outside every configured folder; it is never opened."""


@dataclass(frozen=True, slots=True)
class Roots:
    """Resolved folders: ``dirs`` from the manifest and the ``store``."""

    dirs: tuple[str, ...]
    store: str

    @classmethod
    def resolve(cls, dirs: Iterable[str], store: str) -> Roots:
        resolved = tuple(dict.fromkeys(os.path.realpath(d) for d in dirs))
        return cls(resolved, os.path.realpath(store))

    def all(self) -> tuple[str, ...]:
        return (*self.dirs, self.store)

    def root_of(self, path: str) -> str | None:
        """The root a resolved path lies in (the deepest one), or None."""
        best: str | None = None
        for root in self.all():
            if _inside(path, root) and (best is None or len(root) > len(best)):
                best = root
        return best

    def contains(self, path: str) -> bool:
        return self.root_of(path) is not None

    def in_store(self, path: str) -> bool:
        return self.root_of(path) == self.store

    def open(self, path: str) -> int:
        """A read-only descriptor for ``path``, a resolved path inside a root."""
        if os.path.realpath(path) != path or not self.contains(path):
            raise OutsideRootsError(f"not inside the artifact folders: {path}")
        fd = os.open(path, _OPEN_FLAGS)
        try:
            opened = _opened_path(fd)
            if opened is not None and not self.contains(opened):
                raise OutsideRootsError(f"opened outside the folders: {opened}")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def walk(self, root: str) -> Iterator[str]:
        """Resolved paths of the files under ``root`` that lie inside the roots.

        Directory symlinks are not followed (their targets, when inside, are
        walked as themselves); file symlinks are resolved and kept only when
        the target is inside a root. A file whose deepest root is another
        one (the store inside a model folder, a link into another folder) is
        left to that root's walk. Yields each resolved path once.
        """
        seen: set[str] = set()
        for folder, subdirs, files in os.walk(root, followlinks=False):
            subdirs.sort()
            for name in sorted(files):
                real = os.path.realpath(os.path.join(folder, name))
                if real not in seen and self.root_of(real) == root:
                    seen.add(real)
                    yield real


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _opened_path(fd: int) -> str | None:
    try:
        return os.readlink(f"{_PROC_FD}/{fd}")
    except OSError:
        return None
