"""The fake upstream the gateway's tests stand on: OpenAI's shapes, determinism, misbehaviour.

Everything here talks to the fake directly (no gateway), with httpx and the official openai SDK.
"""

from __future__ import annotations

import base64
import gzip
import logging
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2  # the openai SDK 3.x's own HTTP client (not httpx)
import openai
import orjson
import pytest

from tests.support import fakeupstream as fake
from tests.support.fakeupstream import FakeUpstream
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello there, fake."}]}


@pytest.fixture(scope="module")
def shared_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture
def upstream(shared_upstream: FakeUpstream) -> FakeUpstream:
    shared_upstream.clear()
    return shared_upstream


# Clients are shared too: building an SSL context costs ~60-130 ms a client; verify=False skips it.


@pytest.fixture(scope="module")
def shared_http(shared_upstream: FakeUpstream) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=shared_upstream.base_url, timeout=5, verify=False) as client:
        yield client


@pytest.fixture
def http(upstream: FakeUpstream, shared_http: httpx.Client) -> httpx.Client:
    return shared_http


@pytest.fixture(scope="module")
def sdk(shared_upstream: FakeUpstream) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=shared_upstream.base_url,
        api_key="sk-test",
        max_retries=0,
        http_client=httpx2.Client(verify=False),
    ) as client:
        yield client


def stream_chat(**extra: Any) -> dict[str, Any]:
    return {**CHAT, "stream": True, **extra}


def fake_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fake-upstream")]


# -- Running --------------------------------------------------------------------------------------


def test_runner_serves_on_a_free_loopback_port_and_stops_without_leaking_threads() -> None:
    before = fake_threads()
    with FakeUpstream() as upstream:
        assert upstream.url == f"http://127.0.0.1:{upstream.port}"
        assert upstream.base_url == upstream.url + "/v1"
        with httpx.Client(verify=False) as client:
            assert client.get(upstream.base_url + "/models").status_code == 200
        assert len(fake_threads()) == len(before) + 1
    assert fake_threads() == before
    with httpx.Client(verify=False) as client, pytest.raises(httpx.ConnectError):
        client.get(upstream.base_url + "/models")
    with upstream, httpx.Client(verify=False) as client:  # and it can be started again
        assert client.get(upstream.base_url + "/models").status_code == 200


async def test_async_runner_serves_the_async_sdk_and_reports_disconnects_to_async_waiters() -> None:
    before = fake_threads()
    async with (
        FakeUpstream() as upstream,
        openai.AsyncOpenAI(
            base_url=upstream.base_url,
            api_key="sk-test",
            max_retries=0,
            http_client=httpx2.AsyncClient(verify=False),
        ) as client,
    ):
        stream = await client.chat.completions.create(
            model="gpt-fake",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        async with httpx.AsyncClient(verify=False, timeout=0.05) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post(upstream.base_url + "/echo", headers={"x-fake-hang": "1"})
        # The async wait leaves this loop free to run the client that is to disconnect.
        hung = await upstream.wait_for_disconnect_async(timeout=2)
        assert hung.path == "/v1/echo"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "This is a deterministic reply"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (1, 5)
    assert fake_threads() == before


def test_stopping_answers_a_hung_request_instead_of_waiting_for_it_forever() -> None:
    outcome: list[object] = []
    upstream = FakeUpstream().start()

    def client() -> None:
        try:
            with httpx.Client(verify=False, timeout=5) as http:
                outcome.append(http.post(upstream.base_url + "/echo", headers={"x-fake-hang": "1"}))
        except httpx.HTTPError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    upstream.wait_for(lambda requests: requests or None, timeout=2)
    started = time.monotonic()
    upstream.stop()
    thread.join(2)
    assert time.monotonic() - started < 1.5
    [response] = outcome
    assert isinstance(response, httpx.Response)
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "server_error"


def test_standalone_process_serves_and_prints_nothing_even_for_deliberate_aborts() -> None:
    port = free_port()
    http = httpx.Client(verify=False)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.fakeupstream",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                response = http.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    json=fake.standard_chat_request("gpt-4o-mini"),
                )
                break
            except httpx.ConnectError:
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline, "the fake upstream process did not start"
                time.sleep(0.02)
        assert response.content == fake.standard_chat_completion("gpt-4o-mini")
        with pytest.raises(httpx.RemoteProtocolError):  # and its deliberate abort stays quiet
            http.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json=stream_chat(),
                headers={"x-fake-fail-after": "1"},
            )
    finally:
        http.close()
        process.terminate()
        stdout, stderr = process.communicate(timeout=10)
    assert process.returncode in (0, -signal.SIGTERM)
    assert (stdout, stderr) == (b"", b"")


