"""Prometheus text exposition to JSON, for republishing an upstream's metrics.

Owns the shape of the ``upstream.metrics.families`` document: one entry per
metric family with its type, help text and samples (name, labels, value).
Parsing is ``prometheus_client``'s own parser; nothing here reads the text
format by hand.
Not here: fetching (poller.py), the sidecar's own metrics (metrics.py).

Invariants: the result is plain JSON: NaN and infinities become the strings
``"NaN"``, ``"+Inf"`` and ``"-Inf"`` (as Prometheus spells them), because a
browser's ``JSON.parse`` rejects the bare tokens; integral values within the
exact range of a double become integers, which keeps patches short.
Timestamps and exemplars are dropped.

Known limitations: counter families are named as ``prometheus_client``
names them, without the ``_total`` suffix (the samples keep it). A malformed
exposition raises ``ValueError``; the caller records it and publishes none.
"""

from __future__ import annotations

import math
from typing import Any, Final

from prometheus_client.parser import text_string_to_metric_families

_EXACT_INT_LIMIT: Final = 2**53


def json_number(value: float) -> int | float | str:
    """A sample value as JSON: an int when exact, a string when not finite."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < _EXACT_INT_LIMIT:
        return int(value)
    return value


def metrics_to_json(text: str) -> dict[str, Any]:
    """Parse a Prometheus exposition into ``{family: {type, help, samples}}``."""
    families: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        samples = [
            {
                "name": sample.name,
                "labels": dict(sample.labels),
                "value": json_number(float(sample.value)),
            }
            for sample in family.samples
        ]
        families[family.name] = {
            "type": family.type,
            "help": family.documentation,
            "samples": samples,
        }
    return families
