"""``sidecar stats``: the read models as a terminal summary, or as JSON.

Owns fetching ``/state`` and every ``/state/{model}`` from a running sidecar's
admin port, and printing hit ratio, latency and bytes saved, coalesced
requests, per-route p50/p95 and the upstream's slots; ``--json`` prints the
raw models as one JSON object keyed by model name.
Not here: the command line's other subcommands and dispatch (sidecar/cli.py,
which calls ``main`` with the arguments after ``stats``).

Invariants: read-only (GET only); exit 0 on success, 1 with one line on
stderr when the admin port cannot be reached or answers with an error. The
admin URL comes from ``--admin``, else ``SIDECAR_ADMIN_LISTEN``, else
``http://127.0.0.1:8091``; a wildcard listen address is reached on loopback.
``SIDECAR_ADMIN_TOKEN``, when set, is sent as a bearer token and never
printed.

Known limitations: one snapshot, no refresh loop (use the dashboard, or
``watch sidecar stats``); no colour.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, Final

DEFAULT_ADMIN: Final = "http://127.0.0.1:8091"
TIMEOUT_S: Final = 5.0
_WILDCARDS: Final = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "[::]": "[::1]"}


class StatsError(Exception):
    """The admin port could not give us the models; the message is one line."""


def admin_url(flag: str | None) -> str:
    """The admin base URL from the flag, the environment or the default."""
    if flag:
        return flag.rstrip("/")
    listen = os.environ.get("SIDECAR_ADMIN_LISTEN")
    if not listen:
        return DEFAULT_ADMIN
    host, _, port = listen.rpartition(":")
    return f"http://{_WILDCARDS.get(host, host)}:{port}"


def _get_json(url: str) -> Any:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    token = os.environ.get("SIDECAR_ADMIN_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise StatsError(f"{url} answered {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatsError(f"cannot reach the admin port at {url} ({reason})") from exc
    except ValueError as exc:
        raise StatsError(f"{url} did not answer JSON") from exc


def fetch(base: str) -> dict[str, Any]:
    """Every read model the sidecar lists, by name."""
    listing = _get_json(f"{base}/state")
    return {name: _get_json(f"{base}/state/{name}") for name in listing["models"]}


def _pct(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:.1f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _cache_lines(cache: dict[str, Any]) -> list[str]:
    t = cache["total"]
    lines = [
        f"cache      hit ratio {_pct(t['hit_ratio'])}  lookups {t['lookups']}  "
        f"hits {t['hits']}  misses {t['misses']}  bypasses {t['bypasses']}",
        f"           latency saved {t['latency_saved_s']:.2f} s  "
        f"bytes saved {_bytes(t['bytes_saved'])}",
    ]
    for name, tier in sorted(cache["tiers"].items()):
        lines.append(
            f"  tier     {name:<8} hit ratio {_pct(tier['hit_ratio'])}  entries "
            f"{tier['entries']}  size {_bytes(tier['bytes'])}  evictions {tier['evictions']}"
        )
    return lines


def _routes_lines(routes: dict[str, Any]) -> list[str]:
    lines = [
        f"routes     {'route':<16}{'requests':>9}{'errors':>8}{'p50 ms':>9}"
        f"{'p95 ms':>9}{'ewma ms':>9}"
    ]
    for name, r in sorted(routes["routes"].items()):
        lines.append(
            f"           {name[:16]:<16}{r['requests']:>9}{r['errors']:>8}"
            f"{_ms(r['p50_ms']):>9}{_ms(r['p95_ms']):>9}{_ms(r['ewma_ms']):>9}"
        )
    tokens = routes["total"]["prompt_tokens"]
    lines.append(
        f"           prompt tokens reused {tokens['reused']}, "
        f"evaluated {tokens['evaluated']}"
    )
    return lines


def _upstream_line(up: dict[str, Any]) -> str:
    summary = up.get("slots_summary")
    slots = (
        f"  slots {summary['processing']}/{summary['total']} processing"
        if summary
        else ""
    )
    error = f" ({up['error']})" if up.get("error") else ""
    return f"upstream   {up['kind']} {up['url']}  {up['status']}{error}{slots}"


def render(models: dict[str, Any], base: str) -> str:
    """The terminal summary of whichever known models are present."""
    lines = [f"sidecar stats  {base}"]
    if "cache" in models:
        lines += _cache_lines(models["cache"])
    if "coalescing" in models:
        co = models["coalescing"]
        lines.append(
            f"coalesced  {co['total']['followers']} followers behind "
            f"{co['total']['leaders']} leaders, {co['waiters']} waiting now"
        )
    if "routes" in models:
        lines += _routes_lines(models["routes"])
    if "upstream" in models:
        lines.append(_upstream_line(models["upstream"]))
    if "policy" in models:
        p = models["policy"]
        lines.append(
            f"policy     digest {str(p['digest'])[:12]}  reloads "
            f"{p['reloads']['ok']} ok, {p['reloads']['failed']} refused"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar stats", description="Show a running sidecar's read models."
    )
    parser.add_argument(
        "--admin", metavar="URL", help=f"admin base URL ({DEFAULT_ADMIN})"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the raw models as JSON"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``sidecar stats``; returns the exit status."""
    args = _parser().parse_args(argv)
    base = admin_url(args.admin)
    try:
        models = fetch(base)
    except StatsError as exc:
        print(f"sidecar stats: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(models, indent=2, sort_keys=True))
    else:
        print(render(models, base))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