# -- OpenAI's shapes, parsed by the SDK -----------------------------------------------------------


def test_chat_completion_parses_with_the_sdk_and_echoes_the_model(sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.create(
        model="my-model", messages=[{"role": "user", "content": "Twelve chars"}]
    )
    assert completion.id == "chatcmpl-fake"
    assert completion.created == fake.CREATED
    assert completion.model == "my-model"
    assert completion.choices[0].message.content == "This is a deterministic reply"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.model_dump(
        include={"prompt_tokens", "completion_tokens", "total_tokens"}
    ) == {
        "prompt_tokens": 3,
        "completion_tokens": 5,
        "total_tokens": 8,
    }


def test_chat_stream_parses_with_the_sync_sdk_one_chunk_per_piece(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model="gpt-fake",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={"x-fake-chunks": "3"},
    )
    chunks = list(stream)
    assert [c.choices[0].delta.content for c in chunks] == ["This", " is", " a", None]
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, None, "stop"]
    assert all(c.usage is None for c in chunks)


def test_standard_chat_reply_is_exactly_the_published_bytes(http: httpx.Client) -> None:
    response = http.post("/chat/completions", json=fake.standard_chat_request("gpt-4o-mini"))
    assert response.headers["content-type"] == "application/json"
    assert response.content == fake.standard_chat_completion("gpt-4o-mini")
    assert response.content == fake.chat_completion_body(fake.standard_chat_request("gpt-4o-mini"))


def test_chat_stream_is_exactly_the_published_events(http: httpx.Client) -> None:
    request = stream_chat(stream_options={"include_usage": True})
    response = http.post("/chat/completions", json=request, headers={"x-fake-chunks": "3"})
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert "content-length" not in response.headers
    events = fake.chat_completion_events(request, chunks=3)
    assert response.content == b"".join(events)
    assert len(events) == 3 + 3  # pieces, finish, usage, [DONE]
    assert events[-1] == b"data: [DONE]\n\n"


