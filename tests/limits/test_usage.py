from __future__ import annotations

import gzip
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import pytest

from gateway.limits import Usage, UsageTap
from tests.hostileupstream import gzip_bomb

CHAT_JSON = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                # Text that looks like usage must not fool the tap.
                "message": {"role": "assistant", "content": 'say "usage": {"total_tokens": 1}'},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 19,
            "completion_tokens": 10,
            "total_tokens": 29,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        },
        "system_fingerprint": "fp_1",
    }
)


def chat_stream(include_usage: bool = True, crlf: bool = False) -> bytes:
    usage_null: dict[str, Any] = {"usage": None} if include_usage else {}
    events: list[dict[str, Any]] = [
        {"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant"}}], **usage_null},
        *(
            {"id": "c", "choices": [{"index": 0, "delta": {"content": w}}], **usage_null}
            for w in ["Hello", " there", '"usage": {"total_tokens": 5}']
        ),
        {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], **usage_null},
    ]
    if include_usage:
        events.append(
            {
                "id": "c",
                "choices": [],
                "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
            }
        )
    sep = b"\r\n" if crlf else b"\n"
    body = b"".join(b"data: " + orjson.dumps(e) + sep + sep for e in events)
    return body + b"data: [DONE]" + sep + sep


def responses_stream(padding: int = 0) -> bytes:
    response: dict[str, Any] = {
        "id": "resp_1",
        "object": "response",
        "status": "in_progress",
        "output": [],
        "usage": None,
    }
    completed = {
        **response,
        "status": "completed",
        "output": [
            {"type": "message", "content": [{"type": "output_text", "text": "x" * padding}]}
        ],
        "usage": {
            "input_tokens": 36,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 87,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 123,
        },
        "user": None,
        "metadata": {},
    }
    events = [
        ("response.created", {"type": "response.created", "response": response}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Hi"}),
        ("response.completed", {"type": "response.completed", "response": completed}),
    ]
    return b"".join(
        b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
        for name, data in events
    )


def feed_all(tap: UsageTap, chunks: Iterable[bytes]) -> Usage | None:
    for chunk in chunks:
        tap.feed(chunk)
    return tap.finish()


def split_every(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_chat_json_body() -> None:
    tap = UsageTap("application/json")
    assert feed_all(tap, split_every(CHAT_JSON, 50)) == Usage(19, 10, 29)


def test_large_json_body_keeps_only_a_bounded_tail() -> None:
    body = orjson.dumps(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": [0.001] * 256} for i in range(40)
            ],
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 8, "total_tokens": 8},
        }
    )
    assert len(body) > 60_000
    tap = UsageTap("application/json", keep_bytes=16_384, tail_bytes=4096)
    for chunk in split_every(body, 1000):
        tap.feed(chunk)
        assert len(tap._buf) <= 16_384 + 1000
    assert tap.finish() == Usage(8, 0, 8)


def test_json_without_usage_is_none() -> None:
    tap = UsageTap("application/json; charset=utf-8")
    assert feed_all(tap, [b'{"error": {"message": "no", "type": "x"}}']) is None


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000])
def test_chat_stream_split_at_awkward_boundaries(size: int) -> None:
    tap = UsageTap("text/event-stream")
    assert feed_all(tap, split_every(chat_stream(), size)) == Usage(12, 3, 15)


def test_chat_stream_with_crlf_lines() -> None:
    tap = UsageTap("text/event-stream; charset=utf-8")
    assert feed_all(tap, split_every(chat_stream(crlf=True), 5)) == Usage(12, 3, 15)


def test_chat_stream_without_include_usage_has_none() -> None:
    tap = UsageTap("text/event-stream")
    assert feed_all(tap, split_every(chat_stream(include_usage=False), 17)) is None


