"""An audit hook that records every file ``open`` while a test asks it to.

``sys.addaudithook`` sees each ``open`` (the builtin and ``os.open``) with
its path, in every thread. Hooks cannot be removed, so this one is
installed once per process and does nothing outside ``recording_opens()``.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_lock = threading.Lock()
_recording: list[list[str]] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _recording and isinstance(args[0], (str, bytes)):
        with _lock:
            for sink in _recording:
                sink.append(os.fsdecode(args[0]))


# Module import runs once per process, so the hook is added once.
sys.addaudithook(_audit)


@contextmanager
def recording_opens() -> Iterator[list[str]]:
    """Every path passed to ``open`` (builtin or ``os.open``) while inside."""
    sink: list[str] = []
    with _lock:
        _recording.append(sink)
    try:
        yield sink
    finally:
        with _lock:
            _recording.remove(sink)
