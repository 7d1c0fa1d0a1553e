"""Live state: read models, their delta streams over SSE, and the dashboard.

Producers (the proxy, the cache, the coalescer, the artifact index) update
read models with cheap, synchronous calls; a ``StateHub`` publishes them once
per coalescing window as RFC 6902 deltas to every subscriber of
``GET /state/stream``; ``views.attach`` puts the HTTP side on the admin app.
Not here: the admin application itself (sidecar/app.py), Prometheus metrics
(sidecar/metrics.py).

Modules: models.py (cache, coalescing, artifacts), traffic.py (route
latencies), policy.py (the manifest in force), poller.py (the upstream's own
state), hub.py (publishing, replay, subscriptions), subscriber.py (one stream's
queue), delta.py (compact patches), sse.py (event framing),
views.py (HTTP handlers), promjson.py (Prometheus text to JSON).

Known limitations: see each module; every read model is per process and
starts empty on restart.
"""

from sidecar.state.hub import (
    HubClosedError,
    HubError,
    HubFullError,
    StateHub,
    StreamStart,
    UnknownModelError,
)
from sidecar.state.models import ArtifactsModel, CacheModel, CoalescingModel, ReadModel
from sidecar.state.policy import PolicyModel
from sidecar.state.poller import UpstreamModel, UpstreamPoller
from sidecar.state.subscriber import Subscriber
from sidecar.state.traffic import RoutesModel
from sidecar.state.views import StateViews, attach, routes

__all__ = [
    "ArtifactsModel",
    "CacheModel",
    "CoalescingModel",
    "HubClosedError",
    "HubError",
    "HubFullError",
    "PolicyModel",
    "ReadModel",
    "RoutesModel",
    "StateHub",
    "StateViews",
    "StreamStart",
    "Subscriber",
    "UnknownModelError",
    "UpstreamModel",
    "UpstreamPoller",
    "attach",
    "routes",
]
