from __future__ import annotations

import gzip
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import pytest

from gateway.openai.usage import Usage, UsageTap
from tests.support.hostileupstream import gzip_bomb

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


# -- Every provider and shape the README names ----------------------------------------------------
#
# Realistic bodies, written from each provider's published API reference. What is charged
# (``total_tokens``) is every token the provider processed: input (cache reads and writes
# included) plus output. OpenAI's prompt_tokens / input_tokens already include cached tokens
# (``*_tokens_details.cached_tokens`` says how many); Anthropic's input_tokens excludes them, so
# its cache_creation_input_tokens and cache_read_input_tokens are added.

SSE = "text/event-stream; charset=utf-8"
JSON = "application/json"


def sse(*events: tuple[str | None, object]) -> bytes:
    """An event stream: ``event: <name>`` (when named) and one ``data:`` line per event."""
    out = b""
    for name, data in events:
        if name is not None:
            out += b"event: " + name.encode() + b"\n"
        out += b"data: " + (data if isinstance(data, bytes) else orjson.dumps(data)) + b"\n\n"
    return out


def openai_chat_chunks(usage: dict[str, Any] | None) -> bytes:
    head = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o"}

    def chunk(delta: dict[str, Any], finish: str | None) -> tuple[None, dict[str, Any]]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return None, {**head, "choices": [choice], "usage": None}

    events = [
        chunk({"role": "assistant", "content": ""}, None),
        chunk({"content": 'the "usage": {"prompt_tokens": 1} key'}, None),
        chunk({}, "stop"),
    ]
    if usage is not None:
        events.append((None, {**head, "choices": [], "usage": usage}))
    return sse(*events, (None, b"[DONE]"))


OPENAI_CHAT_USAGE = {
    "prompt_tokens": 2006,
    "completion_tokens": 300,
    "total_tokens": 2306,
    "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
OPENAI_CHAT_JSON = orjson.dumps(
    {
        "id": "chatcmpl-9",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi.", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": OPENAI_CHAT_USAGE,
        "service_tier": "default",
        "system_fingerprint": "fp_1",
    }
)
COMPLETIONS_USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
COMPLETIONS_JSON = orjson.dumps(
    {
        "id": "cmpl-9",
        "object": "text_completion",
        "created": 1,
        "model": "gpt-3.5-turbo-instruct",
        "choices": [{"text": " a test.", "index": 0, "logprobs": None, "finish_reason": "length"}],
        "usage": COMPLETIONS_USAGE,
    }
)
COMPLETIONS_STREAM = sse(
    *(
        (None, {"id": "cmpl-9", "object": "text_completion", "choices": [choice], "usage": None})
        for choice in (
            {"text": " a", "index": 0, "logprobs": None, "finish_reason": None},
            {"text": " test.", "index": 0, "logprobs": None, "finish_reason": "length"},
        )
    ),
    (
        None,
        {"id": "cmpl-9", "object": "text_completion", "choices": [], "usage": COMPLETIONS_USAGE},
    ),
    (None, b"[DONE]"),
)
RESPONSES_USAGE = {
    "input_tokens": 2006,
    "input_tokens_details": {"cached_tokens": 1920},
    "output_tokens": 300,
    "output_tokens_details": {"reasoning_tokens": 128},
    "total_tokens": 2306,
}


def openai_response(status: str, usage: dict[str, Any] | None) -> dict[str, Any]:
    output = [] if usage is None else [{"type": "message", "role": "assistant", "content": []}]
    return {
        "id": "resp_9",
        "object": "response",
        "status": status,
        "output": output,
        "usage": usage,
        "user": None,
        "metadata": {},
    }


RESPONSES_JSON = orjson.dumps(openai_response("completed", RESPONSES_USAGE))


def responses_events(completed: bool) -> bytes:
    events: list[tuple[str | None, object]] = [
        (
            "response.created",
            {"type": "response.created", "response": openai_response("in_progress", None)},
        ),
        (
            "response.in_progress",
            {"type": "response.in_progress", "response": openai_response("in_progress", None)},
        ),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Hi"}),
    ]
    if completed:
        events.append(
            (
                "response.completed",
                {
                    "type": "response.completed",
                    "response": openai_response("completed", RESPONSES_USAGE),
                },
            )
        )
    return sse(*events)


EMBEDDINGS_JSON = orjson.dumps(
    {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0023, -0.0093, 0.0157]}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }
)