def test_completions_parse_with_the_sdk_streamed_or_not(sdk: openai.OpenAI) -> None:
    completion = sdk.completions.create(model="gpt-fake", prompt="Say it")
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "This is a deterministic reply"
    assert completion.usage is not None
    assert completion.usage.total_tokens == 2 + 5
    stream = sdk.completions.create(
        model="gpt-fake", prompt="Say it", stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text
    assert chunks[-1].usage == completion.usage


def test_embeddings_in_the_sdks_default_base64_decode_to_the_float_vectors(
    sdk: openai.OpenAI, http: httpx.Client, upstream: FakeUpstream
) -> None:
    result = sdk.embeddings.create(model="text-embedding-fake", input=["alpha", "beta"])
    assert upstream.last().json()["encoding_format"] == "base64"
    assert [d.embedding for d in result.data] == [
        fake.embedding_vector("alpha"),
        fake.embedding_vector("beta"),
    ]
    assert result.usage.prompt_tokens == 2 + 1  # a started four characters is a token
    floats = http.post(
        "/embeddings", json={"model": "m", "input": "alpha", "encoding_format": "float"}
    ).json()
    assert floats["data"][0]["embedding"] == fake.embedding_vector("alpha")
    raw = http.post(
        "/embeddings", json={"model": "m", "input": "alpha", "encoding_format": "base64"}
    ).json()
    decoded = struct.unpack("<8f", base64.b64decode(raw["data"][0]["embedding"]))
    assert list(decoded) == fake.embedding_vector("alpha")


def test_responses_parse_with_the_sdk_streamed_or_not(sdk: openai.OpenAI) -> None:
    response = sdk.responses.create(model="gpt-fake", input="Hello, responses")
    assert (response.id, response.object, response.status) == ("resp_fake", "response", "completed")
    assert response.output_text == "This is a deterministic reply"
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (4, 5)
    assert response.usage.total_tokens == 9
    assert response.usage.output_tokens_details.reasoning_tokens == 0

    with sdk.responses.create(model="gpt-fake", input="Hello, responses", stream=True) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created"
    assert kinds.count("response.output_text.delta") == 5
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.usage == response.usage

    with sdk.responses.stream(model="gpt-fake", input="Hello, responses") as helper:
        final = helper.get_final_response()
    assert final.output_text == response.output_text


def test_models_are_listed_and_retrieved_and_unknown_ones_are_404(sdk: openai.OpenAI) -> None:
    assert [m.id for m in sdk.models.list()] == list(fake.MODELS)
    assert sdk.models.retrieve("gpt-fake").owned_by == "fake-upstream"
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"


# -- Echo, errors, headers, recording -------------------------------------------------------------


def test_echo_describes_exactly_what_was_received(http: httpx.Client) -> None:
    response = http.put(
        "/echo/sub%2Fpath?b=2&a=%2F",
        content=b"caf\xc3\xa9",
        headers={"x-custom": "One", "authorization": "Bearer sk-test"},
    )
    echo = response.json()
    assert echo["method"] == "PUT"
    assert echo["path"] == "/v1/echo/sub%2Fpath"
    assert echo["query"] == "b=2&a=%2F"
    assert ["x-custom", "One"] in echo["headers"]
    assert ["authorization", "Bearer sk-test"] in echo["headers"]
    assert echo["body"] == "café"


def test_unknown_path_is_a_404_in_openais_error_shape(http: httpx.Client) -> None:
    response = http.get("/nope")
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": "Invalid URL (GET /v1/nope)",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    assert http.get("/chat/completions").status_code == 404


def test_malformed_requests_and_control_headers_are_400s(http: httpx.Client) -> None:
    invalid_json = http.post("/chat/completions", content=b"{nope")
    no_model = http.post("/chat/completions", json={"messages": [{"role": "user"}]})
    bad_value = http.post("/chat/completions", json=CHAT, headers={"x-fake-chunks": "many"})
    unknown = http.post("/chat/completions", json=CHAT, headers={"x-fake-hnag": "1"})
    for response in (invalid_json, no_model, bad_value, unknown):
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert no_model.json()["error"]["param"] == "model"
    assert "x-fake-hnag" in unknown.json()["error"]["message"]


def test_every_response_carries_a_sequential_request_id_and_openai_headers(
    http: httpx.Client,
) -> None:
    first = http.post("/chat/completions", json=CHAT)
    second = http.get("/nope")
    number = int(first.headers["x-request-id"].removeprefix("req_fake_"))
    assert second.headers["x-request-id"] == f"req_fake_{number + 1}"
    for response in (first, second):
        assert response.headers["openai-processing-ms"] == "0"
        assert response.headers["x-ratelimit-limit-requests"] == "10000"
        assert response.headers["x-ratelimit-remaining-requests"] == "9999"
        assert response.headers["x-ratelimit-reset-requests"] == "6ms"
        assert response.headers["x-ratelimit-reset-tokens"] == "30ms"
        assert "server" not in response.headers
        assert "date" not in response.headers


def test_recorded_request_holds_what_was_received_and_when(
    http: httpx.Client, upstream: FakeUpstream
) -> None:
    before = time.monotonic()
    response = http.post("/chat/completions?api-version=1", json=CHAT, headers={"X-Trace": "t1"})
    [record] = upstream.requests
    assert record is upstream.last()
    assert record.request_id == response.headers["x-request-id"]
    assert (record.method, record.path, record.query_string) == (
        "POST",
        "/v1/chat/completions",
        "api-version=1",
    )
    assert record.header("x-trace") == "t1"
    assert ("x-trace", "t1") in record.headers
    assert record.json() == CHAT
    assert record.body == response.request.content
    assert record.completed_at is not None
    assert before <= record.received_at <= record.completed_at
    assert record.disconnected_at is None
    upstream.clear()
    assert upstream.requests == []


# -- Misbehaviour on request ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type", "sdk_error"),
    [
        (400, "invalid_request_error", openai.BadRequestError),
        (401, "invalid_request_error", openai.AuthenticationError),
        (429, "requests", openai.RateLimitError),
        (500, "server_error", openai.InternalServerError),
        (503, "server_error", openai.InternalServerError),
    ],
)
def test_status_header_fails_the_request_in_openais_shape(
    sdk: openai.OpenAI,
    http: httpx.Client,
    status: int,
    error_type: str,
    sdk_error: type[openai.APIStatusError],
) -> None:
    headers = {"x-fake-status": str(status)}
    response = http.post("/chat/completions", json=CHAT, headers=headers)
    assert response.status_code == status
    assert response.json()["error"]["type"] == error_type
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert response.headers.get("retry-after") == ("0" if status == 429 else None)
    with pytest.raises(sdk_error):
        sdk.chat.completions.create(extra_headers=headers, **CHAT)  # type: ignore[call-overload]


