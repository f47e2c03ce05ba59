"""A deterministic OpenAI-compatible upstream for the test suite and the benchmark.

The gateway's end-to-end tests put the gateway in front of this server and compare what clients
get through the gateway with what the server sends directly, so every byte it sends is a function
of the request: fixed ids, a fixed ``created`` timestamp, token counts computed from the request,
no clocks and no randomness (the only per-request value is the ``x-request-id`` sequence number).

Three pieces:

- ``FakeUpstreamApp``: a pure ASGI app (no Starlette) serving ``/v1/chat/completions``,
  ``/v1/completions``, ``/v1/embeddings``, ``/v1/responses``, ``/v1/models[/{id}]`` and
  ``/v1/echo[/...]`` in OpenAI's shapes, and ``/v1/messages`` in Anthropic's (its replies and
  streams; errors stay OpenAI-shaped), recording every request it receives.
- ``FakeUpstream``: runs the app under ``uvicorn.Server`` in a background thread on a free
  127.0.0.1 port, as a sync or async context manager, and gives the test thread the record.
- ``main()``: ``python -m tests.fakeupstream --host 127.0.0.1 --port N`` for the benchmark
  (uvloop + httptools, no recording, silent except for errors).

Misbehaviour is asked for per request with headers, so a test can make the same endpoint fail
when it is driven through the gateway (which passes unknown headers through):

=========================  ======================================================================
``x-fake-status: NNN``     reply NNN (400-599) with an OpenAI-shaped error; 429 adds
                           ``retry-after: 0``
``x-fake-chunks: N``       content pieces: stream events, or words of a non-stream reply (5)
``x-fake-interval-ms: M``  pause between stream events (0)
``x-fake-delay-ms: M``     pause before the response headers (0)
``x-fake-gzip: 1``         gzip the body, ``content-encoding: gzip``; streams are compressed
                           incrementally and each event is sync-flushed as it is produced
``x-fake-hang: 1``         never send headers; wait for the client to disconnect
``x-fake-hang-after: N``   send N events (non-stream: N bytes), then go silent until disconnect
``x-fake-fail-after: N``   send N events (non-stream: N bytes), then drop the connection
                           without finishing the body
``x-fake-bytes: N``        pad a non-stream JSON body to at least N bytes (``x_fake_padding``)
=========================  ======================================================================

An unknown ``x-fake-*`` header, or a value that does not parse, is refused with a 400 so a typo
cannot silently turn a failure test into a success test. Hang-after wins over fail-after. A cut
non-stream body always stops at least one byte short of its ``content-length``.

Every reply carries ``x-request-id: req_fake_<n>`` (n counts requests per app, from 1, and is not
reset by ``clear()``) and ``OPENAI_HEADERS``. Reply bodies are published as functions
(``chat_completion_body(request)``, ``chat_completion_events(request)``, ...) so tests compare
bytes instead of re-deriving them.

Disconnects are noticed by listening on ``receive()`` while a reply waits or streams; a plain
non-stream reply is sent in one go without that listener (the benchmark's hot path). When the
server stops, every waiting request is released: one that has not sent headers gets a 503, one
mid-body has its connection dropped, so uvicorn's graceful shutdown never waits on a hung test.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import gzip
import itertools
import logging
import socket
import struct
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Self, TypeVar

import orjson
import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
RawHeaders = list[tuple[bytes, bytes]]

T = TypeVar("T")

# -- Fixed values --------------------------------------------------------------------------------

CREATED: Final = 1_700_000_000
CHAT_ID: Final = "chatcmpl-fake"
COMPLETION_ID: Final = "cmpl-fake"
RESPONSE_ID: Final = "resp_fake"
MESSAGE_ID: Final = "msg_fake"
SYSTEM_FINGERPRINT: Final = "fp_fake"
DEFAULT_MODEL: Final = "gpt-fake"
MODELS: Final = ("gpt-fake", "gpt-4o-mini", "text-embedding-fake")
DEFAULT_CHUNKS: Final = 5
EMBEDDING_DIMENSIONS: Final = 8
# The reply text is these words, cycled: piece i is " " + word (no space before the first).
WORDS: Final = ("This", "is", "a", "deterministic", "reply", "from", "the", "fake", "upstream.")
# What OpenAI sends on every response; tests check the gateway passes or replaces them.
OPENAI_HEADERS: Final[tuple[tuple[bytes, bytes], ...]] = (
    (b"openai-organization", b"fake-org"),
    (b"openai-version", b"2020-10-01"),
    (b"x-ratelimit-limit-requests", b"10000"),
    (b"x-ratelimit-limit-tokens", b"200000"),
    (b"x-ratelimit-remaining-requests", b"9999"),
    (b"x-ratelimit-remaining-tokens", b"199900"),
    (b"x-ratelimit-reset-requests", b"6ms"),
    (b"x-ratelimit-reset-tokens", b"30ms"),
)
STANDARD_PROMPT: Final = "Say something deterministic."

_JSON = b"application/json"
_SSE = b"text/event-stream; charset=utf-8"
_DONE = b"data: [DONE]\n\n"
_CACHE_LIMIT = 512  # entries per cache of rendered bodies
_CACHEABLE_BYTES = 64 * 1024
_MAX_CHUNKS = 100_000
_MAX_BYTES = 256 * 1024 * 1024


# -- Rendering: pure functions of the request ------------------------------------------------------


class BadRequest(ValueError):
    """The request body is not one OpenAI would accept; becomes a 400 in OpenAI's shape."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: Any = None
) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def pieces(chunks: int) -> list[str]:
    """The content pieces of a reply of ``chunks`` tokens; their concatenation is the text."""
    return [("" if i == 0 else " ") + WORDS[i % len(WORDS)] for i in range(chunks)]