def anthropic_usage(
    input_tokens: int, output_tokens: int, *, creation: int = 0, read: int = 0
) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": creation,
        "cache_read_input_tokens": read,
        "cache_creation": {"ephemeral_5m_input_tokens": creation, "ephemeral_1h_input_tokens": 0},
        "output_tokens": output_tokens,
        "service_tier": "standard",
        "server_tool_use": None,
    }


def anthropic_message(content: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-20250514",
        "content": content,
        "stop_reason": "end_turn" if content else None,
        "stop_sequence": None,
        "usage": usage,
    }


ANTHROPIC_JSON = orjson.dumps(
    anthropic_message(
        [{"type": "text", "text": 'About "usage": {"input_tokens": 1}...'}],
        anthropic_usage(50, 300, creation=1000, read=2000),
    )
)


def anthropic_events(
    start: dict[str, Any], *deltas: dict[str, Any], tool_text: str = "{}"
) -> bytes:
    """A Messages stream: message_start with ``start`` as its usage, a text and a tool_use
    block, then one message_delta per ``deltas`` (several when server tools run)."""

    def block(index: int, kind: str, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return kind, {"type": kind, "index": index, **payload}

    events: list[tuple[str | None, object]] = [
        ("message_start", {"type": "message_start", "message": anthropic_message([], start)}),
        block(0, "content_block_start", {"content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
        block(0, "content_block_delta", {"delta": {"type": "text_delta", "text": "Hello"}}),
        block(0, "content_block_stop", {}),
        block(
            1,
            "content_block_start",
            {
                "content_block": {
                    "type": "tool_use",
                    "id": "toolu_01",
                    "name": "report",
                    "input": {},
                }
            },
        ),
        block(
            1,
            "content_block_delta",
            {"delta": {"type": "input_json_delta", "partial_json": tool_text}},
        ),
        block(1, "content_block_stop", {}),
    ]
    for usage in deltas:
        events.append(
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                    "usage": usage,
                },
            )
        )
    if deltas:
        events.append(("message_stop", {"type": "message_stop"}))
    return sse(*events)


PROVIDER_CASES = [
    pytest.param(
        JSON, OPENAI_CHAT_JSON, Usage(2006, 300, 2306, cache_read_tokens=1920), id="openai-chat"
    ),
    pytest.param(
        SSE,
        openai_chat_chunks(OPENAI_CHAT_USAGE),
        Usage(2006, 300, 2306, cache_read_tokens=1920),
        id="openai-chat-stream",
    ),
    pytest.param(JSON, COMPLETIONS_JSON, Usage(5, 7, 12), id="openai-completions"),
    pytest.param(SSE, COMPLETIONS_STREAM, Usage(5, 7, 12), id="openai-completions-stream"),
    pytest.param(
        JSON, RESPONSES_JSON, Usage(2006, 300, 2306, cache_read_tokens=1920), id="openai-responses"
    ),
    pytest.param(
        SSE,
        responses_events(completed=True),
        Usage(2006, 300, 2306, cache_read_tokens=1920),
        id="openai-responses-stream",
    ),
    pytest.param(JSON, EMBEDDINGS_JSON, Usage(8, 0, 8), id="openai-embeddings"),
    # Anthropic: input_tokens + cache_creation_input_tokens + cache_read_input_tokens + output.
    pytest.param(
        JSON,
        ANTHROPIC_JSON,
        Usage(3050, 300, 3350, cache_read_tokens=2000, cache_creation_tokens=1000),
        id="anthropic-messages",
    ),
    # message_delta says only the cumulative output: the input comes from message_start.
    pytest.param(
        SSE,
        anthropic_events(anthropic_usage(1000, 1), {"output_tokens": 15}),
        Usage(1000, 15, 1015),
        id="anthropic-stream",
    ),
    # Recent API versions repeat input and cache counts, cumulative, in message_delta.
    pytest.param(
        SSE,
        anthropic_events(anthropic_usage(10, 1, read=2000), anthropic_usage(10, 250, read=2000)),
        Usage(2010, 250, 2260, cache_read_tokens=2000),
        id="anthropic-stream-cached",
    ),
    # Server tools may send several message_delta: each is cumulative, never added up.
    pytest.param(
        SSE,
        anthropic_events(
            anthropic_usage(40, 1, creation=500),
            {"output_tokens": 40},
            {"output_tokens": 90},
            tool_text='{"usage": {"output_tokens": 9999}}',
        ),
        Usage(540, 90, 630, cache_creation_tokens=500),
        id="anthropic-stream-server-tools",
    ),
]


def _gzipped(content_type: str, body: bytes) -> list[bytes]:
    """``body`` gzipped as an upstream sends it: a stream sync-flushed per event."""
    if content_type != SSE:
        return split_every(gzip.compress(body), 13)
    compressor = zlib.compressobj(wbits=31)
    chunks = [
        compressor.compress(event + b"\n\n") + compressor.flush(zlib.Z_SYNC_FLUSH)
        for event in body.split(b"\n\n")
        if event
    ]
    return [*chunks, compressor.flush()]


TRANSPORTS: dict[str, tuple[str | None, Callable[[str, bytes], list[bytes]]]] = {
    "whole": (None, lambda _, body: [body]),
    "split": (None, lambda _, body: split_every(body, 7)),
    "gzip": ("gzip", _gzipped),
}


@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize(("content_type", "body", "expected"), PROVIDER_CASES)
def test_each_provider_is_charged_input_cache_and_output_tokens(
    content_type: str, body: bytes, expected: Usage, transport: str
) -> None:
    encoding, encode = TRANSPORTS[transport]
    tap = UsageTap(content_type, encoding)
    assert feed_all(tap, encode(content_type, body)) == expected
    assert expected.total_tokens == expected.input_tokens + expected.output_tokens


@pytest.mark.parametrize(
    ("body", "so_far"),
    [
        pytest.param(openai_chat_chunks(None), None, id="openai-chat-before-its-usage-chunk"),
        pytest.param(responses_events(completed=False), None, id="openai-responses-in-progress"),
        # message_start's usage is a start, not a count: its output_tokens is 1 whatever follows.
        pytest.param(
            anthropic_events(anthropic_usage(1000, 1, read=24)),
            Usage(1024, 1, 1025, cache_read_tokens=24),
            id="anthropic-after-message_start",
        ),
        # The same event with its data over two lines (legal SSE): found by the fallback search,
        # which cannot tell the event apart from a final one but by its name.
        pytest.param(
            b'event: message_start\ndata: {"type": "message_start",\ndata: "message": '
            + orjson.dumps(anthropic_message([], anthropic_usage(1000, 1)))
            + b"}\n\n",
            Usage(1000, 1, 1001),
            id="anthropic-after-a-multiline-message_start",
        ),
    ],
)
def test_a_stream_cut_before_its_final_usage_settles_nothing(
    body: bytes, so_far: Usage | None
) -> None:
    """The client left, or the upstream failed, before the final count: ``finish()`` is None
    and the reservation stands (the upstream generated until it was cancelled)."""
    tap = UsageTap(SSE)
    for chunk in split_every(body, 64):
        tap.feed(chunk)
    assert tap.usage == so_far
    assert not tap.final
    assert tap.finish() is None


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        pytest.param(
            {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
            Usage(3, 4, 7),
            id="openai",
        ),
        # An OpenAI-compatible server whose total counts tokens neither part does (Gemini's
        # thinking tokens, github.com/router-for-me/CLIProxyAPI/pull/5743): the larger is charged.
        pytest.param(
            {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 20},
            Usage(3, 4, 20),
            id="total-larger-than-its-parts",
        ),
        pytest.param(
            {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 1},
            Usage(3, 4, 7),
            id="total-smaller-than-its-parts",
        ),
        pytest.param({"input_tokens": 5, "output_tokens": 6}, Usage(5, 6, 11), id="no-total"),
        pytest.param({"total_tokens": 9}, Usage(0, 0, 9), id="only-a-total"),
        pytest.param({"output_tokens": 15}, Usage(0, 15, 15), id="anthropic-message_delta"),
        pytest.param(
            {"input_tokens": None, "cache_read_input_tokens": 7, "output_tokens": 1},
            Usage(7, 1, 8, cache_read_tokens=7),
            id="null-counts-are-absent",
        ),
        pytest.param(
            {"prompt_tokens": -1, "completion_tokens": True, "total_tokens": "9"},
            None,
            id="not-counts",
        ),
        pytest.param({"object": "usage"}, None, id="no-counts"),
    ],
)
def test_usage_objects(usage: dict[str, Any], expected: Usage | None) -> None:
    body = orjson.dumps({"usage": usage})
    assert feed_all(UsageTap(JSON), [body]) == expected


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
