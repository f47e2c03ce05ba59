"""What the fake sends: every body and stream event, a pure function of the request.

Fixed ids, a fixed ``created`` timestamp, token counts computed from the request; published
so that tests compare bytes instead of re-deriving them.
"""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Final

import orjson

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

_DONE = b"data: [DONE]\n\n"


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


def _usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    """OpenAI's chat usage; ``cached`` of the prompt tokens read from the prompt cache (at most
    all of them, as OpenAI counts them inside ``prompt_tokens``)."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": min(cached, prompt), "audio_tokens": 0},
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


def _chat_body(model: str, prompt: int, chunks: int, cached: int = 0) -> bytes:
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
            "usage": _usage(prompt, chunks, cached),
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
    )


def _chat_events(
    model: str, prompt: int, chunks: int, include_usage: bool, cached: int = 0
) -> tuple[bytes, ...]:
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
        events.append(_sse({**head, "choices": [], "usage": _usage(prompt, chunks, cached)}))
    events.append(_DONE)
    return tuple(events)


def chat_completion_body(
    request: Mapping[str, Any], *, chunks: int = DEFAULT_CHUNKS, cached: int = 0
) -> bytes:
    """The exact non-stream body the fake sends for this chat request (uncompressed)."""
    return _chat_body(*chat_inputs(request), chunks, cached)


def chat_completion_events(
    request: Mapping[str, Any], *, chunks: int = DEFAULT_CHUNKS, cached: int = 0
) -> tuple[bytes, ...]:
    """The exact SSE events (``data: ...\\n\\n`` each, ``[DONE]`` last) for a chat stream."""
    return _chat_events(*chat_inputs(request), chunks, _stream(request)[1], cached)


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


# Errors asked for with ``x-fake-status``


_STATUS_ERRORS: Final = {
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


def status_error_body(status: int, error_code: str | None = None) -> bytes:
    """The OpenAI-shaped error body sent for ``x-fake-status: <status>`` (with
    ``x-fake-error-code``: that ``code`` instead of the status's usual one)."""
    type, code = _STATUS_ERRORS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    if error_code is not None:
        code = error_code
    return error_body(
        f"The fake upstream was asked to fail with status {status}.", type, None, code
    )