def test_usage_is_known_as_soon_as_its_event_completes() -> None:
    body = chat_stream()
    cut = body.index(b"data: [DONE]")
    tap = UsageTap("text/event-stream")
    tap.feed(body[: cut - 1])  # the usage event's blank line is not complete yet
    assert tap.usage is None
    tap.feed(body[cut - 1 : cut])
    assert tap.usage == Usage(12, 3, 15)


@pytest.mark.parametrize("size", [3, 100, 4096])
def test_responses_stream_completed_event(size: int) -> None:
    tap = UsageTap("text/event-stream")
    assert feed_all(tap, split_every(responses_stream(), size)) == Usage(36, 87, 123)


def test_responses_stream_with_a_huge_completed_event_keeps_its_tail() -> None:
    body = responses_stream(padding=300_000)
    tap = UsageTap("text/event-stream", keep_bytes=32_768, tail_bytes=8192)
    for chunk in split_every(body, 4096):
        tap.feed(chunk)
        assert len(tap._buf) <= 32_768 + 4096
    assert tap.finish() == Usage(36, 87, 123)


def test_responses_api_json_body() -> None:
    body = orjson.dumps(
        {
            "id": "resp_1",
            "object": "response",
            "output": [],
            "usage": {"input_tokens": 5, "output_tokens": 6, "total_tokens": 11},
            "metadata": {"usage": "a string, not usage"},
        }
    )
    assert feed_all(UsageTap("application/json"), [body]) == Usage(5, 6, 11)


def test_usage_without_total_adds_input_and_output() -> None:
    body = b'{"usage": {"input_tokens": 5, "output_tokens": 6}}'
    assert feed_all(UsageTap("application/json"), [body]) == Usage(5, 6, 11)


def test_embeddings_json_body() -> None:
    body = orjson.dumps(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
            "usage": {"prompt_tokens": 8, "total_tokens": 8},
        }
    )
    assert feed_all(UsageTap("application/json"), [body]) == Usage(8, 0, 8)


def _deflate(data: bytes) -> bytes:
    return zlib.compress(data)  # HTTP's "deflate" is zlib-wrapped (RFC 9110 §8.4.1.2)


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("x-gzip", gzip.compress), ("deflate", _deflate)],
)
def test_gzip_and_deflate_bodies_are_inflated_from_a_copy(
    encoding: str, compress: Callable[[bytes], bytes]
) -> None:
    expected = feed_all(UsageTap("application/json"), [CHAT_JSON])
    assert expected is not None
    body = compress(CHAT_JSON)
    assert feed_all(UsageTap("application/json", encoding), [body]) == expected
    # Split at every byte: the streaming decompressor carries state across chunks.
    assert feed_all(UsageTap("application/json", encoding), split_every(body, 1)) == expected


def test_gzip_event_stream_flushed_per_event_is_inflated() -> None:
    expected = feed_all(UsageTap("text/event-stream"), [chat_stream()])
    assert expected is not None
    compressor = zlib.compressobj(wbits=31)  # gzip, as the upstream streams it
    chunks = [
        compressor.compress(event + b"\n\n") + compressor.flush(zlib.Z_SYNC_FLUSH)
        for event in chat_stream().split(b"\n\n")
        if event
    ]
    chunks.append(compressor.flush())
    assert feed_all(UsageTap("text/event-stream", "gzip"), chunks) == expected


@pytest.mark.parametrize("encoding", ["br", "zstd"])
def test_encodings_without_a_stdlib_decoder_are_given_up(encoding: str) -> None:
    assert feed_all(UsageTap("application/json", encoding), [b"\x00compressed"]) is None


def test_corrupt_gzip_is_given_up_without_raising() -> None:
    assert feed_all(UsageTap("application/json", "gzip"), [b"\x1f\x8bnot really"]) is None


def test_relayed_chunk_objects_are_not_altered_by_inflating() -> None:
    body = gzip.compress(CHAT_JSON)
    before = bytes(body)
    UsageTap("application/json", "gzip").feed(body)
    assert body == before