def test_stream_events_are_paced_by_interval_header(http: httpx.Client) -> None:
    headers = {"x-fake-chunks": "2", "x-fake-interval-ms": "40"}
    arrivals = []
    with http.stream("POST", "/chat/completions", json=stream_chat(), headers=headers) as response:
        for _ in response.iter_raw():
            arrivals.append(time.monotonic())
    assert len(arrivals) == 4  # two pieces, the finish chunk, [DONE]: one chunk each
    # Three pauses of 40 ms; the slack covers a late first read on a loaded machine.
    assert arrivals[-1] - arrivals[0] >= 0.1, arrivals


def test_delay_header_holds_back_the_response_headers(http: httpx.Client) -> None:
    started = time.monotonic()
    response = http.post("/chat/completions", json=CHAT, headers={"x-fake-delay-ms": "80"})
    assert time.monotonic() - started >= 0.075
    assert response.headers["openai-processing-ms"] == "80"
    assert response.content == fake.chat_completion_body(CHAT)


def test_chunks_header_sets_the_length_of_a_non_stream_reply(sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.create(extra_headers={"x-fake-chunks": "11"}, **CHAT)  # type: ignore[call-overload]
    assert completion.choices[0].message.content == (
        "This is a deterministic reply from the fake upstream. This is"
    )
    assert completion.usage.completion_tokens == 11


def test_gzip_header_compresses_the_body_deterministically(http: httpx.Client) -> None:
    with http.stream("POST", "/chat/completions", json=CHAT, headers={"x-fake-gzip": "1"}) as r:
        raw = b"".join(r.iter_raw())
    assert r.headers["content-encoding"] == "gzip"
    assert raw == gzip.compress(fake.chat_completion_body(CHAT), mtime=0)
    assert http.post("/chat/completions", json=CHAT, headers={"x-fake-gzip": "1"}).json()


def test_gzip_stream_flushes_each_event_as_it_is_produced(http: httpx.Client) -> None:
    headers = {"x-fake-gzip": "1", "x-fake-chunks": "2", "x-fake-interval-ms": "20"}
    events = fake.chat_completion_events(stream_chat(), chunks=2)
    decompressor = zlib.decompressobj(wbits=31)
    with http.stream("POST", "/chat/completions", json=stream_chat(), headers=headers) as response:
        assert response.headers["content-encoding"] == "gzip"
        decoded = [decompressor.decompress(chunk) for chunk in response.iter_raw()]
    assert decompressor.eof
    assert decoded == list(events)


@pytest.mark.parametrize(
    "headers",
    [{"x-fake-hang": "1"}, {"x-fake-hang-after": "10"}],
    ids=["before-headers", "non-stream-after-10-bytes"],
)
def test_hang_records_the_disconnect_after_the_client_gives_up(
    http: httpx.Client, upstream: FakeUpstream, headers: dict[str, str]
) -> None:
    with pytest.raises(httpx.ReadTimeout):
        http.post("/chat/completions", json=CHAT, headers=headers, timeout=0.1)
    record = upstream.wait_for_disconnect(timeout=2)
    assert record.path == "/v1/chat/completions"
    assert record.completed_at is None
    assert record.disconnected_at is not None
    assert record.disconnected_at > record.received_at


def test_hang_after_sends_that_many_events_then_goes_silent_until_disconnect(
    http: httpx.Client, upstream: FakeUpstream
) -> None:
    events = fake.chat_completion_events(stream_chat())
    headers = {"x-fake-hang-after": "2"}
    received = b""
    with http.stream("POST", "/chat/completions", json=stream_chat(), headers=headers) as response:
        for chunk in response.iter_raw():
            received += chunk
            if received == events[0] + events[1]:
                break
    record = upstream.wait_for_disconnect(timeout=2)
    assert record.completed_at is None


def test_client_closing_mid_stream_is_recorded_as_a_disconnect(
    http: httpx.Client, upstream: FakeUpstream
) -> None:
    headers = {"x-fake-interval-ms": "1000"}
    with http.stream("POST", "/chat/completions", json=stream_chat(), headers=headers) as response:
        next(response.iter_raw())
    started = time.monotonic()
    record = upstream.wait_for_disconnect(timeout=2)
    assert time.monotonic() - started < 0.5  # noticed at once, not at the next event
    assert record.completed_at is None


@pytest.mark.parametrize("gzipped", ["0", "1"])
def test_fail_after_cuts_the_stream_and_the_client_sees_an_incomplete_body(
    http: httpx.Client, caplog: pytest.LogCaptureFixture, gzipped: str
) -> None:
    headers = {"x-fake-fail-after": "2", "x-fake-gzip": gzipped}
    events = fake.chat_completion_events(stream_chat())
    received: list[bytes] = []
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(httpx.RemoteProtocolError),
        http.stream("POST", "/chat/completions", json=stream_chat(), headers=headers) as response,
    ):
        received.extend(response.iter_bytes())  # decoded, when gzipped
    assert b"".join(received) == events[0] + events[1]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_fail_after_cuts_a_non_stream_body_after_that_many_bytes(http: httpx.Client) -> None:
    received: list[bytes] = []
    headers = {"x-fake-fail-after": "10"}
    with (
        pytest.raises(httpx.RemoteProtocolError),
        http.stream("POST", "/chat/completions", json=CHAT, headers=headers) as r,
    ):
        received.extend(r.iter_raw())
    assert r.headers["content-length"] == str(len(fake.chat_completion_body(CHAT)))
    assert b"".join(received) == fake.chat_completion_body(CHAT)[:10]


