/*
 * The sidecar dashboard: subscribes to state/stream, keeps every read model
 * by applying RFC 6902 patches (rfc6902.js), renders tiles, tables and small
 * charts.
 *
 * Stream handling (DESIGN.md, "State streams"):
 * - "snapshot" replaces a model; "patch" applies to it; "keepalive" and
 *   "shutdown" only move the resume point (their id is the latest one).
 * - A dropped connection is retried by EventSource itself, which sends
 *   Last-Event-ID, so the server replays exactly the missed patches. When
 *   EventSource gives up (an HTTP error such as 503, or a shutdown), the page
 *   opens a new one with ?last_event_id=, after a growing delay.
 * - A patch that does not apply, or one for a model without a snapshot, means
 *   the page lost its base: it drops its state and subscribes afresh.
 *
 * Invariants: all text reaches the page through textContent, never HTML, so
 * values from the upstream cannot inject markup. Rendering runs at most once
 * per animation frame; charts sample once a second.
 *
 * Known limitations: charts keep two minutes of history in memory and start
 * empty on reload.
 */
(function () {
  "use strict";

  const HISTORY = 120;
  const MAX_RETRY_MS = 30000;

  const state = {};
  const stats = {
    snapshots: 0, patches: 0, keepalives: 0, shutdowns: 0, opens: 0,
    errors: 0, resyncs: 0, lastEventId: null,
  };
  let source = null;
  let retryMs = 1000;
  let renderPending = false;

  // -- stream ------------------------------------------------------------------

  function streamUrl() {
    const id = stats.lastEventId;
    return id === null ? "state/stream" : "state/stream?last_event_id=" + encodeURIComponent(id);
  }

  function connect() {
    source = new EventSource(streamUrl());
    source.addEventListener("open", function () {
      stats.opens += 1;
      retryMs = 1000;
      setStatus("live", "live");
    });
    source.addEventListener("snapshot", onSnapshot);
    source.addEventListener("patch", onPatch);
    source.addEventListener("keepalive", function (event) {
      track(event);
      stats.keepalives += 1;
      renderSoon();
    });
    source.addEventListener("shutdown", function (event) {
      track(event);
      stats.shutdowns += 1;
      reopenLater("server shut down");
    });
    source.onerror = function () {
      stats.errors += 1;
      if (source.readyState === EventSource.CLOSED) reopenLater("disconnected");
      else setStatus("reconnecting", "reconnecting");
    };
  }

  function reopenLater(reason) {
    source.close();
    setStatus("down", reason + "; retrying in " + Math.round(retryMs / 1000) + " s");
    setTimeout(connect, retryMs);
    retryMs = Math.min(MAX_RETRY_MS, retryMs * 2);
  }

  function resync() {
    stats.resyncs += 1;
    source.close();
    stats.lastEventId = null;
    for (const name of Object.keys(state)) delete state[name];
    connect();
  }

  function track(event) {
    if (event.lastEventId) stats.lastEventId = event.lastEventId;
  }

  function onSnapshot(event) {
    const data = JSON.parse(event.data);
    state[data.model] = data.state;
    stats.snapshots += 1;
    track(event);
    renderSoon();
  }

  function onPatch(event) {
    const data = JSON.parse(event.data);
    if (!Object.prototype.hasOwnProperty.call(state, data.model)) {
      resync();
      return;
    }
    try {
      state[data.model] = window.RFC6902.apply(state[data.model], data.patch);
    } catch (err) {
      resync();
      return;
    }
    stats.patches += 1;
    track(event);
    renderSoon();
  }

  // -- formatting ------------------------------------------------------------------

  function num(value) {
    return value === null || value === undefined ? "–" : Number(value).toLocaleString("en");
  }

  function pct(ratio) {
    return ratio === null || ratio === undefined ? "–" : (ratio * 100).toFixed(1) + " %";
  }

  function ms(value) {
    return value === null || value === undefined ? "–" : value.toFixed(1) + " ms";
  }

  function seconds(value) {
    if (value === null || value === undefined) return "–";
    return value >= 100 ? value.toFixed(0) + " s" : value.toFixed(2) + " s";
  }

  function bytes(value) {
    if (value === null || value === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let n = value;
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
  }

  function when(unixSeconds) {
    return unixSeconds ? new Date(unixSeconds * 1000).toLocaleTimeString() : "–";
  }

  // -- DOM helpers -----------------------------------------------------------------

  function byId(id) { return document.getElementById(id); }

  function setText(id, text) {
    const el = byId(id);
    if (el && el.textContent !== text) el.textContent = text;
  }

  function setStatus(kind, text) {
    const el = byId("status");
    el.className = kind;
    el.textContent = text;
  }

  function fillTable(id, headers, rows, emptyText) {
    const table = byId(id);
    const body = document.createElement("tbody");
    const head = document.createElement("tr");
    for (const h of headers) {
      const th = document.createElement("th");
      th.textContent = h;
      head.appendChild(th);
    }
    body.appendChild(head);
    if (rows.length === 0) {
      const tr = document.createElement("tr");
      const td = document.createElement("td");
      td.colSpan = headers.length;
      td.className = "empty";
      td.textContent = emptyText || "nothing yet";
      tr.appendChild(td);
      body.appendChild(tr);
    }
    for (const row of rows) {
      const tr = document.createElement("tr");
      for (const cell of row) {
        const td = document.createElement("td");
        td.textContent = cell;
        tr.appendChild(td);
      }
      body.appendChild(tr);
    }
    table.replaceChildren(body);
  }

  function entries(object) {
    return object ? Object.keys(object).sort().map(function (k) { return [k, object[k]]; }) : [];
  }

  // -- rendering -------------------------------------------------------------------

  function renderSoon() {
    if (renderPending) return;
    renderPending = true;
    window.requestAnimationFrame(function () {
      renderPending = false;
      render();
    });
  }

  function render() {
    setText("meta", "event " + (stats.lastEventId || "–") + " · " + stats.snapshots +
      " snapshots · " + stats.patches + " patches");
    renderCache(state.cache);
    renderRoutes(state.routes);
    renderCoalescing(state.coalescing);
    renderUpstream(state.upstream);
    renderPolicy(state.policy);
    renderArtifacts(state.artifacts);
  }

  function renderCache(cache) {
    if (!cache) return;
    const t = cache.total;
    setText("v-hit-ratio", pct(t.hit_ratio));
    setText("s-hit-ratio", num(t.hits) + " hits · " + num(t.misses) + " misses · " +
      num(t.bypasses) + " bypasses");
    setText("v-latency-saved", seconds(t.latency_saved_s));
    setText("v-bytes-saved", bytes(t.bytes_saved));
    fillTable("t-cache-tiers",
      ["tier", "lookups", "hit ratio", "entries", "size", "evictions", "saved"],
      entries(cache.tiers).map(function ([name, c]) {
        return [name, num(c.lookups), pct(c.hit_ratio), num(c.entries), bytes(c.bytes),
          num(c.evictions), seconds(c.latency_saved_s)];
      }));
    fillTable("t-cache-routes",
      ["route", "lookups", "hits", "misses", "bypasses", "hit ratio", "latency saved",
        "bytes saved"],
      entries(cache.routes).map(function ([name, c]) {
        return [name, num(c.lookups), num(c.hits), num(c.misses), num(c.bypasses),
          pct(c.hit_ratio), seconds(c.latency_saved_s), bytes(c.bytes_saved)];
      }));
  }

  // [route, p95 in ms] of the route with the highest p95, or null.
  function slowestP95(routes) {
    let slowest = null;
    for (const [name, r] of entries(routes.routes)) {
      if (r.p95_ms !== null && (slowest === null || r.p95_ms > slowest[1])) {
        slowest = [name, r.p95_ms];
      }
    }
    return slowest;
  }

  function renderRoutes(routes) {
    if (!routes) return;
    setText("v-requests", num(routes.total.requests));
    setText("s-requests", num(routes.total.errors) + " errors · tokens reused " +
      num(routes.total.prompt_tokens.reused) + " / evaluated " +
      num(routes.total.prompt_tokens.evaluated));
    const slowest = slowestP95(routes);
    setText("v-p95", slowest ? ms(slowest[1]) : "–");
    setText("s-p95", slowest ? slowest[0] : "");
    fillTable("t-routes",
      ["route", "requests", "errors", "p50", "p95", "EWMA", "tokens reused", "evaluated"],
      entries(routes.routes).map(function ([name, r]) {
        return [name, num(r.requests), num(r.errors), ms(r.p50_ms), ms(r.p95_ms), ms(r.ewma_ms),
          num(r.prompt_tokens.reused), num(r.prompt_tokens.evaluated)];
      }));
  }

  function renderCoalescing(co) {
    if (!co) return;
    setText("v-coalesced", num(co.total.followers));
    setText("s-coalesced",
      num(co.total.leaders) + " leaders · " + num(co.waiters) + " waiting now");
    fillTable("t-coalescing", ["route", "leaders", "followers (suppressed)"],
      entries(co.routes).map(function ([name, c]) {
        return [name, num(c.leaders), num(c.followers)];
      }));
  }

  function renderUpstream(up) {
    if (!up) return;
    const summary = up.slots_summary;
    setText("v-slots", summary ? summary.processing + " / " + summary.total : "–");
    setText("s-slots", up.kind + " · " + up.status + (up.error ? " (" + up.error + ")" : ""));
    setText("upstream-head", "· " + up.kind + " " + up.url + " · " + up.status +
      " since " + when(up.since));
    fillTable("t-slots",
      ["slot", "processing", "context", "prompt tokens", "from cache", "decoded", "remaining"],
      (up.slots || []).map(function (s) {
        const next = (s.next_token && s.next_token[0]) || {};
        return [String(s.id), s.is_processing ? "yes" : "no", num(s.n_ctx),
          num(s.n_prompt_tokens), num(s.n_prompt_tokens_cache), num(next.n_decoded),
          num(next.n_remain)];
      }), up.slots === null ? "no slots reported" : "no slots");
  }

  function renderPolicy(policy) {
    if (!policy) return;
    const err = policy.last_error;
    fillTable("t-policy", ["", ""], [
      ["digest", policy.digest ? policy.digest.slice(0, 12) : "–"],
      ["source", policy.source || "–"],
      ["loaded", when(policy.loaded_at)],
      ["reloads", num(policy.reloads.ok) + " ok · " + num(policy.reloads.failed) + " refused"],
      ["last refusal", err ? err.message : "–"],
    ]);
  }

  function renderArtifacts(art) {
    if (!art) return;
    fillTable("t-artifacts", ["", ""], [
      ["files", num(art.files)],
      ["indexed", bytes(art.bytes) + " at " + when(art.indexed_at)],
      ["served", num(art.served.ok) + " · " + num(art.served.not_modified) + " not modified"],
      ["bytes sent", bytes(art.served.bytes_sent)],
    ]);
  }

  // -- charts ------------------------------------------------------------------------

  const series = {};
  let previous = null;

  function record(name, value) {
    const s = series[name] || (series[name] = []);
    s.push(value === null || value === undefined || Number.isNaN(value) ? null : value);
    if (s.length > HISTORY) s.shift();
  }

  function totals() {
    const c = state.cache && state.cache.total;
    const r = state.routes && state.routes.total;
    const co = state.coalescing && state.coalescing.total;
    return {
      latency: c ? c.latency_saved_s : null,
      bytes: c ? c.bytes_saved : null,
      requests: r ? r.requests : null,
      coalesced: co ? co.followers : null,
    };
  }

  function rate(now, before, key) {
    if (!before || now[key] === null || before[key] === null) return null;
    return Math.max(0, now[key] - before[key]);
  }

  function sample() {
    const now = totals();
    record("hit-ratio", state.cache ? state.cache.total.hit_ratio : null);
    record("latency-saved", rate(now, previous, "latency"));
    record("bytes-saved", rate(now, previous, "bytes"));
    record("requests", rate(now, previous, "requests"));
    record("coalesced", rate(now, previous, "coalesced"));
    const slowest = state.routes ? slowestP95(state.routes) : null;
    record("p95", slowest ? slowest[1] : null);
    const up = state.upstream && state.upstream.slots_summary;
    record("slots", up ? up.processing : null);
    previous = now;
    for (const name of Object.keys(series)) draw(name);
  }

  function draw(name) {
    const canvas = byId("c-" + name);
    if (!canvas) return;
    const width = canvas.clientWidth || 200;
    const height = canvas.clientHeight || 40;
    if (canvas.width !== width) canvas.width = width;
    if (canvas.height !== height) canvas.height = height;
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, width, height);
    const values = series[name];
    const known = values.filter(function (v) { return v !== null; });
    if (known.length < 2) return;
    const max = Math.max.apply(null, known) || 1;
    ctx.strokeStyle = "#4fb3ff";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let started = false;
    // Right-aligned: the newest sample at the right edge, history scrolls left.
    const offset = HISTORY - values.length;
    values.forEach(function (v, i) {
      if (v === null) { started = false; return; }
      const x = ((offset + i) / (HISTORY - 1)) * width;
      const y = height - 2 - (v / max) * (height - 4);
      if (started) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      started = true;
    });
    ctx.stroke();
  }

  window.sidecarDashboard = { state: state, stats: stats };
  connect();
  setInterval(sample, 1000);
})();
