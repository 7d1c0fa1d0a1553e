"""The data port's quick path for memory hits (sidecar/cache/hits.py).

``QuickHits`` runs here with a real ``WTinyLFU[Entry]``, real ``Request``
objects on a stand-in connection, a stand-in environment and a clock the
test moves: what the fingerprint reads and ignores, the bytes of a quick
answer (checked against the pipeline's relay of the same entry), every case
passed on to the pipeline, the bound on fingerprints, and the accounting
handed to ``on_hits``.
"""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace
from typing import Any

import pytest

from sidecar.cache.hits import QuickHits
from sidecar.cache.stage import CachedReply
from sidecar.cache.store import Entry
from sidecar.cache.tinylfu import WTinyLFU
from sidecar.http import HttpVersion, HttpVersion10, HttpVersion11, Request, http_date
from sidecar.http.response import Response, StreamResponse

Fields = tuple[tuple[bytes, bytes], ...]
TARGET = "/v1/chat/completions"
BODY = b'{"messages":[],"temperature":0}'
BASE: Fields = ((b"Host", b"a"), (b"User-Agent", b"ua/1"), (b"Authorization", b"t1"))
STORED = (("Content-Type", "application/json"), ("X-Upstream", "u1"))
KEY = b"k" * 32
ONE_WRITE_BYTES = 1024 * 1024  # proxy._ONE_WRITE_BYTES


def _request(fields: Fields = BASE, *, body: bytes = BODY, method: str = "POST",
             target: str = TARGET, version: HttpVersion = HttpVersion11,
             keep_alive: bool = True, complete: bool = True) -> Request:
    # What a Request, its Body and a response head read from a connection.
    conn: Any = SimpleNamespace(
        body_buffered=lambda delta: None, loop=None, peer="127.0.0.1", closing=False
    )
    length = len(body) or None
    request = Request(conn, method, target, version, fields, length, False, keep_alive)
    # What the reader counts against the head limit: name, ": ", value, CRLF.
    request.field_bytes = sum(len(n) + len(v) + 4 for n, v in fields)
    if body:
        request.content.feed(body if complete else body[:-1])
        if complete:
            request.content.feed_eof()
    return request


def _ask(hits: QuickHits, request: Request) -> bytes | None:
    """What the server does: offer a request that has fully arrived, with its body."""
    body = request.content.whole()
    assert body is not None, "the server offers only requests that have arrived"
    return hits.answer(request, body)


class _Rig:
    """A QuickHits over a real memory tier, with its clock and on_hits calls."""

    def __init__(self, *, max_entries: int = 100) -> None:
        self.now = 50_000.0
        self.memory: WTinyLFU[Entry] = WTinyLFU(10_000)
        self.env: Any = SimpleNamespace(signature=b"sig-1")
        self.calls: list[tuple[Any, ...]] = []
        self.hits = QuickHits(
            self.memory, environment=self.env,
            credential_headers=("Authorization", "X-Api-Key"),
            on_hits=lambda *args: self.calls.append(args), max_entries=max_entries,
            max_header_bytes=8192, clock=lambda: self.now,
        )
        self.hits.reset(("X-Tenant",))

    def put(self, key: bytes = KEY, *, body: bytes = b'{"ok":1}', **kw: Any) -> Entry:
        kw.setdefault("headers", STORED)
        kw.setdefault("created", self.now)
        kw.setdefault("ttl_s", 60.0)
        entry = Entry.create(body, **kw)
        self.memory.put(key, entry, weight=entry.size)
        return entry

    def store(self, request: Request, key: bytes = KEY, route: str = "chat",
              **kw: Any) -> Entry:
        """What the pipeline does on a store: the memory tier, then remember."""
        entry = self.put(key, **kw)
        body = request.content.whole()
        assert body is not None and self.env.signature is not None
        self.hits.remember(request, body, route, key, self.env.signature)
        return entry

    def hit(self, **request_kw: Any) -> bytes:
        data = _ask(self.hits, _request(**request_kw))
        assert data is not None
        return data


