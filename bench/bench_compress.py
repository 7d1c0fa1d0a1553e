"""Compression of small answers: zstd with trained dictionaries vs plain zstd.

Owns the synthetic answer generator (OpenAI-shaped chat completion bodies,
legacy completion bodies and SSE streams, with ids, timestamps, model names,
token counts, llama.cpp timings and text drawn at random) and the measurement:
compression ratio (raw bytes over compressed bytes, summed over a held-out
set) by size bucket, and compress and decompress speed, for plain zstd and for
``sidecar.cache.compress.Compressor`` with per-class dictionaries. Not here:
the disk store's own costs (``bench/bench_store.py``).

Invariants: training and evaluation sets are disjoint draws from the same
generator with a fixed seed, so runs are comparable; both codecs write the
same frame options (content size, no checksum, no dictionary id), so the
ratio difference is the dictionary alone. The target is a dictionary ratio of
at least twice plain zstd's on answers under 2 KiB.

Known limitations: the bodies are synthetic. Real traffic repeats more (same
prompts, same system fingerprint across a deployment), which favours
dictionaries further, but its text may be less regular than the word list
used here. Run with ``python -m bench.bench_compress [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import zstandard

from bench import rig
from sidecar.cache.compress import Compressor, ContentClass

SMALL_LIMIT: Final = 2048
BUCKETS: Final = ((0, 512), (512, 1024), (1024, 2048), (2048, 8192))

MODELS: Final = (
    "gpt-4o-mini-2024-07-18",
    "gpt-4o-2024-08-06",
    "llama-3.1-8b-instruct-q4_k_m.gguf",
    "qwen2.5-7b-instruct",
    "mistral-7b-instruct-v0.3",
    "phi-3.5-mini-instruct",
)
_PROSE: Final = (
    "the of and to in is that for it as with was on be by this are or at from"
    " have an which not but you they can all more one has were their will been"
    " there would if so about what when up out into some time only other new"
    " could than then these two may first any like now such our over also use"
    " most after where how way many well very because through just those each"
    " model answer request cache server token prompt memory disk stream value"
    " function return result error data system user assistant example python"
    " code file list number string query table image layer output input test"
    " first second third step note here below above simple quick large small"
    " however therefore example typically usually often sometimes rarely yes"
    " sure certainly happy help question explain summary detail thanks please"
)
WORDS: Final = tuple(_PROSE.split())
FINISH: Final = ("stop", "stop", "stop", "length", "tool_calls")


def _token(rng: random.Random, n: int, alphabet: str = string.ascii_letters) -> str:
    return "".join(rng.choice(alphabet + string.digits) for _ in range(n))


def _text(rng: random.Random, words: int) -> str:
    # Zipf-like: low indexes (common words) come up far more often.
    def word() -> str:
        if rng.random() < 0.6:
            return WORDS[min(int(rng.paretovariate(1.2)) - 1, len(WORDS) - 1)]
        return rng.choice(WORDS)

    picked = [word() for _ in range(words)]
    text = " ".join(picked)
    return text[:1].upper() + text[1:] + rng.choice((".", ".", "!", "?"))


def _usage(rng: random.Random, completion_tokens: int) -> dict[str, object]:
    prompt = rng.randint(8, 900)
    usage: dict[str, object] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }
    if rng.random() < 0.5:
        usage["prompt_tokens_details"] = {
            "cached_tokens": rng.choice((0, 0, rng.randint(0, prompt))),
            "audio_tokens": 0,
        }
        usage["completion_tokens_details"] = {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        }
    return usage


def _timings(rng: random.Random, predicted: int) -> dict[str, object]:
    prompt_n = rng.randint(1, 400)
    prompt_ms = prompt_n * rng.uniform(0.2, 3.0)
    predicted_ms = predicted * rng.uniform(8.0, 40.0)
    return {
        "cache_n": rng.randint(0, 300),
        "prompt_n": prompt_n,
        "prompt_ms": round(prompt_ms, 3),
        "prompt_per_token_ms": round(prompt_ms / prompt_n, 6),
        "prompt_per_second": round(1000 * prompt_n / prompt_ms, 6),
        "predicted_n": predicted,
        "predicted_ms": round(predicted_ms, 3),
        "predicted_per_token_ms": round(predicted_ms / max(predicted, 1), 6),
        "predicted_per_second": round(1000 * predicted / predicted_ms, 6),
    }


def _dump(doc: object) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


def chat_body(rng: random.Random) -> bytes:
    """One non-streamed chat completion answer."""
    llama = rng.random() < 0.4
    words = rng.choice((3, 8, 15, 30, 60, 120, 200))
    content = _text(rng, words)
    doc: dict[str, object] = {
        "id": "chatcmpl-" + _token(rng, 32 if llama else 29),
        "object": "chat.completion",
        "created": 1_730_000_000 + rng.randint(0, 30_000_000),
        "model": rng.choice(MODELS),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": rng.choice(FINISH),
            }
        ],
        "usage": _usage(rng, max(1, words * 4 // 3)),
    }
    if llama:
        doc["timings"] = _timings(rng, max(1, words * 4 // 3))
    else:
        doc["system_fingerprint"] = "fp_" + _token(rng, 10, "abcdef")
    return _dump(doc).encode()


def completion_body(rng: random.Random) -> bytes:
    """One legacy ``/v1/completions`` answer."""
    words = rng.choice((2, 6, 20, 50, 100))
    doc = {
        "id": "cmpl-" + _token(rng, 29),
        "object": "text_completion",
        "created": 1_730_000_000 + rng.randint(0, 30_000_000),
        "model": rng.choice(MODELS),
        "choices": [
            {
                "text": " " + _text(rng, words),
                "index": 0,
                "logprobs": None,
                "finish_reason": rng.choice(FINISH[:4]),
            }
        ],
        "usage": _usage(rng, max(1, words * 4 // 3)),
    }
    return _dump(doc).encode()


def sse_stream(rng: random.Random) -> bytes:
    """One streamed chat completion as the bytes of its SSE body."""
    ident = "chatcmpl-" + _token(rng, 29)
    created = 1_730_000_000 + rng.randint(0, 30_000_000)
    model = rng.choice(MODELS)
    fingerprint = "fp_" + _token(rng, 10, "abcdef")

    def chunk(delta: dict[str, object], finish: str | None) -> str:
        doc = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": fingerprint,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            ],
        }
        return "data: " + _dump(doc) + "\n\n"

    parts = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
    for word in _text(rng, rng.choice((1, 2, 3, 5, 8, 12, 20))).split():
        parts.append(chunk({"content": " " + word}, None))
    parts.append(chunk({}, rng.choice(FINISH[:4])))
    parts.append("data: [DONE]\n\n")
    return "".join(parts).encode()


GENERATORS: Final[dict[ContentClass, Callable[[random.Random], bytes]]] = {
    ContentClass.CHAT: chat_body,
    ContentClass.COMPLETION: completion_body,
    ContentClass.SSE: sse_stream,
}


def corpus(rng: random.Random, per_class: int) -> list[tuple[ContentClass, bytes]]:
    """``per_class`` answers of each class, shuffled."""
    items = [(c, gen(rng)) for c, gen in GENERATORS.items() for _ in range(per_class)]
    rng.shuffle(items)
    return items


@dataclass
class Tally:
    """Raw and compressed byte totals and codec time over a set of answers."""

    raw: int = 0
    packed: int = 0
    count: int = 0
    compress_s: float = 0.0
    decompress_s: float = 0.0

    @property
    def ratio(self) -> float:
        return self.raw / self.packed if self.packed else 0.0


def _bucket(size: int) -> str:
    for low, high in BUCKETS:
        if low <= size < high:
            return f"{low}-{high}"
    return f">={BUCKETS[-1][1]}"


def measure_plain(
    items: Sequence[tuple[ContentClass, bytes]], level: int
) -> dict[str, Tally]:
    """Plain zstd, one frame per answer, the frame options the store uses."""
    cctx = zstandard.ZstdCompressor(
        level=level, write_checksum=False, write_dict_id=False
    )
    dctx = zstandard.ZstdDecompressor()
    tallies: dict[str, Tally] = {}
    for _, body in items:
        t0 = time.perf_counter()
        frame = cctx.compress(body)
        t1 = time.perf_counter()
        dctx.decompress(frame)
        t2 = time.perf_counter()
        _add(tallies, body, len(frame), t1 - t0, t2 - t1)
    return tallies


def measure_dict(
    items: Sequence[tuple[ContentClass, bytes]], compressor: Compressor
) -> dict[str, Tally]:
    """The sidecar's compressor, dictionaries already trained."""
    tallies: dict[str, Tally] = {}
    for cls, body in items:
        t0 = time.perf_counter()
        packed = compressor.compress(body, cls)
        t1 = time.perf_counter()
        out = compressor.decompress(
            packed.payload,
            codec=packed.codec,
            dict_id=packed.dict_id,
            size=len(body),
            max_size=len(body),
        )
        t2 = time.perf_counter()
        assert out == body
        _add(tallies, body, len(packed.payload), t1 - t0, t2 - t1)
    return tallies


