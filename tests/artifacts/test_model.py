"""The ``artifacts`` read model and its metric callbacks."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from sidecar.artifacts import ArtifactCounters, ArtifactsModel


def test_model_every_mutation_bumps_version() -> None:
    """Each producer call moves ``version``, so the hub republishes."""
    model = ArtifactsModel()
    seen = [model.version]
    changes: list[Callable[[], None]] = [
        lambda: model.set_index(3, 300),
        lambda: model.served("full", 10),
        lambda: model.quarantined("/m", "a" * 64, "b" * 64, "corrupt"),
        lambda: model.hashed(5),
        model.ingest_started,
        lambda: model.ingest_finished("stored"),
    ]
    for change in changes:
        change()
        assert model.version > seen[-1]
        seen.append(model.version)


def test_model_snapshot_shares_nothing_mutable() -> None:
    """A snapshot does not change when the model does."""
    model = ArtifactsModel()
    model.served("partial", 7)
    snap = model.snapshot()
    model.served("partial", 7)
    assert snap["served"]["partial"] == 1 and snap["served"]["bytes"] == 7
    assert model.snapshot()["served"]["partial"] == 2


def test_model_quarantine_recent_uses_short_digests() -> None:
    """Quarantine entries carry 12-character digests and the reason."""
    model = ArtifactsModel()
    model.quarantined("/models/m.bin", "a" * 64, "b" * 64, "modified")
    entry = model.snapshot()["quarantined"]["recent"][0]
    assert (entry["digest"], entry["actual"], entry["reason"]) == (
        "a" * 12,
        "b" * 12,
        "modified",
    )


def test_model_counters_fed_with_labels() -> None:
    """Producer calls feed the Prometheus callbacks with their label value."""
    got: list[tuple[str, object]] = []
    model = ArtifactsModel(
        ArtifactCounters(
            requests=lambda o: got.append(("requests", o)),
            bytes_served=lambda n: got.append(("bytes", n)),
            quarantined=lambda r: got.append(("quarantined", r)),
            hashed_bytes=lambda n: got.append(("hashed", n)),
            ingests=lambda o: got.append(("ingests", o)),
        )
    )
    model.served("partial", 9)
    model.quarantined("/m", "a" * 64, "b" * 64, "corrupt")
    model.hashed(4)
    model.ingest_started()
    model.ingest_finished("mismatch")
    assert got == [
        ("requests", "partial"),
        ("bytes", 9),
        ("quarantined", "corrupt"),
        ("hashed", 4),
        ("ingests", "mismatch"),
    ]


async def test_model_counters_from_thread_run_on_loop() -> None:
    """A callback fed from a hashing thread runs on the event loop thread."""
    loop = asyncio.get_running_loop()
    ran_on: list[int] = []
    done = asyncio.Event()

    def hashed(_: int) -> None:
        ran_on.append(threading.get_ident())
        done.set()

    model = ArtifactsModel(ArtifactCounters(hashed_bytes=hashed))
    model.bind_loop(loop)
    await asyncio.to_thread(model.hashed, 100)
    await asyncio.wait_for(done.wait(), 5)
    assert ran_on == [threading.get_ident()]
