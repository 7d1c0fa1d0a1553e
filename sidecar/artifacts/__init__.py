"""Digest-addressed artifacts: model files served by their sha256.

Model weights are large and immutable, and their sha256 names them exactly.
This package serves them at ``/admin/models/by-hash/{sha256}`` (data and
admin ports) with validators that let every client and cache keep them
forever and resume interrupted downloads, and keeps blobs fetched through
digest-addressed upstream paths (``artifacts.upstream_patterns``) in a local
store. A digest is trusted only once computed here.

Modules: ``service`` (``Artifacts``, the object the app wires in),
``serve`` (the HTTP endpoint), ``validators`` (conditional and range rules,
pure), ``sendfile`` (zero-copy bodies), ``index`` (the persisted digest
index), ``scan`` (walking and hashing the folders), ``verify`` (when to
re-hash; quarantine), ``paths`` (the folders and the only way files are
opened), ``store`` (the content-addressed store), ``ingest`` (upstream
blobs), ``model`` (the ``artifacts`` read model and metric callbacks),
``cli`` (``sidecar artifacts index``).

The guarantee (what a 200 or 206 body can contain)
----------------------------------------------------

Every body byte is read from a descriptor that was opened through
``Roots.open`` (inside the configured folders or the store, symlinks
resolved and checked) and whose fingerprint ``(dev, inode, size, mtime_ns,
ctime_ns)``, taken by ``fstat`` after the open, equals the one recorded by
a full sha256 of that file that produced the requested digest; and that
full hash ran in this process (``verify_on_first_serve``, on by default)
less than ``reverify_after_s`` ago (7 days by default). Otherwise the file
is re-hashed before the first byte is sent; if the hash disagrees the
entry is quarantined (logged, counted, withdrawn; a store blob is moved to
``quarantine/``) and the request gets 404, or the next file with the same
digest.

What that catches: any change made through the filesystem between the
hash and the open, because a write moves mtime and ctime, and restoring
mtime with ``os.utime`` still moves ctime, which only the kernel sets; and
corruption below the filesystem (bit rot, raw device writes) that keeps
the metadata, as long as it happened before this process's first body
answer for the file or its last re-verification. Upstream blobs are hashed
while they arrive and published only when they match.

What it does not catch: a write that lands while a body is being sent (the
bytes already sent cannot be recalled; the next request re-hashes); a
write within the same filesystem timestamp tick (a few milliseconds) as
the ``fstat`` that closed the hash, which leaves mtime and ctime as
recorded; corruption below the filesystem after a verification, until the
next one (``reverify_after_s``); someone who can set the system clock back
to forge ctime. A 206 is not verified on its own (that would need a tree
hash): it is cut from a file the rule above accepted as a whole. HEAD and
416 carry no body and need only the fingerprint check; a 304 is answered
from the index record without opening the file (it vouches for the
client's copy, and the bytes under a digest cannot change).
"""

from sidecar.artifacts.digest import Digest
from sidecar.artifacts.model import ArtifactCounters, ArtifactsModel
from sidecar.artifacts.service import ArtifactOptions, Artifacts

__all__ = [
    "ArtifactCounters",
    "ArtifactOptions",
    "Artifacts",
    "ArtifactsModel",
    "Digest",
]