def _add(
    tallies: dict[str, Tally], body: bytes, packed: int, c_s: float, d_s: float
) -> None:
    for name in (
        _bucket(len(body)),
        "all < 2 KiB" if len(body) < SMALL_LIMIT else "all >= 2 KiB",
    ):
        t = tallies.setdefault(name, Tally())
        t.raw += len(body)
        t.packed += packed
        t.count += 1
        t.compress_s += c_s
        t.decompress_s += d_s


def trained_compressor(
    train: Sequence[tuple[ContentClass, bytes]], *, dict_size: int, level: int
) -> tuple[Compressor, float]:
    """A compressor whose classes were trained on ``train``; and training time."""
    comp = Compressor(
        level=level,
        dict_size=dict_size,
        min_samples=len(train) + 1,
        max_samples=len(train),
        sample_budget_bytes=64 * 1024 * 1024,
        retrain_after=None,
        background=False,
    )
    for cls, body in train:
        comp.compress(body, cls)
    t0 = time.perf_counter()
    for cls in GENERATORS:
        if comp.train(cls) is None:
            raise rig.RigError(f"dictionary training failed for {cls.value}")
    return comp, time.perf_counter() - t0


def _mb_s(nbytes: int, seconds: float) -> str:
    return "-" if seconds <= 0 else f"{nbytes / seconds / 1e6:,.0f}"


