"""Contract of sidecar.cache.compress: codecs, dictionaries, bounded decompression."""

from __future__ import annotations

import functools
import json
import os
import random
import tracemalloc
from collections.abc import Callable

import pytest
import zstandard

from sidecar.cache.compress import (
    Codec,
    CompressionError,
    Compressor,
    ContentClass,
    CorruptFrameError,
    Dictionary,
    UnknownDictionaryError,
    classify,
)

BOMB_BYTES = 200 * 1024 * 1024


def chat_answer(rng: random.Random) -> bytes:
    """A small chat completion body with per-answer variety."""
    doc = {
        "id": "chatcmpl-" + "".join(rng.choices("abcdefghijklmnop0123456789", k=29)),
        "object": "chat.completion",
        "created": 1_730_000_000 + rng.randrange(10**7),
        "model": rng.choice(["gpt-4o-mini", "llama-3.1-8b", "qwen2.5-7b"]),
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": " ".join(
                        rng.choice(["yes", "the", "cache", "answer", "model", "ok"])
                        for _ in range(rng.randrange(3, 40))
                    ),
                },
                "finish_reason": rng.choice(["stop", "length"]),
            }
        ],
        "usage": {"prompt_tokens": rng.randrange(900), "completion_tokens": 12},
    }
    return json.dumps(doc).encode()


