"""sidecar: a performance-guardrail reverse proxy for LLM inference servers.

The daemon sits beside one inference server (llama.cpp's ``llama-server``,
vLLM, any OpenAI-compatible server) and forwards every request to it, adding
guardrails on the way: prompt reuse, an action cache, digest-addressed
artifacts, request coalescing and live state streams. The outside contract
(ports, command line, headers, manifest, metrics) is fixed in DESIGN.md.

Glossary, used in exactly these senses across the package:

upstream
    the inference server a route forwards to (``Upstream``, ``UpstreamError``).
route
    a manifest entry matching method and path to a policy; ``route.name`` is
    the metric label.
action key
    what a request asks for: the route, the canonical body, the environment
    signature, the significant headers and the scope, hashed (``ActionKey``).
digest
    the sha256 of stored bytes; immutable by construction (``Digest``).
tier
    one cache stage: ``memory`` (W-TinyLFU) or ``disk`` (LevelDB and zstd).
scope
    who may receive a stored result: ``shared``, ``tenant`` or ``none``.
manifest
    the YAML policy file under ``policies/`` (``Manifest``, ``load_manifest``).
quick path, fingerprint
    the data port answering a repeated memory hit before the pipeline runs
    (``cache/hits.py``), and the keyed hash of a request it recognises it by.
leader, follower
    the singleflight roles of coalesced requests.
window, probation, protected, admission
    the W-TinyLFU segments and its admission decision.
delta
    one RFC 6902 JSON Patch document, sent as one SSE event.
"""

__version__ = "0.1.0"