def count_tokens(chars: int) -> int:
    """The fake tokenizer: one token per started four characters."""
    return (chars + 3) // 4


def _text_chars(content: Any) -> int:
    """Characters of text in a message ``content``: a string, or a list of parts with ``text``."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(
            len(part["text"])
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0


def _model(request: Mapping[str, Any]) -> str:
    model = request.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter", "model")
    return model


def _stream(request: Mapping[str, Any]) -> tuple[bool, bool]:
    """``(stream, include_usage)`` as the request asks."""
    options = request.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return request.get("stream") is True, include_usage


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


# Chat completions


def chat_inputs(request: Mapping[str, Any]) -> tuple[str, int]:
    """``(model, prompt_tokens)`` of a chat request: tokens of all text in ``messages``."""
    model = _model(request)
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", "messages")
    chars = sum(_text_chars(m.get("content")) for m in messages if isinstance(m, dict))
    return model, count_tokens(chars)


def _chat_body(model: str, prompt: int, chunks: int) -> bytes:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(pieces(chunks)),
        "refusal": None,
        "annotations": [],
    }
    return orjson.dumps(
        {
            "id": CHAT_ID,
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
            ],
            "usage": _usage(prompt, chunks),
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
    )


def _chat_events(model: str, prompt: int, chunks: int, include_usage: bool) -> tuple[bytes, ...]:
    head = {
        "id": CHAT_ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "service_tier": "default",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    # With include_usage OpenAI sends "usage": null on every chunk, then one with no choices.
    tail = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse({**head, "choices": [choice], **tail})

    events = [
        chunk({"role": "assistant", "content": text} if i == 0 else {"content": text}, None)
        for i, text in enumerate(pieces(chunks))
    ]
    events.append(chunk({"role": "assistant"} if chunks == 0 else {}, "stop"))
    if include_usage:
        events.append(_sse({**head, "choices": [], "usage": _usage(prompt, chunks)}))
    events.append(_DONE)
    return tuple(events)


def chat_completion_body(request: Mapping[str, Any], *, chunks: int = DEFAULT_CHUNKS) -> bytes:
    """The exact non-stream body the fake sends for this chat request (uncompressed)."""
    return _chat_body(*chat_inputs(request), chunks)


def chat_completion_events(
    request: Mapping[str, Any], *, chunks: int = DEFAULT_CHUNKS
) -> tuple[bytes, ...]:
    """The exact SSE events (``data: ...\\n\\n`` each, ``[DONE]`` last) for a chat stream."""
    return _chat_events(*chat_inputs(request), chunks, _stream(request)[1])


def standard_chat_request(
    model: str = DEFAULT_MODEL, *, stream: bool = False, include_usage: bool = False
) -> dict[str, Any]:
    """The request the benchmark and the byte-comparison tests send."""
    request: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": STANDARD_PROMPT}],
    }
    if stream:
        request["stream"] = True
        if include_usage:
            request["stream_options"] = {"include_usage": True}
    return request


def standard_chat_completion(model: str = DEFAULT_MODEL) -> bytes:
    """The exact body of the standard non-stream chat response for ``model``."""
    return chat_completion_body(standard_chat_request(model))


# Legacy completions


def completion_inputs(request: Mapping[str, Any]) -> tuple[str, int]:
    """``(model, prompt_tokens)``: a string prompt, a list of strings, or token arrays."""
    model = _model(request)
    prompt = request.get("prompt", "")
    items = prompt if isinstance(prompt, list) else [prompt]
    tokens = 0
    for item in items:
        if isinstance(item, str):
            tokens += count_tokens(len(item))
        elif isinstance(item, int):
            tokens += 1
        elif isinstance(item, list):
            tokens += len(item)
        else:
            raise BadRequest("'prompt' must be a string, an array of strings or tokens", "prompt")
    return model, tokens


def _completion_body(model: str, prompt: int, chunks: int) -> bytes:
    choice = {
        "text": "".join(pieces(chunks)),
        "index": 0,
        "logprobs": None,
        "finish_reason": "stop",
    }
    usage = {"prompt_tokens": prompt, "completion_tokens": chunks, "total_tokens": prompt + chunks}
    return orjson.dumps(
        {
            "id": COMPLETION_ID,
            "object": "text_completion",
            "created": CREATED,
            "model": model,
            "choices": [choice],
            "usage": usage,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
    )


def _completion_events(
    model: str, prompt: int, chunks: int, include_usage: bool
) -> tuple[bytes, ...]:
    head = {"id": COMPLETION_ID, "object": "text_completion", "created": CREATED, "model": model}
    tail = {"system_fingerprint": SYSTEM_FINGERPRINT, **({"usage": None} if include_usage else {})}

    def chunk(text: str, finish_reason: str | None) -> bytes:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        return _sse({**head, "choices": [choice], **tail})

    events = [chunk(text, None) for text in pieces(chunks)]
    events.append(chunk("", "stop"))
    if include_usage:
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": chunks,
            "total_tokens": prompt + chunks,
        }
        events.append(_sse({**head, "choices": [], **tail, "usage": usage}))
    events.append(_DONE)
    return tuple(events)


def completion_body(request: Mapping[str, Any], *, chunks: int = DEFAULT_CHUNKS) -> bytes:
    return _completion_body(*completion_inputs(request), chunks)


def completion_events(
    request: Mapping[str, Any], *, chunks: int = DEFAULT_CHUNKS
) -> tuple[bytes, ...]:
    return _completion_events(*completion_inputs(request), chunks, _stream(request)[1])


# Embeddings


def embedding_vector(text: str, dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """A deterministic vector whose values are multiples of 1/128, exact in float32."""
    seed = zlib.crc32(text.encode())
    return [(((seed >> (i % 24)) + 37 * i) % 256 - 128) / 128 for i in range(dimensions)]


def embeddings_body(request: Mapping[str, Any]) -> bytes:
    """The exact body for an embeddings request (``encoding_format`` float or base64)."""
    model = _model(request)
    raw = request.get("input")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        items: list[Any] = [raw]
    elif isinstance(raw, list) and raw:
        items = raw
    else:
        raise BadRequest("'input' must be a string or a non-empty array", "input")
    dimensions = request.get("dimensions", EMBEDDING_DIMENSIONS)
    if not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1:
        raise BadRequest("'dimensions' must be a positive integer", "dimensions")
    encoding = request.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise BadRequest("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    data = []
    tokens = 0
    for index, item in enumerate(items):
        if isinstance(item, str):
            text, tokens = item, tokens + count_tokens(len(item))
        elif isinstance(item, list) and all(isinstance(t, int) for t in item):
            text, tokens = ",".join(map(str, item)), tokens + len(item)
        else:
            raise BadRequest("'input' items must be strings or token arrays", "input")
        vector = embedding_vector(text, dimensions)
        embedding: Any = vector
        if encoding == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return orjson.dumps(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


# Responses API


def response_inputs(request: Mapping[str, Any]) -> tuple[str, int]:
    """``(model, input_tokens)``: tokens of ``instructions`` and of the text in ``input``."""
    model = _model(request)
    chars = _text_chars(request.get("instructions"))
    raw = request.get("input", "")
    if isinstance(raw, str):
        chars += len(raw)
    elif isinstance(raw, list):
        chars += sum(_text_chars(i.get("content")) for i in raw if isinstance(i, dict))
    else:
        raise BadRequest("'input' must be a string or an array of input items", "input")
    return model, count_tokens(chars)


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": MESSAGE_ID,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _response_object(model: str, prompt: int, chunks: int, completed: bool) -> dict[str, Any]:
    output, usage = [], None
    if completed:
        output = [_message_item("completed", [_output_text("".join(pieces(chunks)))])]
        usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": chunks,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + chunks,
        }
    return {
        "id": RESPONSE_ID,
        "object": "response",
        "created_at": CREATED,
        "status": "completed" if completed else "in_progress",
        "background": False,
        "completed_at": CREATED if completed else None,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "max_tool_calls": None,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": [],
        "top_logprobs": 0,
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": {},
    }


def _response_body(model: str, prompt: int, chunks: int) -> bytes:
    return orjson.dumps(_response_object(model, prompt, chunks, completed=True))


def _response_events(model: str, prompt: int, chunks: int) -> tuple[bytes, ...]:
    text = "".join(pieces(chunks))
    where = {"item_id": MESSAGE_ID, "output_index": 0, "content_index": 0}
    events: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": _response_object(model, prompt, chunks, False)}),
        ("response.in_progress", {"response": _response_object(model, prompt, chunks, False)}),
        (
            "response.output_item.added",
            {"output_index": 0, "item": _message_item("in_progress", [])},
        ),
        ("response.content_part.added", {**where, "part": _output_text("")}),
        *(
            ("response.output_text.delta", {**where, "delta": piece, "logprobs": []})
            for piece in pieces(chunks)
        ),
        ("response.output_text.done", {**where, "text": text, "logprobs": []}),
        ("response.content_part.done", {**where, "part": _output_text(text)}),
        (
            "response.output_item.done",
            {"output_index": 0, "item": _message_item("completed", [_output_text(text)])},
        ),
        ("response.completed", {"response": _response_object(model, prompt, chunks, True)}),
    ]
    return tuple(
        b"event: %s\ndata: %s\n\n"
        % (kind.encode(), orjson.dumps({"type": kind, "sequence_number": seq, **payload}))
        for seq, (kind, payload) in enumerate(events)
    )


def response_body(request: Mapping[str, Any], *, chunks: int = DEFAULT_CHUNKS) -> bytes:
    return _response_body(*response_inputs(request), chunks)


def response_events(
    request: Mapping[str, Any], *, chunks: int = DEFAULT_CHUNKS
) -> tuple[bytes, ...]:
    """The exact ``event: <type>\\ndata: {...}\\n\\n`` events of a Responses stream (no [DONE])."""
    return _response_events(*response_inputs(request), chunks)


# Anthropic Messages


def message_inputs(request: Mapping[str, Any]) -> tuple[str, int, int]:
    """``(model, input_tokens, cache_read_input_tokens)`` of an Anthropic Messages request:
    tokens of the text in ``system`` and ``messages``. Text in a block marked ``cache_control``
    counts as read from a warm prompt cache; Anthropic's ``input_tokens`` leaves it out."""
    model = _model(request)
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: Field required", "messages")
    max_tokens = request.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise BadRequest("max_tokens: Field required", "max_tokens")
    contents = [request.get("system")]
    contents += [m.get("content") for m in messages if isinstance(m, dict)]
    chars = cached = 0
    for content in contents:
        if not isinstance(content, list):
            chars += _text_chars(content)
            continue
        for block in content:
            if isinstance(block, dict) and isinstance(block.get("text"), str):
                if block.get("cache_control") is not None:
                    cached += len(block["text"])
                else:
                    chars += len(block["text"])
    return model, count_tokens(chars), count_tokens(cached)


