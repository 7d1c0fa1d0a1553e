"""Blocking calls in worker threads that a cancelled request cannot break.

Owns ``in_thread``: run a blocking call in the default executor and, when
the awaiting task is cancelled (aiohttp cancels a handler whose client
went away), keep waiting for the thread before letting the cancellation
through. Not here: the long hashing jobs, which have their own executors
(verify.py, scan.py).

Why: a thread cannot be stopped. Without the wait, the handler's ``finally``
would close a descriptor the thread is still reading (the number may be
reused by another open file meanwhile), or drop a descriptor the thread
is about to return; ``cleanup`` releases such a result.

Invariants: the cancellation is always re-raised; ``cleanup`` runs at most
once, only on a result produced after the cancellation arrived.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def _keep(_: object) -> None:
    return None


async def in_thread(
    fn: Callable[..., T], *args: object, cleanup: Callable[[T], None] = _keep
) -> T:
    """``fn(*args)`` in a worker thread, safe to cancel."""
    future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        if not future.cancelled() and future.exception() is None:
            cleanup(future.result())
        raise
