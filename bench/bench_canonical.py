"""RFC 8785 canonical JSON and strict parsing: microseconds per chat body.

Run as ``python -m bench.bench_canonical [--quick] [--json FILE]``.

For chat-completion request bodies of about 1 KB, 10 KB and 100 KB (a system
prompt, alternating user and assistant turns, a tool with a JSON schema, and
the usual sampling fields, two of them floats), in English and in a
multilingual variant (accents, CJK, emoji), it times in this process:

- canonical form: ``sidecar.canonical.canonicalize`` against the
  ``rfc8785`` package (the reference it must equal, checked first),
  ``json.dumps(sort_keys=True)`` and ``orjson.dumps(OPT_SORT_KEYS)`` (neither
  canonical; shown for scale);
- parsing: ``sidecar.canonical.parse_body`` (duplicate keys refused) against
  ``orjson.loads`` and ``json.loads`` (both keep the last duplicate silently)
  and ``json.loads`` with an ``object_pairs_hook`` that refuses duplicates.

Each figure is the best of several timed batches, the candidates interleaved
batch by batch so that load on the shared machine hits all of them alike.
Target: ``canonicalize`` at least 10 times faster than ``rfc8785`` on the
10 KB English body. It prints tables, a PASS/FAIL line, one JSON line per
measurement (also written to ``--json FILE``) and a ``rerun with:`` line; the
exit status is 1 when the target or the equality check fails.

Not here: the canonical module itself (``sidecar/canonical.py``), the action
key built from its output (``sidecar/keys.py``).

Known limitations: the bodies are synthetic (fixed seed); real bodies with
many floats or deeply nested tool schemas spend more time in the Python part
of the fast path. ``--quick`` times fewer batches.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import orjson
import rfc8785

from bench import rig
from sidecar.canonical import canonicalize, parse_body

SIZES: Final = (1_000, 10_000, 100_000)
TARGET_SPEEDUP: Final = 10.0
WORDS: Final = (
    "the model should answer briefly and cite the document it used; "
    "summarise the following passage: context windows, caches and latency "
    "budgets interact in ways that are easy to get wrong under load."
).split()
MULTILINGUAL: Final = "café naïve Straße 東京 你好 世界 😀 🚀 ünïcödé".split()


def sentence(rng: random.Random, words: int, vocabulary: Sequence[str]) -> str:
    return " ".join(rng.choice(vocabulary) for _ in range(words)).capitalize() + "."


def chat_body(size: int, *, multilingual: bool, seed: int = 42) -> dict[str, Any]:
    """A chat request whose compact JSON is about ``size`` bytes."""
    rng = random.Random(seed)
    vocabulary = [*WORDS, *MULTILINGUAL] if multilingual else list(WORDS)
    body: dict[str, Any] = {
        "model": "llama-3.1-8b-instruct",
        "messages": [{"role": "system", "content": sentence(rng, 40, vocabulary)}],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "search_documents",
                    "description": sentence(rng, 12, vocabulary),
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "query": {
                                "type": "string",
                                "description": "what to look for",
                            },
                            "limit": {"type": "integer", "minimum": 1, "maximum": 50},
                        },
                        "required": ["query"],
                    },
                },
            }
        ],
        "temperature": 0.7,
        "top_p": 0.95,
        "max_tokens": 512,
        "seed": 1234,
        "stream": True,
        "stop": ["</s>", "\n\nUser:"],
    }
    turn = 0
    while len(orjson.dumps(body)) < size:
        role = "user" if turn % 2 == 0 else "assistant"
        words = rng.randint(10, 60)
        body["messages"].append(
            {"role": role, "content": sentence(rng, words, vocabulary)}
        )
        turn += 1
    return body


def best_us(
    candidates: dict[str, Callable[[], object]], batches: int
) -> dict[str, float]:
    """Microseconds per call of each candidate, best batch, interleaved."""
    numbers: dict[str, int] = {}
    for name, call in candidates.items():
        start = time.perf_counter()
        call()
        once = max(time.perf_counter() - start, 1e-7)
        numbers[name] = max(1, int(0.02 / once))  # batches of about 20 ms
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(batches):
        for name, call in candidates.items():
            n = numbers[name]
            start = time.perf_counter()
            for _ in range(n):
                call()
            best[name] = min(best[name], (time.perf_counter() - start) / n * 1e6)
    return best


def pairs_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


def measure(size: int, multilingual: bool, batches: int) -> list[dict[str, Any]]:
    body = chat_body(size, multilingual=multilingual)
    raw = json.dumps(body, ensure_ascii=False).encode()
    equal = canonicalize(body) == rfc8785.dumps(body) and parse_body(raw) == body
    kind = "multilingual" if multilingual else "english"
    canonical = best_us(
        {
            "canonicalize": lambda: canonicalize(body),
            "rfc8785": lambda: rfc8785.dumps(body),
            "json_sorted": lambda: json.dumps(body, sort_keys=True, ensure_ascii=False),
            "orjson_sorted": lambda: orjson.dumps(body, option=orjson.OPT_SORT_KEYS),
        },
        batches,
    )
    parsing = best_us(
        {
            "parse_body": lambda: parse_body(raw),
            "orjson_loads": lambda: orjson.loads(raw),
            "json_loads": lambda: json.loads(raw),
            "json_loads_pairs_hook": lambda: json.loads(
                raw, object_pairs_hook=pairs_without_duplicates
            ),
        },
        batches,
    )
    common = {"body": kind, "bytes": len(raw)}
    return [
        {
            "bench": "canonical_form",
            **common,
            **{f"{k}_us": v for k, v in canonical.items()},
            "speedup_vs_rfc8785": canonical["rfc8785"] / canonical["canonicalize"],
            "equal_to_rfc8785": equal,
        },
        {
            "bench": "canonical_parse",
            **common,
            **{f"{k}_us": v for k, v in parsing.items()},
        },
    ]


def print_tables(records: Sequence[dict[str, Any]]) -> None:
    forms = [r for r in records if r["bench"] == "canonical_form"]
    parses = [r for r in records if r["bench"] == "canonical_parse"]
    us = rig.fmt_plain

    def num(value: float) -> str:
        return f"{value:,.1f}"

    print("\ncanonical form, microseconds per body")
    print(
        rig.format_table(
            (
                "body",
                "bytes",
                "canonicalize",
                "rfc8785",
                "speed-up",
                "json sorted",
                "orjson sorted",
            ),
            [
                [
                    r["body"],
                    us(r["bytes"]),
                    num(r["canonicalize_us"]),
                    num(r["rfc8785_us"]),
                    f"{r['speedup_vs_rfc8785']:.1f}x",
                    num(r["json_sorted_us"]),
                    num(r["orjson_sorted_us"]),
                ]
                for r in forms
            ],
        )
    )
    print("\nparsing, microseconds per body")
    print(
        rig.format_table(
            (
                "body",
                "bytes",
                "parse_body",
                "orjson.loads",
                "json.loads",
                "json + pairs hook",
            ),
            [
                [
                    r["body"],
                    us(r["bytes"]),
                    num(r["parse_body_us"]),
                    num(r["orjson_loads_us"]),
                    num(r["json_loads_us"]),
                    num(r["json_loads_pairs_hook_us"]),
                ]
                for r in parses
            ],
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_canonical")
    parser.add_argument("--quick", action="store_true", help="fewer timed batches")
    parser.add_argument(
        "--json", type=Path, metavar="FILE", help="also write JSON lines"
    )
    argv_used = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv_used)
    batches = 3 if args.quick else 10

    records: list[dict[str, Any]] = []
    for multilingual in (False, True):
        for size in SIZES:
            records.extend(measure(size, multilingual, batches))
    print(
        f"best of {batches} batches of about 20 ms;"
        f" load average {os.getloadavg()[0]:.2f}"
    )
    print_tables(records)

    forms = [r for r in records if r["bench"] == "canonical_form"]
    target = next(r for r in forms if r["body"] == "english" and r["bytes"] >= 10_000)
    unequal = [r for r in forms if not r["equal_to_rfc8785"]]
    passed = target["speedup_vs_rfc8785"] >= TARGET_SPEEDUP and not unequal
    print(
        f"\n{'PASS' if passed else 'FAIL'} canonicalize is"
        f" {target['speedup_vs_rfc8785']:.1f}x faster than rfc8785 on a"
        f" {target['bytes']:,}-byte chat body (target {TARGET_SPEEDUP:.0f}x);"
        f" output equal to rfc8785 on {len(forms) - len(unequal)}"
        f" of {len(forms)} bodies"
    )
    print()
    for record in records:
        print(rig.json_line(record))
    if args.json:
        rig.write_json_lines(args.json, records)
    print("\n" + rig.rerun_line("bench.bench_canonical", argv_used))
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