def test_bytes_header_pads_a_body_to_at_least_that_size_and_keeps_it_json(
    sdk: openai.OpenAI, http: httpx.Client
) -> None:
    response = http.post("/chat/completions", json=CHAT, headers={"x-fake-bytes": "100000"})
    assert len(response.content) >= 100_000
    padded = orjson.loads(response.content)
    assert padded.pop("x_fake_padding").strip("x") == ""
    assert padded == orjson.loads(fake.chat_completion_body(CHAT))
    completion = sdk.chat.completions.create(extra_headers={"x-fake-bytes": "5000"}, **CHAT)  # type: ignore[call-overload]
    assert completion.choices[0].message.content == "This is a deterministic reply"


def test_cached_tokens_header_reports_part_of_the_prompt_as_cached(http: httpx.Client) -> None:
    headers = {"x-fake-cached-tokens": "3"}
    usage = http.post("/chat/completions", json=CHAT, headers=headers).json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 3
    assert http.post("/chat/completions", json=CHAT, headers=headers).content == (
        fake.chat_completion_body(CHAT, cached=3)
    )
    streamed = {**stream_chat(), "stream_options": {"include_usage": True}}
    events = http.post("/chat/completions", json=streamed, headers={"x-fake-cached-tokens": "999"})
    assert events.content == b"".join(fake.chat_completion_events(streamed, cached=999))
    final = orjson.loads(events.content.split(b"data: ")[-2])
    prompt = final["usage"]["prompt_tokens"]
    assert final["usage"]["prompt_tokens_details"]["cached_tokens"] == prompt  # at most all


def test_fifty_chunk_stream_without_interval_is_fast(http: httpx.Client) -> None:
    headers = {"x-fake-chunks": "50"}
    http.post("/chat/completions", json=stream_chat(), headers=headers)  # warm the cache
    durations = []
    for _ in range(9):
        started = time.monotonic()
        response = http.post("/chat/completions", json=stream_chat(), headers=headers)
        durations.append(time.monotonic() - started)
    assert response.content == b"".join(fake.chat_completion_events(stream_chat(), chunks=50))
    # ~1-3 ms; 40+ ms every time means small writes wait for delayed ACKs (TCP_NODELAY lost).
    assert statistics.median(durations) < 0.02, durations