def _parse(data: bytes) -> tuple[bytes, list[tuple[str, str]], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    fields = [(n, v) for n, _, v in (line.partition(": ") for line in lines)]
    return status.encode(), fields, body


def _relay(entry: Entry, age: int, request: Request) -> bytes:
    """The pipeline's bytes for a memory hit of ``entry`` (proxy.Proxy._relay)."""
    reply = CachedReply(entry, {"X-Sidecar-Cache": "hit", "Age": str(age)})
    body = reply.complete_body()
    assert body is not None
    conn: Any = request._conn
    status, reason, headers = reply.status, reply.reason, reply.headers
    if len(body) <= ONE_WRITE_BYTES:
        resp = Response(status=status, reason=reason, headers=headers, body=body)
        return resp._head(request, conn, len(body)) + body
    # Larger bodies: a StreamResponse told the length, head written first.
    stream = StreamResponse(status=status, reason=reason, headers=headers)
    stream.content_length = reply.content_length
    return stream._head(request, conn, None) + body


def _undated(data: bytes) -> bytes:
    head, _, body = data.partition(b"\r\n\r\n")
    return re.sub(rb"(?im)^date: [^\r]*", b"Date: -", head) + b"\r\n\r\n" + body


# -- the fingerprint -----------------------------------------------------------


def test_fingerprint_other_fields_and_order_differ_equal() -> None:
    """Fields the key does not read, and the order of fields, do not matter."""
    hits = _Rig().hits
    a = _request(((b"Host", b"a"), (b"User-Agent", b"x"), (b"Authorization", b"t1"),
                  (b"X-Tenant", b"acme")))
    b = _request(((b"X-Tenant", b"acme"), (b"authorization", b"t1"), (b"Host", b"b"),
                  (b"User-Agent", b"y"), (b"Accept", b"*/*")))
    assert hits.fingerprint(a, BODY) is not None
    assert hits.fingerprint(a, BODY) == hits.fingerprint(b, BODY)


@pytest.mark.parametrize(
    ("change", "value"),
    [("method", "PUT"), ("target", TARGET + "?x=1"), ("body", b"{}"),
     ("credential", b"t2"), ("significant", b"other")],
)
def test_fingerprint_part_changes_differs(change: str, value: Any) -> None:
    """Method, target, body, credential and significant values are all read."""
    hits = _Rig().hits
    fields = (*BASE, (b"X-Tenant", b"acme"))
    base = hits.fingerprint(_request(fields), BODY)
    if change == "credential":
        fields = ((b"Authorization", value), (b"X-Tenant", b"acme"))
    elif change == "significant":
        fields = (*BASE, (b"X-Tenant", value))
    other = _request(
        fields,
        method=value if change == "method" else "POST",
        target=value if change == "target" else TARGET,
    )
    assert hits.fingerprint(other, value if change == "body" else BODY) != base


def test_fingerprint_empty_credential_uses_next_header() -> None:
    """The credential is the first credential field, in configured order, set."""
    hits = _Rig().hits

    def fp(*fields: tuple[bytes, bytes]) -> bytes | None:
        return hits.fingerprint(_request(fields), BODY)

    auth, key = b"Authorization", b"X-Api-Key"
    # The first of repeated fields counts, as a CIMultiDict lookup gives it.
    assert fp((auth, b"a"), (auth, b"z")) != fp((auth, b"b"), (auth, b"z"))
    assert fp((auth, b""), (key, b"k1")) == fp((key, b"k1"))
    assert fp((auth, b""), (key, b"k1")) != fp((auth, b""), (key, b"k2"))
    # Authorization comes first in the configuration, wherever it is sent.
    assert fp((key, b"k1"), (auth, b"a")) == fp((auth, b"a"), (key, b"k2"))
    assert fp((key, b"k1"), (auth, b"a")) != fp((key, b"k1"))


def test_fingerprint_significant_fields_come_from_reset() -> None:
    """Only the fields given to reset are significant."""
    hits = _Rig().hits
    a = _request((*BASE, (b"X-Region", b"eu")))
    b = _request((*BASE, (b"X-Region", b"us")))
    assert hits.fingerprint(a, BODY) == hits.fingerprint(b, BODY)
    hits.reset(("X-Region",))
    assert hits.fingerprint(a, BODY) != hits.fingerprint(b, BODY)


@pytest.mark.parametrize("name", [b"Cache-Control", b"cache-control", b"CACHE-control"])
def test_fingerprint_cache_control_present_none(name: bytes) -> None:
    """A request with a Cache-Control field, in any case, is never fingerprinted."""
    request = _request((*BASE, (name, b"max-age=5")))
    assert _Rig().hits.fingerprint(request, BODY) is None


def test_fingerprint_over_max_header_bytes_none() -> None:
    """Fields over max_header_bytes (name + value + 4 each) pass the request on."""
    hits = _Rig().hits
    request = _request()
    hits.max_header_bytes = sum(len(n) + len(v) + 4 for n, v in BASE)
    assert hits.fingerprint(request, BODY) is not None
    hits.max_header_bytes -= 1
    assert hits.fingerprint(request, BODY) is None


def test_fingerprint_other_instance_differs() -> None:
    """Each QuickHits keys its MAC with its own secret."""
    request = _request()
    assert _Rig().hits.fingerprint(request, BODY) != _Rig().hits.fingerprint(
        request, BODY
    )


# -- the answer ----------------------------------------------------------------


def test_answer_remembered_hit_returns_whole_answer() -> None:
    """A remembered hit is answered: status, fields, Age, length, Date, body."""
    rig = _Rig()
    entry = rig.store(_request(), body=b'{"answer":42}')
    rig.now += 7.9
    status, fields, body = _parse(rig.hit())
    assert status == b"HTTP/1.1 200 "
    assert fields[:5] == [*STORED, ("X-Sidecar-Cache", "hit"), ("Age", "7"),
                          ("Content-Length", str(len(entry.body)))]
    assert len(fields) == 6 and fields[5][0] == "Date"
    assert re.fullmatch(r"\w{3}, \d\d \w{3} \d{4} [\d:]{8} GMT", fields[5][1])
    assert body == entry.body


@pytest.mark.parametrize(
    ("stored", "size"),
    [(STORED, 9), ((*STORED, ("Date", "Mon, 01 Jan 2024 00:00:00 GMT")), 9),
     ((("age", "300"), *STORED, ("x-sidecar-cache", "miss"), ("Age", "9")), 9),
     ((("Content-Length", "999"), *STORED, ("Transfer-Encoding", "chunked")), 9),
     (STORED, ONE_WRITE_BYTES + 1), ((*STORED, ("Date", "x")), ONE_WRITE_BYTES + 1)],
    ids=["plain", "dated", "upstream-age", "framing", "large", "large-dated"],
)
def test_answer_same_bytes_as_relay(
    stored: tuple[tuple[str, str], ...], size: int
) -> None:
    """A quick answer is the pipeline's relay of the same hit, Date value aside."""
    rig = _Rig()
    entry = rig.store(_request(), headers=stored, body=b"d" * size)
    rig.now += 3.2
    assert _undated(rig.hit()) == _undated(_relay(entry, 3, _request()))


@pytest.mark.parametrize(
    ("stored", "sent"),
    [((("age", "300"), ("Content-Type", "t"), ("x-sidecar-cache", "miss"),
       ("Age", "9")),
      [("Age", "0"), ("Content-Type", "t"), ("X-Sidecar-Cache", "hit")]),
     ((("Content-Length", "999"), ("Transfer-Encoding", "chunked"), ("X-A", "1")),
      [("X-A", "1"), ("X-Sidecar-Cache", "hit"), ("Age", "0")])],
    ids=["age-and-cache-in-place", "framing-dropped"],
)
def test_answer_stored_fields_set_over_once(
    stored: tuple[tuple[str, str], ...], sent: list[tuple[str, str]]
) -> None:
    """Stored Age/X-Sidecar-Cache are set in place; stored framing is not repeated."""
    rig = _Rig()
    rig.store(_request(), headers=stored, body=b"12345")
    fields = _parse(rig.hit())[1]
    assert fields[:-1] == [*sent, ("Content-Length", "5")] and fields[-1][0] == "Date"


def test_answer_stored_date_kept_not_added() -> None:
    """An entry with its own Date keeps it, and no second Date is added."""
    rig = _Rig()
    date = "Mon, 01 Jan 2024 00:00:00 GMT"
    rig.store(_request(), headers=(*STORED, ("date", date)))
    data = rig.hit()
    dates = [(n, v) for n, v in _parse(data)[1] if n.lower() == "date"]
    assert dates == [("date", date)]
    assert http_date() not in data.decode()


def test_answer_clock_before_created_age_zero() -> None:
    """Age is never negative when the wall clock steps back."""
    rig = _Rig()
    rig.store(_request(), created=rig.now + 30)
    assert ("Age", "0") in _parse(rig.hit())[1]


def test_answer_restored_entry_rendered_again() -> None:
    """A new entry under the same key is rendered anew, not from the old head."""
    rig = _Rig()
    rig.store(_request(), body=b"old")
    rig.hit()
    rig.now += 100
    rig.put(body=b"newer", headers=(("X-New", "1"),), created=rig.now - 2)
    _, fields, body = _parse(rig.hit())
    assert body == b"newer"
    assert fields[:4] == [("X-New", "1"), ("X-Sidecar-Cache", "hit"), ("Age", "2"),
                          ("Content-Length", "5")]


def test_answer_key_changed_serves_new_key() -> None:
    """Remembering a request under a new key replaces the old one."""
    rig = _Rig()
    rig.store(_request(), key=b"a" * 32, body=b"first")
    rig.store(_request(), key=b"b" * 32, body=b"second")
    assert len(rig.hits) == 1 and rig.hit().endswith(b"\r\n\r\nsecond")


@pytest.mark.parametrize(
    "request_kw",
    [{"body": b'{"other":1}'}, {"target": "/v1/completions"}, {"method": "PUT"},
     {"keep_alive": False}, {"version": HttpVersion10}],
    ids=["body", "target", "method", "not-keep-alive", "http-1.0"],
)
def test_answer_request_not_quick_none(request_kw: dict[str, Any]) -> None:
    """Requests not remembered, not keep-alive or not HTTP/1.1 pass on."""
    rig = _Rig()
    rig.store(_request())
    rig.hit()
    assert _ask(rig.hits, _request(**request_kw)) is None


def test_answer_disabled_none() -> None:
    """While draining (enabled False) every request takes the pipeline."""
    rig = _Rig()
    rig.store(_request())
    rig.hits.enabled = False
    assert _ask(rig.hits, _request()) is None
    rig.hits.enabled = True
    rig.hit()


def test_answer_signature_changed_none_then_forgotten() -> None:
    """A new signature passes requests on; remembering under it drops the old."""
    rig = _Rig()
    rig.store(_request())
    rig.env.signature = b"sig-2"
    assert _ask(rig.hits, _request()) is None
    rig.env.signature = None
    assert _ask(rig.hits, _request()) is None
    rig.env.signature = b"sig-2"
    rig.store(_request(target="/v1/embeddings"), key=b"e" * 32)
    assert len(rig.hits) == 1
    rig.hit(target="/v1/embeddings")
    assert _ask(rig.hits, _request()) is None


def test_answer_entry_left_memory_none_and_forgotten() -> None:
    """An entry gone from the memory tier passes the request on and is forgotten."""
    rig = _Rig()
    rig.store(_request())
    rig.memory.pop(KEY)
    assert _ask(rig.hits, _request()) is None
    assert len(rig.hits) == 0


def test_answer_entry_expired_none_and_forgotten() -> None:
    """An entry past created + ttl_s on the wall clock is not served."""
    rig = _Rig()
    rig.store(_request(), ttl_s=10.0)
    rig.now += 10.0
    rig.hit()
    rig.now += 0.001
    assert _ask(rig.hits, _request()) is None
    assert len(rig.hits) == 0


@pytest.mark.parametrize("status", [204, 199, 301, 304, 404, 500])
def test_answer_status_not_2xx_or_204_none(status: int) -> None:
    """Only 2xx answers other than 204 are framed here."""
    rig = _Rig()
    rig.store(_request(), status=status)
    assert _ask(rig.hits, _request()) is None
    assert rig.hits.answered == 0


# -- the bound on fingerprints ---------------------------------------------------


def _store_many(rig: _Rig, count: int) -> list[str]:
    targets = [f"/v1/r{i}" for i in range(count)]
    for i, target in enumerate(targets):
        rig.store(_request(target=target), key=b"%032d" % i)
    return targets


def test_remember_over_max_entries_keeps_newest() -> None:
    """At most max_entries fingerprints stay; the oldest unused go first."""
    rig = _Rig(max_entries=4)
    targets = _store_many(rig, 7)
    assert len(rig.hits) == 4
    answered = [_ask(rig.hits, _request(target=t)) is not None for t in targets]
    assert answered == [False] * 3 + [True] * 4


def test_remember_used_fingerprint_gets_second_chance() -> None:
    """A fingerprint answered since it was remembered outlives an older unused one."""
    rig = _Rig(max_entries=3)
    a, b, c = _store_many(rig, 3)
    rig.hit(target=a)
    rig.store(_request(target="/v1/d"), key=b"d" * 32)
    assert len(rig.hits) == 3
    assert _ask(rig.hits, _request(target=b)) is None
    for target in (a, c, "/v1/d"):
        rig.hit(target=target)


def test_remember_second_chance_lasts_one_round() -> None:
    """A fingerprint not used again after its second chance goes at the next round."""
    rig = _Rig(max_entries=2)
    a, _ = _store_many(rig, 2)
    rig.hit(target=a)
    rig.store(_request(target="/v1/c"), key=b"c" * 32)
    rig.store(_request(target="/v1/d"), key=b"d" * 32)
    assert _ask(rig.hits, _request(target=a)) is None
    rig.hit(target="/v1/c")


# -- the accounting ----------------------------------------------------------------


def test_fold_reports_hits_of_one_route() -> None:
    """fold hands on_hits the durations, sizes and saved seconds of a route's hits."""
    rig = _Rig()
    entry = rig.store(_request(), body=b"x" * 11, upstream_duration_s=2.0)
    for _ in range(3):
        rig.hit()
    assert rig.calls == []
    rig.hits.fold()
    assert len(rig.calls) == 1
    method, route, status, durations, sizes, saved = rig.calls[0]
    assert (method, route, status, sizes) == ("POST", "chat", 200, [entry.size] * 3)
    assert len(durations) == 3 and all(0.0 <= d < 1.0 for d in durations)
    assert saved == pytest.approx(sum(max(0.0, 2.0 - d) for d in durations))
    rig.hits.fold()
    assert len(rig.calls) == 1, "the tally is empty after a fold"


def test_fold_groups_split_by_route_and_status() -> None:
    """One on_hits call per (method, route, status); no upstream time saves none."""
    rig = _Rig()
    rig.store(_request(target="/a"), key=b"a" * 32, route="chat")
    rig.store(_request(target="/b"), key=b"b" * 32, route="chat", status=201)
    rig.store(_request(target="/c"), key=b"c" * 32, route="embed")
    for target in ("/a", "/b", "/c", "/a"):
        rig.hit(target=target)
    rig.hits.fold()
    assert len(rig.calls) == 3
    assert {c[:3]: len(c[3]) for c in rig.calls} == {
        ("POST", "chat", 200): 2, ("POST", "chat", 201): 1, ("POST", "embed", 200): 1,
    }
    assert [c[5] for c in rig.calls] == [0.0] * 3  # the entries cost no upstream time


async def test_answer_on_loop_folds_after_iteration() -> None:
    """Under a running loop the tally is folded once the iteration's callbacks ran."""
    rig = _Rig()
    rig.store(_request())
    rig.hit()
    rig.hit()
    assert rig.calls == []
    loop = asyncio.get_running_loop()
    later = loop.create_future()
    loop.call_soon(later.set_result, None)
    await asyncio.wait_for(later, 5.0)
    assert len(rig.calls) == 1 and len(rig.calls[0][3]) == 2


async def test_answer_fold_runs_after_the_answers_are_written() -> None:
    """The tally is folded behind the write the server schedules after an answer."""
    rig = _Rig()
    rig.store(_request())
    order: list[str] = []
    rig.hits._on_hits = lambda *args: order.append("fold")
    rig.hit()
    loop = asyncio.get_running_loop()
    loop.call_soon(order.append, "write")  # the server's uncork, scheduled next
    done = loop.create_future()
    loop.call_soon(loop.call_soon, done.set_result, None)
    await asyncio.wait_for(done, 5.0)
    assert order == ["write", "fold"]


def test_stats_counts_answers_and_fingerprints() -> None:
    """answered counts quick answers only; stats shows the counters and the bound."""
    rig = _Rig(max_entries=10)
    rig.store(_request())
    rig.hit()
    rig.hit()
    assert _ask(rig.hits, _request(body=b"{}")) is None
    rig.hits.enabled = False
    assert rig.hits.answered == 2
    assert rig.hits.stats() == {
        "enabled": False, "answered": 2, "fingerprints": 1, "max_fingerprints": 10,
    }


# -- forgetting -------------------------------------------------------------------


def test_reset_forgets_and_takes_new_significant_fields() -> None:
    """reset drops every fingerprint and makes its fields the significant ones."""
    rig = _Rig()
    rig.store(_request())
    rig.hits.reset(("X-Model",))
    assert len(rig.hits) == 0
    assert _ask(rig.hits, _request()) is None
    fp = rig.hits.fingerprint
    def with_field(name: bytes, value: bytes) -> bytes | None:
        return fp(_request((*BASE, (name, value))), BODY)

    assert with_field(b"X-Model", b"1") != with_field(b"X-Model", b"2")
    assert with_field(b"X-Tenant", b"1") == with_field(b"X-Tenant", b"2")


def test_clear_forgets_everything() -> None:
    """clear drops every fingerprint; the entries stay in the memory tier."""
    rig = _Rig()
    _store_many(rig, 3)
    rig.hits.clear()
    assert len(rig.hits) == 0 and len(rig.memory) == 3
    assert _ask(rig.hits, _request(target="/v1/r0")) is None
