"""A deterministic OpenAI-compatible upstream for the test suite and the benchmark.

The gateway's end-to-end tests put the gateway in front of this server and compare what clients
get through the gateway with what the server sends directly, so every byte it sends is a function
of the request: fixed ids, a fixed ``created`` timestamp, token counts computed from the request,
no clocks and no randomness (the only per-request value is the ``x-request-id`` sequence number).

Its pieces, one module each:

- ``bodies``: every body and stream event it sends, as pure functions of the request
  (``chat_completion_body(request)``, ``chat_completion_events(request)``, ...), and the fixed
  values they use.
- ``controls``: the ``x-fake-*`` request headers below, parsed into ``Controls``.
- ``record``: ``RecordedRequest`` and the thread-safe ``RequestLog`` the test thread reads.
- ``app``: ``FakeUpstreamApp``, a pure ASGI app (no Starlette) serving ``/v1/chat/completions``,
  ``/v1/completions``, ``/v1/embeddings``, ``/v1/responses``, ``/v1/models[/{id}]`` and
  ``/v1/echo[/...]`` in OpenAI's shapes, and ``/v1/messages`` in Anthropic's (its replies and
  streams; errors stay OpenAI-shaped), recording every request it receives.
- ``server``: ``FakeUpstream`` runs the app under ``uvicorn.Server`` in a background thread on a
  free 127.0.0.1 port, as a sync or async context manager, and gives the test thread the record;
  ``main()`` is ``python -m tests.support.fakeupstream --host 127.0.0.1 --port N`` for the
  benchmark (uvloop + httptools, no recording, silent except for errors).

This package re-exports what tests use, so ``from tests.support.fakeupstream import ...`` needs
no module name.

Misbehaviour is asked for per request with headers, so a test can make the same endpoint fail
when it is driven through the gateway (which passes unknown headers through):

===========================  ======================================================================
``x-fake-status: NNN``       reply NNN (400-599) with an OpenAI-shaped error; 429 adds
                             ``retry-after: 0``
``x-fake-retry-after: N``    with a status: ``retry-after: N`` (seconds) instead
``x-fake-error-code: W``     with a status: the error body's ``code`` is W (a word)
``x-fake-chunks: N``         content pieces: stream events, or words of a non-stream reply (5)
``x-fake-interval-ms: M``    pause between stream events (0)
``x-fake-delay-ms: M``       pause before the response headers (0)
``x-fake-gzip: 1``           gzip the body, ``content-encoding: gzip``; streams are compressed
                             incrementally and each event is sync-flushed as it is produced
``x-fake-hang: 1``           never send headers; wait for the client to disconnect
``x-fake-hang-after: N``     send N events (non-stream: N bytes), then go silent until disconnect
``x-fake-fail-after: N``     send N events (non-stream: N bytes), then drop the connection
                             without finishing the body
``x-fake-bytes: N``          pad a non-stream JSON body to at least N bytes (``x_fake_padding``)
``x-fake-cached-tokens: N``  chat completions: report N of the prompt tokens (at most all) as
                             read from the prompt cache (``prompt_tokens_details.cached_tokens``)
===========================  ======================================================================

When a gateway sends the same request to several fakes (its targets), headers cannot make one
fail and another answer: the test scripts each server instead. ``upstream.script(Controls(status=
503))`` makes its next request a 503 (whatever its headers say), ``upstream.behave(Controls(hang=
True))`` makes every request after the script hang until ``behave(None)``; ``Controls`` takes the
table's values as fields (``status``, ``retry_after``, ``error_code``, ``hang``, ``fail_after``,
``delay`` in seconds, ...  ). Each server records its own requests, so counting them per target is
``len(upstream.requests)`  `.

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

from tests.support.fakeupstream.app import AbortConnection, FakeUpstreamApp, quiet_deliberate_aborts
from tests.support.fakeupstream.bodies import (
    CHAT_ID,
    COMPLETION_ID,
    CREATED,
    DEFAULT_CHUNKS,
    DEFAULT_MODEL,
    EMBEDDING_DIMENSIONS,
    FILE_ID,
    MESSAGE_ID,
    MODELS,
    OPENAI_HEADERS,
    RESPONSE_ID,
    STANDARD_PROMPT,
    SYSTEM_FINGERPRINT,
    TRANSCRIPTION_TEXT,
    WORDS,
    BadRequest,
    anthropic_message_body,
    anthropic_message_events,
    chat_completion_body,
    chat_completion_events,
    chat_inputs,
    completion_body,
    completion_events,
    completion_inputs,
    count_tokens,
    embedding_vector,
    embeddings_body,
    error_body,
    file_object_body,
    message_inputs,
    model_body,
    models_body,
    pad_body,
    pieces,
    response_body,
    response_events,
    response_inputs,
    standard_chat_completion,
    standard_chat_request,
    status_error_body,
    transcription_body,
)
from tests.support.fakeupstream.controls import Controls, parse_controls
from tests.support.fakeupstream.record import RecordedRequest, RequestLog
from tests.support.fakeupstream.server import FakeUpstream, main

__all__ = [
    "CHAT_ID",
    "COMPLETION_ID",
    "CREATED",
    "DEFAULT_CHUNKS",
    "DEFAULT_MODEL",
    "EMBEDDING_DIMENSIONS",
    "FILE_ID",
    "MESSAGE_ID",
    "MODELS",
    "OPENAI_HEADERS",
    "RESPONSE_ID",
    "STANDARD_PROMPT",
    "SYSTEM_FINGERPRINT",
    "TRANSCRIPTION_TEXT",
    "WORDS",
    "AbortConnection",
    "BadRequest",
    "Controls",
    "FakeUpstream",
    "FakeUpstreamApp",
    "RecordedRequest",
    "RequestLog",
    "anthropic_message_body",
    "anthropic_message_events",
    "chat_completion_body",
    "chat_completion_events",
    "chat_inputs",
    "completion_body",
    "completion_events",
    "completion_inputs",
    "count_tokens",
    "embedding_vector",
    "embeddings_body",
    "error_body",
    "file_object_body",
    "main",
    "message_inputs",
    "model_body",
    "models_body",
    "pad_body",
    "parse_controls",
    "pieces",
    "quiet_deliberate_aborts",
    "response_body",
    "response_events",
    "response_inputs",
    "standard_chat_completion",
    "standard_chat_request",
    "status_error_body",
    "transcription_body",
]