def _bucket_order(name: str) -> tuple[bool, int]:
    head = name.split("-")[0]
    return (name.startswith("all"), int(head) if head.isdigit() else 1 << 30)


def report(plain: dict[str, Tally], with_dict: dict[str, Tally]) -> list[list[str]]:
    rows = []
    for name in sorted(plain, key=_bucket_order):
        p, d = plain[name], with_dict[name]
        rows.append(
            [
                name,
                str(p.count),
                f"{p.raw / p.count:,.0f}",
                f"{p.ratio:.2f}",
                f"{d.ratio:.2f}",
                rig.fmt_ratio(d.ratio / p.ratio),
                _mb_s(p.raw, p.compress_s),
                _mb_s(d.raw, d.compress_s),
                _mb_s(p.raw, p.decompress_s),
                _mb_s(d.raw, d.decompress_s),
            ]
        )
    return rows


HEADER: Final = (
    "size bucket (bytes)",
    "answers",
    "mean size",
    "plain ratio",
    "dict ratio",
    "dict/plain",
    "plain c MB/s",
    "dict c MB/s",
    "plain d MB/s",
    "dict d MB/s",
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer answers, one dict size"
    )
    parser.add_argument("--level", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    argv_used = list(sys.argv[1:] if argv is None else argv)

    rng = random.Random(args.seed)
    per_class = 300 if args.quick else 1500
    train = corpus(rng, per_class)
    held_out = corpus(rng, per_class // 2)
    sizes = (
        (16 * 1024,)
        if args.quick
        else (4 * 1024, 8 * 1024, 16 * 1024, 32 * 1024, 64 * 1024)
    )

    print(
        f"zstd {zstandard.ZSTD_VERSION} level {args.level}; {len(train)} training"
        f" answers, {len(held_out)} held out; classes: "
        + ", ".join(c.value for c in GENERATORS)
    )
    plain = measure_plain(held_out, args.level)
    summary: list[list[str]] = []
    for dict_size in sizes:
        comp, train_s = trained_compressor(train, dict_size=dict_size, level=args.level)
        with_dict = measure_dict(held_out, comp)
        comp.close()
        print(
            f"\ndictionary size {dict_size // 1024} KiB per class (training"
            f" {train_s * 1000:.0f} ms for {len(GENERATORS)} classes)"
        )
        print(rig.format_table(HEADER, report(plain, with_dict)))
        small_p, small_d = plain["all < 2 KiB"], with_dict["all < 2 KiB"]
        gain = small_d.ratio / small_p.ratio
        summary.append(
            [
                f"{dict_size // 1024} KiB",
                f"{small_p.ratio:.2f}",
                f"{small_d.ratio:.2f}",
                rig.fmt_ratio(gain),
                "yes" if gain >= 2.0 else "NO",
            ]
        )
    print("\nanswers under 2 KiB: target dict ratio >= 2x plain zstd's")
    print(
        rig.format_table(("dict size", "plain", "dict", "gain", "target met"), summary)
    )
    print("\n" + rig.rerun_line("bench.bench_compress", argv_used))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