def answers(n: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    return [chat_answer(rng) for _ in range(n)]


def trained(min_samples: int = 64) -> Compressor:
    """A foreground-training compressor that has trained its chat dictionary."""
    comp = Compressor(min_samples=min_samples, dict_size=4096, background=False)
    for body in answers(min_samples):
        comp.compress(body, ContentClass.CHAT)
    assert comp.current_ids(), "training did not run"
    return comp


def _frame_of_zeros(*, write_size: bool) -> bytes:
    cctx = zstandard.ZstdCompressor(level=3, write_content_size=write_size)
    stream = cctx.compressobj(size=BOMB_BYTES if write_size else -1)
    zeros = bytes(1024 * 1024)
    parts = [stream.compress(zeros) for _ in range(BOMB_BYTES // len(zeros))]
    return b"".join([*parts, stream.flush()])


@functools.cache
def bomb(*, write_size: bool) -> bytes:
    """A ~6 KB frame that inflates to 200 MB (built once per session)."""
    return _frame_of_zeros(write_size=write_size)


def test_compressor_plain_round_trip_returns_same_bytes() -> None:
    """Without a dictionary, compress then decompress gives the input back."""
    comp = Compressor(train=False)
    body = b'{"object":"chat.completion"}' * 20
    packed = comp.compress(body, ContentClass.CHAT)
    out = comp.decompress(
        packed.payload,
        codec=packed.codec,
        dict_id=packed.dict_id,
        size=len(body),
        max_size=len(body),
    )
    assert (packed.codec, packed.dict_id, out) == (Codec.ZSTD, 0, body)


def test_compressor_incompressible_data_is_kept_raw() -> None:
    """Bytes zstd cannot shrink are stored raw, not grown."""
    body = os.urandom(4096)
    packed = Compressor(train=False).compress(body, ContentClass.OTHER)
    assert (packed.codec, packed.payload) == (Codec.RAW, body)


def test_compressor_enough_samples_trains_class_dictionary() -> None:
    """After min_samples answers of a class, its answers use a dictionary."""
    comp = trained()
    packed = comp.compress(answers(1, seed=99)[0], ContentClass.CHAT)
    assert packed.dict_id != 0
    dictionary = comp.dictionary(packed.dict_id)
    assert dictionary is not None
    assert dictionary.content_class is ContentClass.CHAT


def test_compressor_other_class_keeps_no_dictionary() -> None:
    """A dictionary trained for one class is not used for another."""
    comp = trained()
    packed = comp.compress(answers(1, seed=99)[0], ContentClass.EMBEDDING)
    assert packed.dict_id == 0


def test_compressor_background_training_makes_dictionary_current() -> None:
    """Training scheduled on the background thread installs the dictionary."""
    comp = Compressor(min_samples=64, dict_size=4096, background=True)
    try:
        for body in answers(64):
            comp.compress(body, ContentClass.CHAT)
        assert comp.wait_idle(timeout_s=30)
        assert comp.compress(answers(1, 99)[0], ContentClass.CHAT).dict_id != 0
    finally:
        comp.close()


def test_compressor_dictionary_beats_plain_zstd_on_small_answers() -> None:
    """With a trained dictionary, held-out small answers take fewer bytes."""
    comp = trained(min_samples=200)
    plain = zstandard.ZstdCompressor(level=3, write_checksum=False)
    held_out = answers(50, seed=1234)
    with_dict = sum(len(comp.compress(b, ContentClass.CHAT).payload) for b in held_out)
    without = sum(len(plain.compress(b)) for b in held_out)
    assert with_dict * 1.5 < without


def test_compressor_restored_dictionary_reads_earlier_frames() -> None:
    """A dictionary restored into a new compressor decompresses old frames."""
    first = trained()
    body = answers(1, seed=5)[0]
    packed = first.compress(body, ContentClass.CHAT)
    second = Compressor(train=False)
    dictionary = first.dictionary(packed.dict_id)
    assert dictionary is not None
    second.add_dictionary(dictionary)
    out = second.decompress(
        packed.payload,
        codec=packed.codec,
        dict_id=packed.dict_id,
        size=len(body),
        max_size=len(body),
    )
    assert out == body


def test_compressor_unknown_dictionary_raises() -> None:
    """A frame naming a dictionary the compressor lacks cannot be read."""
    first = trained()
    body = answers(1, seed=5)[0]
    packed = first.compress(body, ContentClass.CHAT)
    with pytest.raises(UnknownDictionaryError):
        Compressor(train=False).decompress(
            packed.payload,
            codec=packed.codec,
            dict_id=packed.dict_id,
            size=len(body),
            max_size=len(body),
        )


def peak_bytes_of(call: Callable[[], object]) -> int:
    """The peak of Python-heap allocations made while ``call`` runs."""
    tracemalloc.start()
    try:
        call()
    except CorruptFrameError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


def test_compressor_frame_stating_huge_size_is_refused() -> None:
    """A 6 KB frame whose header claims 200 MB is refused before inflating."""
    frame = bomb(write_size=True)
    assert len(frame) < 8192
    with pytest.raises(CorruptFrameError):
        Compressor(train=False).decompress(
            frame, codec=Codec.ZSTD, dict_id=0, size=1000, max_size=1 << 20
        )


def test_compressor_frame_stating_huge_size_allocates_little() -> None:
    """Refusing the 200 MB frame never allocates its claimed output."""
    comp = Compressor(train=False)
    frame = bomb(write_size=True)
    peak = peak_bytes_of(
        lambda: comp.decompress(
            frame, codec=Codec.ZSTD, dict_id=0, size=1000, max_size=1 << 20
        )
    )
    assert peak < 16 * 1024 * 1024


def test_compressor_unsized_frame_is_cut_at_the_cap() -> None:
    """A frame without a stated size is read in chunks and refused past the cap."""
    frame = bomb(write_size=False)
    assert zstandard.frame_content_size(frame) == -1  # "not stated"
    with pytest.raises(CorruptFrameError):
        Compressor(train=False).decompress(
            frame, codec=Codec.ZSTD, dict_id=0, size=1 << 20, max_size=1 << 20
        )


def test_compressor_unsized_frame_allocates_about_the_cap() -> None:
    """Inflating an unsized bomb stops near the cap instead of at 200 MB."""
    comp = Compressor(train=False)
    frame = bomb(write_size=False)
    peak = peak_bytes_of(
        lambda: comp.decompress(
            frame, codec=Codec.ZSTD, dict_id=0, size=1 << 20, max_size=1 << 20
        )
    )
    assert peak < 16 * 1024 * 1024


def test_compressor_unsized_frame_within_cap_is_read() -> None:
    """A frame without a stated size but within the cap decompresses."""
    body = b"abc" * 1000
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(body)
    out = Compressor(train=False).decompress(
        frame, codec=Codec.ZSTD, dict_id=0, size=len(body), max_size=len(body)
    )
    assert out == body


def test_compressor_size_over_ceiling_is_refused() -> None:
    """A blob whose declared size exceeds the entry ceiling is refused."""
    with pytest.raises(CorruptFrameError):
        Compressor(train=False).decompress(
            b"x" * 10, codec=Codec.RAW, dict_id=0, size=BOMB_BYTES, max_size=1 << 20
        )


def test_compressor_garbage_payload_raises_corrupt_frame() -> None:
    """Bytes that are not a zstd frame raise CorruptFrameError, not ZstdError."""
    with pytest.raises(CorruptFrameError):
        Compressor(train=False).decompress(
            b"definitely not zstd", codec=Codec.ZSTD, dict_id=0, size=19, max_size=99
        )


def test_compressor_too_few_samples_training_returns_none() -> None:
    """zstd's trainer refusing the samples leaves the class without a dictionary."""
    comp = Compressor(min_samples=1000, background=False)
    for body in answers(3):
        comp.compress(body, ContentClass.CHAT)
    assert comp.train(ContentClass.CHAT) is None
    assert comp.current_ids() == frozenset()
    assert comp.stats()["training_failures"] == 1


def test_compressor_new_ids_follow_restored_ids() -> None:
    """Trained ids start above every restored id, so none is reused."""
    donor = trained()
    (old_id,) = donor.current_ids()
    source = donor.dictionary(old_id)
    assert source is not None
    restored = Dictionary(old_id + 41, ContentClass.SSE, source.data)
    comp = Compressor(min_samples=64, dict_size=4096, background=False)
    comp.add_dictionary(restored)
    for body in answers(64):
        comp.compress(body, ContentClass.CHAT)
    assert comp.current_ids() == {old_id + 41, old_id + 42}


def test_compressor_drop_current_dictionary_is_refused() -> None:
    """The dictionary new blobs are compressed with cannot be dropped."""
    comp = trained()
    (current,) = comp.current_ids()
    assert comp.drop_dictionary(current) is False
    assert comp.dictionary(current) is not None


def test_compressor_retrain_keeps_old_dictionary_readable() -> None:
    """After retraining, the previous dictionary still decodes its frames."""
    comp = trained()
    body = answers(1, seed=5)[0]
    old = comp.compress(body, ContentClass.CHAT)
    comp.train(ContentClass.CHAT)
    assert comp.current_ids() != {old.dict_id}
    out = comp.decompress(
        old.payload,
        codec=old.codec,
        dict_id=old.dict_id,
        size=len(body),
        max_size=len(body),
    )
    assert out == body


def test_compressor_samples_stay_within_budget() -> None:
    """Samples kept per class never exceed the byte budget."""
    comp = Compressor(
        train=True, background=False, min_samples=10**6, sample_budget_bytes=10_000
    )
    for body in answers(200):
        comp.compress(body, ContentClass.CHAT)
    assert comp._samples[ContentClass.CHAT].total_bytes <= 10_000


def test_dictionary_encode_decode_round_trip() -> None:
    """A dictionary's persisted form decodes to an equal dictionary."""
    d = Dictionary(9, ContentClass.SSE, b"\x37\xa4\x30\xec" + b"d" * 100)
    assert Dictionary.decode(d.encode()) == d


@pytest.mark.parametrize("raw", [b"", b"\x01\x00", b"\x09\x00\x00\x00\x00\x01xx"])
def test_dictionary_decode_malformed_raises(raw: bytes) -> None:
    """A malformed dictionary record raises CompressionError."""
    with pytest.raises(CompressionError):
        Dictionary.decode(raw)


@pytest.mark.parametrize(
    ("content_type", "stream", "route", "expected"),
    [
        ("text/event-stream", False, "chat", ContentClass.SSE),
        ("application/json", True, "chat", ContentClass.SSE),
        ("application/json", False, "chat", ContentClass.CHAT),
        ("application/json", False, "completions", ContentClass.COMPLETION),
        ("application/json", False, "embeddings", ContentClass.EMBEDDING),
        ("application/json", False, "models", ContentClass.OTHER),
    ],
)
def test_classify_route_and_stream_pick_class(
    content_type: str, stream: bool, route: str, expected: ContentClass
) -> None:
    """Streams are sse; other answers take their class from the route name."""
    assert classify(content_type=content_type, stream=stream, route=route) is expected