def test_unlabelled_gzip_is_recognised_and_given_up() -> None:
    assert feed_all(UsageTap("application/json"), [gzip.compress(CHAT_JSON)]) is None
    assert feed_all(UsageTap("text/event-stream"), [gzip.compress(chat_stream())]) is None


def test_binary_bodies_are_not_read() -> None:
    tap = UsageTap("audio/mpeg")
    assert feed_all(tap, [b'"usage": {"total_tokens": 3}']) is None


def test_feeding_a_chunk_without_usage_costs_a_few_microseconds() -> None:
    chunk = (
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o",'
        b'"choices":[{"index":0,"delta":{"content":" token"},"finish_reason":null}],'
        b'"usage":null}\n\n'
    )
    tap = UsageTap("text/event-stream")
    n = 20_000
    start = time.perf_counter()
    for _ in range(n):
        tap.feed(chunk)
    per_chunk = (time.perf_counter() - start) / n
    assert tap.usage is None
    assert per_chunk < 20e-6, f"{per_chunk * 1e6:.1f} µs per chunk"


# -- Bounded whatever the upstream sends ----------------------------------------------------------


def test_a_gzip_bomb_is_given_up_quickly_without_inflating_it() -> None:
    bomb = gzip_bomb(1 << 30)  # 1 GiB of zeros in about 1 MB
    tap = UsageTap("application/json", "gzip")
    started = time.perf_counter()
    for chunk in split_every(bomb, 64 * 1024):
        tap.feed(chunk)
        assert len(tap._buf) <= 256 * 1024
    usage = tap.finish()
    elapsed = time.perf_counter() - started
    assert usage is None
    assert elapsed < 0.5, f"{elapsed:.2f} s on a gzip bomb"


def test_one_chunk_of_a_bomb_never_holds_much_more_than_a_mebibyte_inflated() -> None:
    bomb = gzip_bomb(256 << 20)
    tap = UsageTap("text/event-stream", "gzip")
    tracemalloc.start()
    try:
        tap.feed(bomb)  # one chunk inflating to 256 MiB
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tap.finish() is None
    assert peak < 4 << 20, f"{peak / 2**20:.1f} MiB held at once"


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_body_inflating_past_the_cap_is_given_up_and_one_within_it_is_read(
    encoding: str,
) -> None:
    body = gzip.compress(CHAT_JSON) if encoding == "gzip" else _deflate(CHAT_JSON)
    size = len(CHAT_JSON)
    within = UsageTap("application/json", encoding, max_inflated_bytes=size)
    assert feed_all(within, split_every(body, 7)) == Usage(19, 10, 29)
    past = UsageTap("application/json", encoding, max_inflated_bytes=size - 1)
    assert feed_all(past, split_every(body, 7)) is None


def test_a_json_body_of_repeated_usage_keys_is_searched_in_bounded_time() -> None:
    # Each key would otherwise be tried with 64 closing braces, each trial copying up to the
    # whole buffer: quadratic, minutes for this body.
    body = b'{"x": ' + b'"usage": {' * 25_000 + b"}" * 64
    tap = UsageTap("application/json")
    started = time.perf_counter()
    assert feed_all(tap, split_every(body, 16 * 1024)) is None
    assert time.perf_counter() - started < 0.5


def test_an_event_stream_of_repeated_usage_keys_is_searched_in_bounded_time() -> None:
    event = b"data: " + b'"usage": {' * 300 + b"}" * 64 + b"\n\n"
    tap = UsageTap("text/event-stream")
    started = time.perf_counter()
    for _ in range(1000):
        tap.feed(event)
    assert tap.finish() is None
    assert time.perf_counter() - started < 0.5


def test_a_huge_event_after_a_boundary_keeps_only_its_tail() -> None:
    tap = UsageTap("text/event-stream", keep_bytes=32_768, tail_bytes=8192)
    tap.feed(b"data: {}\n\n" + b"x" * 1_000_000)
    assert len(tap._buf) <= 32_768