def _message_usage(prompt: int, cached: int, output: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": output,
        "service_tier": "standard",
    }


def _message_object(
    model: str, content: list[dict[str, Any]], done: bool, usage: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": MESSAGE_ID,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": "end_turn" if done else None,
        "stop_sequence": None,
        "usage": usage,
    }


def _message_body(model: str, prompt: int, cached: int, chunks: int) -> bytes:
    content = [{"type": "text", "text": "".join(pieces(chunks))}]
    return orjson.dumps(
        _message_object(model, content, True, _message_usage(prompt, cached, chunks))
    )


def _message_events(model: str, prompt: int, cached: int, chunks: int) -> tuple[bytes, ...]:
    # As Anthropic streams: message_start holds the input counts and an output count of 1;
    # message_delta holds the final, cumulative output count.
    start = _message_object(model, [], False, _message_usage(prompt, cached, 1))
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"message": start}),
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ("ping", {}),
        *(
            ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": piece}})
            for piece in pieces(chunks)
        ),
        ("content_block_stop", {"index": 0}),
        (
            "message_delta",
            {
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": chunks},
            },
        ),
        ("message_stop", {}),
    ]
    return tuple(
        b"event: %s\ndata: %s\n\n" % (kind.encode(), orjson.dumps({"type": kind, **payload}))
        for kind, payload in events
    )


def anthropic_message_body(request: Mapping[str, Any], *, chunks: int = DEFAULT_CHUNKS) -> bytes:
    """The exact non-stream body the fake sends for this Messages request (uncompressed)."""
    return _message_body(*message_inputs(request), chunks)


def anthropic_message_events(
    request: Mapping[str, Any], *, chunks: int = DEFAULT_CHUNKS
) -> tuple[bytes, ...]:
    """The exact ``event: <type>\\ndata: {...}\\n\\n`` events of a Messages stream."""
    return _message_events(*message_inputs(request), chunks)


# Models


def _model_object(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": CREATED, "owned_by": "fake-upstream"}


def models_body(models: Sequence[str] = MODELS) -> bytes:
    return orjson.dumps({"object": "list", "data": [_model_object(m) for m in models]})


def model_body(model: str) -> bytes:
    return orjson.dumps(_model_object(model))


# Uploads: multipart/form-data requests, answered without reading the form (tests read what
# arrived from the request log).

TRANSCRIPTION_TEXT: Final = "A deterministic transcription from the fake upstream."
FILE_ID: Final = "file-fake"


def transcription_body() -> bytes:
    """The reply to ``POST /v1/audio/transcriptions`` (``response_format: json``)."""
    return orjson.dumps({"text": TRANSCRIPTION_TEXT})


def file_object_body(size: int) -> bytes:
    """The reply to ``POST /v1/files``: a file object; ``bytes`` is the request body's size."""
    return orjson.dumps(
        {
            "id": FILE_ID,
            "object": "file",
            "bytes": size,
            "created_at": CREATED,
            "filename": "upload",
            "purpose": "assistants",
            "status": "processed",
        }
    )


def pad_body(body: bytes, size: int) -> bytes:
    """``body`` (a JSON object) with an ``x_fake_padding`` member making it >= ``size`` bytes."""
    missing = size - len(body)
    if missing <= 0 or not body.endswith(b"}"):
        return body
    filler = b'"x_fake_padding":"' + b"x" * max(0, missing - 20) + b'"'
    return body[:-1] + (b"," if body != b"{}" else b"") + filler + b"}"


# -- What the server received ----------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class RecordedRequest:
    """One request as the server received it.

    ``completed_at`` is set when the last body message is handed to the server and
    ``disconnected_at`` when the client went away before that; both are ``time.monotonic()``
    values, written under the log's lock from the server thread.
    """

    request_id: str
    method: str
    path: str  # the raw path as received, without the query
    query_string: str
    headers: list[tuple[str, str]]  # as received, lower-case names
    body: bytes
    received_at: float
    completed_at: float | None = None
    disconnected_at: float | None = None

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    def header_values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    def json(self) -> Any:
        return orjson.loads(self.body)


class RequestLog:
    """The thread-safe list of what the server received, with waits for the test thread."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._requests: list[RecordedRequest] = []

    def append(self, request: RecordedRequest) -> None:
        with self._changed:
            self._requests.append(request)
            self._changed.notify_all()

    def mark_completed(self, request: RecordedRequest) -> None:
        with self._changed:
            request.completed_at = time.monotonic()
            self._changed.notify_all()

    def mark_disconnected(self, request: RecordedRequest) -> None:
        with self._changed:
            request.disconnected_at = time.monotonic()
            self._changed.notify_all()

    def snapshot(self) -> list[RecordedRequest]:
        with self._changed:
            return list(self._requests)

    def clear(self) -> None:
        with self._changed:
            self._requests.clear()

    def wait_for(self, predicate: Callable[[list[RecordedRequest]], T | None], timeout: float) -> T:
        """Block until ``predicate(requests)`` returns something other than None; return it."""
        with self._changed:
            deadline = time.monotonic() + timeout
            while (found := predicate(self._requests)) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [f"{r.method} {r.path}" for r in self._requests[-5:]]
                    raise TimeoutError(
                        f"fake upstream: condition not met in {timeout}s; saw {seen}"
                    )
                self._changed.wait(remaining)
            return found


def _first_disconnected(
    request: RecordedRequest | None,
) -> Callable[[list[RecordedRequest]], RecordedRequest | None]:
    def predicate(requests: list[RecordedRequest]) -> RecordedRequest | None:
        candidates = [request] if request is not None else requests
        return next((r for r in candidates if r.disconnected_at is not None), None)

    return predicate


# -- The ASGI app ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Controls:
    """The misbehaviour a request asked for with ``x-fake-*`` headers."""

    status: int | None = None
    chunks: int = DEFAULT_CHUNKS
    interval: float = 0.0
    delay: float = 0.0
    gzip: bool = False
    hang: bool = False
    hang_after: int | None = None
    fail_after: int | None = None
    min_bytes: int = 0

    @property
    def waits(self) -> bool:
        return self.delay > 0 or self.interval > 0 or self.hang or self.hang_after is not None

    @property
    def cut(self) -> int | None:
        """Where the body stops short (hang-after wins over fail-after), or None."""
        return self.hang_after if self.hang_after is not None else self.fail_after


_NO_CONTROLS: Final = Controls()
_INT_CONTROLS: Final = {
    b"x-fake-status": "status",
    b"x-fake-chunks": "chunks",
    b"x-fake-interval-ms": "interval",
    b"x-fake-delay-ms": "delay",
    b"x-fake-hang-after": "hang_after",
    b"x-fake-fail-after": "fail_after",
    b"x-fake-bytes": "min_bytes",
}
_BOOL_CONTROLS: Final = {b"x-fake-gzip": "gzip", b"x-fake-hang": "hang"}
_TRUE: Final = (b"1", b"true", b"yes", b"on")
_FALSE: Final = (b"0", b"false", b"no", b"off", b"")


def parse_controls(headers: Sequence[tuple[bytes, bytes]]) -> Controls:
    """Read the ``x-fake-*`` headers; raise BadRequest for unknown ones or bad values."""
    found: dict[str, Any] = {}
    for name, raw in headers:
        if not name.startswith(b"x-fake-"):
            continue
        value = raw.strip().lower()
        if (key := _INT_CONTROLS.get(name)) is not None:
            if not value.isdigit():
                raise BadRequest(f"{name.decode()} must be a non-negative integer, got {raw!r}")
            found[key] = int(value)
        elif (key := _BOOL_CONTROLS.get(name)) is not None:
            if value not in _TRUE and value not in _FALSE:
                raise BadRequest(f"{name.decode()} must be 1 or 0, got {raw!r}")
            found[key] = value in _TRUE
        else:
            raise BadRequest(f"unknown control header {name.decode('latin-1')!r}")
    if not found:
        return _NO_CONTROLS
    status = found.get("status")
    if status is not None and status != 200 and not 400 <= status <= 599:
        raise BadRequest(f"x-fake-status must be 200 or 400-599, got {status}")
    if status == 200:
        found["status"] = None
    if found.get("chunks", 0) > _MAX_CHUNKS or found.get("min_bytes", 0) > _MAX_BYTES:
        raise BadRequest(f"at most {_MAX_CHUNKS} chunks and {_MAX_BYTES} bytes, please")
    for key in ("interval", "delay"):
        if key in found:
            found[key] = found[key] / 1000
    return Controls(**found)


_STATUS_ERRORS: Final = {
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


def status_error_body(status: int) -> bytes:
    """The OpenAI-shaped error body sent for ``x-fake-status: <status>``."""
    type, code = _STATUS_ERRORS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    return error_body(
        f"The fake upstream was asked to fail with status {status}.", type, None, code
    )


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    body: bytes = b""
    events: tuple[bytes, ...] | None = None  # a stream, sent one event per body message
    headers: tuple[tuple[bytes, bytes], ...] = ()


def _bad_request(exc: BadRequest) -> _Reply:
    return _Reply(400, error_body(exc.message, param=exc.param))


def _not_found(method: str, path: str) -> _Reply:
    return _Reply(404, error_body(f"Invalid URL ({method} {path})"))


_INVALID_JSON: Final = _Reply(
    400,
    error_body(
        "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
        "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
        "sent was not valid JSON.)"
    ),
)


_SHUTTING_DOWN: Final = _Reply(
    503,
    error_body("The fake upstream is shutting down.", "server_error"),
    headers=((b"connection", b"close"),),
)


class _Stopped(Exception):
    """A wait ended because the client disconnected or the server is closing."""


class AbortConnection(Exception):
    """Raised inside the app after the response started: uvicorn then drops the connection.

    uvicorn logs every exception escaping an app with its traceback; ``quiet_deliberate_aborts``
    filters exactly these records out, so a failure test does not print a traceback storm.
    """


class _QuietAborts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], AbortConnection))


def quiet_deliberate_aborts() -> None:
    """Drop uvicorn's error records for ``AbortConnection`` (idempotent; others still log)."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietAborts) for f in logger.filters):
        logger.addFilter(_QuietAborts())


@dataclass(slots=True)
class _Exchange:
    """One request's state while the app answers it."""

    request_id: bytes
    record: RecordedRequest | None
    stop: asyncio.Event | None = None  # set on client disconnect or server close
    started: bool = False
    finished: bool = False
    disconnected: bool = False


class FakeUpstreamApp:
    """The deterministic OpenAI-compatible ASGI app.

    State lives on the instance: the request log, the ``x-request-id`` counter, caches of
    rendered bodies and the events that release waiting requests when the server closes.
    """

    def __init__(self, *, record: bool = True, models: Sequence[str] = MODELS) -> None:
        self.log = RequestLog()
        self.record = record
        self.models = tuple(models)
        self._sequence = itertools.count(1)
        self._bodies: dict[tuple[Any, ...], bytes] = {}
        self._streams: dict[tuple[Any, ...], tuple[bytes, ...]] = {}
        self._gzipped: dict[bytes, bytes] = {}
        self._waiting: set[asyncio.Event] = set()
        self._closing = False
        self._models_body = models_body(self.models)
        self._post: dict[str, Callable[[dict[str, Any], Controls], _Reply]] = {
            "/v1/chat/completions": self._chat,
            "/v1/completions": self._completions,
            "/v1/embeddings": self._embeddings,
            "/v1/responses": self._responses,
            "/v1/messages": self._messages,
        }

    def close(self) -> None:
        """Release every waiting request, now and from now on; call on the server's loop."""
        self._closing = True
        for stop in self._waiting:
            stop.set()

    def reopen(self) -> None:
        """Let requests wait again (before the app is served anew after ``close()``)."""
        self._closing = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off and websockets are not served
        received_at = time.monotonic()
        body, gone = await _read_body(receive)
        request_id = b"req_fake_%d" % next(self._sequence)
        record = None
        if self.record:
            raw_path = scope.get("raw_path")
            record = RecordedRequest(
                request_id=request_id.decode(),
                method=scope["method"],
                path=raw_path.decode("latin-1") if raw_path else scope["path"],
                query_string=scope["query_string"].decode("latin-1"),
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
                body=body,
                received_at=received_at,
            )
            self.log.append(record)
        exchange = _Exchange(request_id, record)
        if gone:
            if record is not None:
                self.log.mark_disconnected(record)
            return
        try:
            controls = parse_controls(scope["headers"])
        except BadRequest as exc:
            controls, reply = _NO_CONTROLS, _bad_request(exc)
        else:
            reply = self._route(scope, body, controls)
        await self._respond(reply, controls, exchange, receive, send)

    # Routing and endpoints

    def _route(self, scope: Scope, body: bytes, controls: Controls) -> _Reply:
        if controls.status is not None:
            status = controls.status
            extra = ((b"retry-after", b"0"),) if status == 429 else ()
            return _Reply(status, status_error_body(status), headers=extra)
        method, path = scope["method"], scope["path"]
        if (endpoint := self._post.get(path)) is not None:
            if method != "POST":
                return _not_found(method, path)
            try:
                request = orjson.loads(body)
            except orjson.JSONDecodeError:
                return _INVALID_JSON
            if not isinstance(request, dict):
                return _INVALID_JSON
            try:
                reply = endpoint(request, controls)
            except BadRequest as exc:
                return _bad_request(exc)
        elif path == "/v1/echo" or path.startswith("/v1/echo/"):
            reply = _Reply(200, self._echo(scope, body))
        elif path == "/v1/audio/transcriptions" and method == "POST":
            reply = _Reply(200, transcription_body())
        elif path == "/v1/files" and method == "POST":
            reply = _Reply(200, file_object_body(len(body)))
        elif path == "/v1/models" and method == "GET":
            reply = _Reply(200, self._models_body)
        elif path.startswith("/v1/models/") and method == "GET":
            model = path.removeprefix("/v1/models/")
            if model not in self.models:
                message = f"The model '{model}' does not exist"
                return _Reply(404, error_body(message, param="model", code="model_not_found"))
            reply = _Reply(200, model_body(model))
        else:
            return _not_found(method, path)
        if controls.min_bytes and reply.events is None:
            reply = dataclasses.replace(reply, body=pad_body(reply.body, controls.min_bytes))
        return reply

    def _cached_body(self, kind: str, render: Callable[..., bytes], *args: Any) -> bytes:
        key = (kind, *args)
        body = self._bodies.get(key)
        if body is None:
            if len(self._bodies) >= _CACHE_LIMIT:
                self._bodies.clear()
            body = self._bodies[key] = render(*args)
        return body

    def _cached_events(
        self, kind: str, render: Callable[..., tuple[bytes, ...]], *args: Any
    ) -> tuple[bytes, ...]:
        key = (kind, *args)
        events = self._streams.get(key)
        if events is None:
            if len(self._streams) >= _CACHE_LIMIT:
                self._streams.clear()
            events = self._streams[key] = render(*args)
        return events

    def _chat(self, request: dict[str, Any], controls: Controls) -> _Reply:
        model, prompt = chat_inputs(request)
        n = controls.chunks
        stream, usage = _stream(request)
        if stream:
            return _Reply(
                200, events=self._cached_events("chat", _chat_events, model, prompt, n, usage)
            )
        return _Reply(200, self._cached_body("chat", _chat_body, model, prompt, n))

    def _completions(self, request: dict[str, Any], controls: Controls) -> _Reply:
        model, prompt = completion_inputs(request)
        n = controls.chunks
        stream, usage = _stream(request)
        if stream:
            events = self._cached_events("text", _completion_events, model, prompt, n, usage)
            return _Reply(200, events=events)
        return _Reply(200, self._cached_body("text", _completion_body, model, prompt, n))

    def _embeddings(self, request: dict[str, Any], controls: Controls) -> _Reply:
        return _Reply(200, embeddings_body(request))

    def _responses(self, request: dict[str, Any], controls: Controls) -> _Reply:
        model, prompt = response_inputs(request)
        n = controls.chunks
        if request.get("stream") is True:
            return _Reply(
                200, events=self._cached_events("resp", _response_events, model, prompt, n)
            )
        return _Reply(200, self._cached_body("resp", _response_body, model, prompt, n))

    def _messages(self, request: dict[str, Any], controls: Controls) -> _Reply:
        model, prompt, cached = message_inputs(request)
        n = controls.chunks
        if request.get("stream") is True:
            events = self._cached_events("msg", _message_events, model, prompt, cached, n)
            return _Reply(200, events=events)
        return _Reply(200, self._cached_body("msg", _message_body, model, prompt, cached, n))

    def _echo(self, scope: Scope, body: bytes) -> bytes:
        raw_path = scope.get("raw_path")
        return orjson.dumps(
            {
                "method": scope["method"],
                "path": raw_path.decode("latin-1") if raw_path else scope["path"],
                "query": scope["query_string"].decode("latin-1"),
                "headers": [
                    [k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]
                ],
                "body": body.decode("utf-8", "replace"),
            }
        )

    # Sending

    def _gzip(self, body: bytes) -> bytes:
        compressed = self._gzipped.get(body)
        if compressed is None:
            compressed = gzip.compress(body, mtime=0)  # mtime=0: the same bytes every time
            if len(body) <= _CACHEABLE_BYTES:
                if len(self._gzipped) >= _CACHE_LIMIT:
                    self._gzipped.clear()
                self._gzipped[body] = compressed
        return compressed

    def _start(
        self, reply: _Reply, controls: Controls, exchange: _Exchange, length: int | None
    ) -> Message:
        headers: RawHeaders = [(b"content-type", _SSE if reply.events is not None else _JSON)]
        if length is not None:
            headers.append((b"content-length", b"%d" % length))
        if controls.gzip:
            headers.append((b"content-encoding", b"gzip"))
        headers.append((b"x-request-id", exchange.request_id))
        headers.append((b"openai-processing-ms", b"%d" % round(controls.delay * 1000)))
        headers.extend(OPENAI_HEADERS)
        headers.extend(reply.headers)
        return {"type": "http.response.start", "status": reply.status, "headers": headers}

    def _finishing(self, exchange: _Exchange) -> None:
        exchange.finished = True
        if exchange.record is not None:
            self.log.mark_completed(exchange.record)

    async def _respond(
        self, reply: _Reply, controls: Controls, exchange: _Exchange, receive: Receive, send: Send
    ) -> None:
        if reply.events is None and not controls.waits:
            # The hot path: one start and one body message, no watcher task.
            await self._send_whole(reply, controls, exchange, send)
            return
        exchange.stop = stop = asyncio.Event()
        if self._closing:
            stop.set()
        self._waiting.add(stop)
        watcher = asyncio.create_task(self._watch(receive, exchange))
        try:
            await self._play(reply, controls, exchange, send)
        except _Stopped:
            if exchange.disconnected:
                return  # nobody is listening; uvicorn expects nothing more
            if exchange.started:
                raise AbortConnection("the fake upstream is shutting down") from None
            length = len(_SHUTTING_DOWN.body)
            await send(self._start(_SHUTTING_DOWN, _NO_CONTROLS, exchange, length))
            await send({"type": "http.response.body", "body": _SHUTTING_DOWN.body})
        finally:
            self._waiting.discard(stop)
            watcher.cancel()

    async def _watch(self, receive: Receive, exchange: _Exchange) -> None:
        """Wait for ``http.disconnect``; if the response had not finished, record it."""
        while (await receive())["type"] != "http.disconnect":
            pass
        if not exchange.finished:
            exchange.disconnected = True
            if exchange.record is not None:
                self.log.mark_disconnected(exchange.record)
            assert exchange.stop is not None
            exchange.stop.set()

    async def _pause(self, seconds: float, stop: asyncio.Event) -> None:
        if not stop.is_set():
            try:
                async with asyncio.timeout(seconds):
                    await stop.wait()
            except TimeoutError:
                return
        raise _Stopped

    async def _play(
        self, reply: _Reply, controls: Controls, exchange: _Exchange, send: Send
    ) -> None:
        stop = exchange.stop
        assert stop is not None
        if controls.delay:
            await self._pause(controls.delay, stop)
        if controls.hang:
            await stop.wait()
            raise _Stopped
        if reply.events is None:
            await self._send_whole(reply, controls, exchange, send)
            return
        exchange.started = True
        await send(self._start(reply, controls, exchange, None))
        await self._stream(reply.events, controls, exchange, send)
        if controls.cut is not None:
            await self._after_cut(controls, exchange)

    async def _send_whole(
        self, reply: _Reply, controls: Controls, exchange: _Exchange, send: Send
    ) -> None:
        """Send a non-stream reply, or only its first bytes when told to cut it short."""
        body = self._gzip(reply.body) if controls.gzip else reply.body
        exchange.started = True
        await send(self._start(reply, controls, exchange, len(body)))
        if controls.cut is None:
            self._finishing(exchange)
            await send({"type": "http.response.body", "body": body})
            return
        part = body[: max(0, min(controls.cut, len(body) - 1))]  # never all: it must be short
        await send({"type": "http.response.body", "body": part, "more_body": True})
        await self._after_cut(controls, exchange)

    async def _after_cut(self, controls: Controls, exchange: _Exchange) -> None:
        if controls.hang_after is not None:
            assert exchange.stop is not None  # hang-after is a wait: it took the watched path
            await exchange.stop.wait()
            raise _Stopped
        raise AbortConnection(f"x-fake-fail-after: {controls.fail_after}")

    async def _stream(
        self,
        events: tuple[bytes, ...],
        controls: Controls,
        exchange: _Exchange,
        send: Send,
    ) -> None:
        stop = exchange.stop
        assert stop is not None
        cut = controls.cut
        compressor = zlib.compressobj(wbits=31) if controls.gzip else None
        count = len(events) if cut is None else min(cut, len(events))
        for i in range(count):
            if i and controls.interval:
                await self._pause(controls.interval, stop)
            elif stop.is_set():
                raise _Stopped
            event = events[i]
            last = cut is None and i == count - 1
            if compressor is not None:
                flush = zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH
                event = compressor.compress(event) + compressor.flush(flush)
            if last:
                self._finishing(exchange)
            await send({"type": "http.response.body", "body": event, "more_body": not last})


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The whole request body, and whether the client disconnected while sending it."""
    message = await receive()
    if message["type"] == "http.disconnect":
        return b"", True
    body = message.get("body", b"")
    if not message.get("more_body", False):
        return body, False
    parts = [body]
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(parts), True
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts), False


# -- Running it ------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn's server, quicker to notice a stop, releasing waiting requests when it shuts down.

    Without the release, uvicorn's graceful shutdown would wait forever for a hung request.
    """

    def __init__(self, config: uvicorn.Config, app: FakeUpstreamApp) -> None:
        super().__init__(config)
        self.fake_app = app

    async def main_loop(self) -> None:
        # uvicorn looks at should_exit every 0.1 s; tests start and stop servers often, so look
        # every 5 ms, and still run uvicorn's housekeeping (on_tick) every 0.1 s as it expects.
        counter = 0
        while not await self.on_tick(counter):
            for _ in range(20):
                await asyncio.sleep(0.005)
                if self.should_exit:
                    break
            counter = (counter + 1) % 864_000

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.fake_app.close()
        await super().shutdown(sockets)


def _config(app: FakeUpstreamApp, loop: str, **kwargs: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http="httptools",
        loop=loop,
        interface="asgi3",
        lifespan="off",
        access_log=False,
        server_header=False,
        date_header=False,
        log_level="warning",
        **kwargs,
    )


class FakeUpstream:
    """The fake upstream on a free 127.0.0.1 port, in a background thread with its own loop.

    Use as ``with FakeUpstream() as upstream:`` or ``async with FakeUpstream() as upstream:``.
    The record (``requests``, ``last()``...) is read from the test thread.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        record: bool = True,
        models: Sequence[str] = MODELS,
        start_timeout: float = 10.0,
    ) -> None:
        self.app = FakeUpstreamApp(record=record, models=models)
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._start_timeout = start_timeout
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    # Lifecycle

    def _begin(self) -> None:
        if self._thread is not None:
            raise RuntimeError("FakeUpstream is already running")
        quiet_deliberate_aborts()
        # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose
        # proto says TCP, and without it every reply written in two parts (headers, body)
        # waits ~40 ms for the client's delayed ACK (Nagle).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._requested_port))
        except OSError:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        self.app.reopen()
        # log_config=None: leave the process's logging alone (records propagate to the root).
        self._server = _Server(_config(self.app, "asyncio", log_config=None), self.app)
        self._failure = None
        self._thread = threading.Thread(
            target=self._run,
            args=(self._server, sock),
            name=f"fake-upstream-{self._port}",
            daemon=True,
        )
        self._thread.start()

    def _run(self, server: _Server, sock: socket.socket) -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # SystemExit from a failed startup included
            self._failure = exc
        finally:
            sock.close()

    def _check_started(self, deadline: float) -> bool:
        assert self._server is not None
        assert self._thread is not None
        if self._server.started:
            return True
        if not self._thread.is_alive():
            self._thread = None
            raise RuntimeError("the fake upstream failed to start") from self._failure
        if time.monotonic() > deadline:
            self.stop()
            raise TimeoutError("the fake upstream did not start in time")
        return False

    def start(self) -> Self:
        self._begin()
        deadline = time.monotonic() + self._start_timeout
        while not self._check_started(deadline):
            time.sleep(0.001)
        return self

    async def astart(self) -> Self:
        self._begin()
        deadline = time.monotonic() + self._start_timeout
        while not self._check_started(deadline):
            await asyncio.sleep(0.001)
        return self

    def _signal_stop(self) -> threading.Thread | None:
        thread, self._thread = self._thread, None
        if thread is not None and self._server is not None:
            self._server.should_exit = True
        return thread

    def _joined(self, thread: threading.Thread) -> None:
        thread.join(5.0)
        if thread.is_alive():
            raise RuntimeError("the fake upstream did not stop")
        if self._failure is not None:
            raise RuntimeError("the fake upstream's server failed") from self._failure

    def stop(self) -> None:
        """Stop serving and join the thread.

        Waiting requests are released first: without headers yet they get a 503, mid-body their
        connection is dropped. Idle keep-alive connections are closed.
        """
        if (thread := self._signal_stop()) is not None:
            self._joined(thread)

    async def astop(self) -> None:
        if (thread := self._signal_stop()) is not None:
            deadline = time.monotonic() + 5.0
            while thread.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            self._joined(thread)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await self.astart()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.astop()

    # Where it listens

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeUpstream has not been started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI SDK's ``base_url``: ``url`` + ``/v1``."""
        return self.url + "/v1"

    # What it received

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the requests received since the last ``clear()``, oldest first."""
        return self.app.log.snapshot()

    def last(self) -> RecordedRequest:
        """The most recent request; LookupError if there was none since the last ``clear()``."""
        requests = self.app.log.snapshot()
        if not requests:
            raise LookupError("the fake upstream has received no request")
        return requests[-1]

    def clear(self) -> None:
        self.app.log.clear()

    def wait_for(
        self, predicate: Callable[[list[RecordedRequest]], T | None], timeout: float = 5.0
    ) -> T:
        """Block until ``predicate(requests)`` is not None and return it (TimeoutError if not)."""
        return self.app.log.wait_for(predicate, timeout)

    def wait_for_disconnect(
        self, timeout: float = 5.0, request: RecordedRequest | None = None
    ) -> RecordedRequest:
        """The first request (or ``request``) whose client disconnected before it finished.

        Blocks the calling thread: from a test whose event loop drives the client, use
        ``await wait_for_disconnect_async()`` so the client can actually close.
        """
        return self.wait_for(_first_disconnected(request), timeout)

    async def wait_for_disconnect_async(
        self, timeout: float = 5.0, request: RecordedRequest | None = None
    ) -> RecordedRequest:
        predicate = _first_disconnected(request)
        deadline = time.monotonic() + timeout
        while (found := predicate(self.app.log.snapshot())) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no client disconnected within {timeout}s")
            await asyncio.sleep(0.002)
        return found


# -- As its own process (the benchmark's upstream) -------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--record", action="store_true", help="keep a log of requests (memory!)")
    args = parser.parse_args(argv)
    app = FakeUpstreamApp(record=args.record)
    config = _config(app, "uvloop", host=args.host, port=args.port, backlog=4096)
    quiet_deliberate_aborts()  # after Config, which applies uvicorn's logging config
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it handled
        _Server(config, app).run()


if __name__ == "__main__":
    main()
