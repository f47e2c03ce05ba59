"""Application teams point the official openai SDK at the gateway and change nothing else."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator

import openai
import pytest

from gateway.auth import hash_key
from tests.conftest import DEMO_KEY, UPSTREAM_KEY, gateway_config
from tests.support.fakeupstream import CREATED, FILE_ID, TRANSCRIPTION_TEXT, FakeUpstream
from tests.support.gatewayproc import GatewayProcess

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say something deterministic."}
]


@pytest.fixture
def client(gateway: GatewayProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=DEMO_KEY, max_retries=0) as sdk:
        yield sdk


@pytest.fixture
def direct(upstream: FakeUpstream) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=upstream.base_url, api_key="unused", max_retries=0) as sdk:
        yield sdk


def test_chat_completion_matches_direct(client: openai.OpenAI, direct: openai.OpenAI) -> None:
    via = client.chat.completions.create(model="gpt-fake", messages=MESSAGES)
    expected = direct.chat.completions.create(model="gpt-fake", messages=MESSAGES)
    assert via.model_dump() == expected.model_dump()


def test_chat_stream_matches_direct(client: openai.OpenAI, direct: openai.OpenAI) -> None:
    def collect(sdk: openai.OpenAI) -> list[dict[str, object]]:
        stream = sdk.chat.completions.create(
            model="gpt-fake",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        return [chunk.model_dump() for chunk in stream]

    chunks = collect(client)
    assert chunks == collect(direct)
    assert chunks[-1]["usage"] is not None


def test_base_url_without_v1_works_through_alias(gateway: GatewayProcess) -> None:
    with openai.OpenAI(base_url=gateway.url, api_key=DEMO_KEY, max_retries=0) as sdk:
        completion = sdk.chat.completions.create(model="fast", messages=MESSAGES)
    assert completion.model == "gpt-4o-mini"


def test_completions(client: openai.OpenAI, direct: openai.OpenAI) -> None:
    via = client.completions.create(model="gpt-fake", prompt="hello")
    assert (
        via.model_dump() == direct.completions.create(model="gpt-fake", prompt="hello").model_dump()
    )
    streamed = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(model="gpt-fake", prompt="hello", stream=True)
        if chunk.choices
    )
    assert streamed == via.choices[0].text


def test_embeddings_base64_default(
    client: openai.OpenAI, direct: openai.OpenAI, upstream: FakeUpstream
) -> None:
    via = client.embeddings.create(model="text-embedding-fake", input=["a", "bc"])
    assert (
        via.model_dump()
        == direct.embeddings.create(model="text-embedding-fake", input=["a", "bc"]).model_dump()
    )
    assert len(via.data) == 2
    # The SDK asks for base64 by default; the gateway relays what the upstream encoded.
    raw = client.embeddings.with_raw_response.create(
        model="text-embedding-fake", input="a", encoding_format="base64"
    )
    vector = raw.http_response.json()["data"][0]["embedding"]
    decoded = base64.b64decode(vector)
    assert len(struct.unpack(f"<{len(decoded) // 4}f", decoded)) == len(via.data[0].embedding)


def test_responses_and_responses_stream(client: openai.OpenAI, direct: openai.OpenAI) -> None:
    via = client.responses.create(model="gpt-fake", input="hello")
    assert via.model_dump() == direct.responses.create(model="gpt-fake", input="hello").model_dump()
    events = list(client.responses.create(model="gpt-fake", input="hello", stream=True))
    assert events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == via.output_text


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert "gpt-fake" in ids
    assert client.models.retrieve("gpt-fake").id == "gpt-fake"


def test_gateway_refusals_raise_the_sdk_exceptions(gateway: GatewayProcess) -> None:
    with (
        openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-gw-wrong", max_retries=0) as wrong,
        pytest.raises(openai.AuthenticationError) as refused,
    ):
        wrong.chat.completions.create(model="gpt-fake", messages=MESSAGES)
    assert refused.value.code == "invalid_api_key"


def test_upstream_429_reaches_the_sdk_as_rate_limit_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="gpt-fake", messages=MESSAGES, extra_headers={"x-fake-status": "429"}
        )


def test_mid_stream_upstream_failure_surfaces_as_an_error(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-fake",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-fake-fail-after": "2"},
    )
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


async def test_async_client_chat_and_stream(gateway: GatewayProcess) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key=DEMO_KEY, max_retries=0
    ) as sdk:
        completion = await sdk.chat.completions.create(model="gpt-fake", messages=MESSAGES)
        assert completion.choices[0].message.content
        pieces = [
            chunk.choices[0].delta.content or ""
            async for chunk in await sdk.chat.completions.create(
                model="gpt-fake", messages=MESSAGES, stream=True
            )
            if chunk.choices
        ]
        assert "".join(pieces) == completion.choices[0].message.content
        embedding = await sdk.embeddings.create(model="text-embedding-fake", input="x")
        assert embedding.data[0].embedding
        response = await sdk.responses.create(model="gpt-fake", input="hello")
        assert response.output_text


# Model rules on uploads (multipart forms) and the model list, seen through the SDK by keys
# with a model list.

LISTENER_KEY = "sk-gw-test-listener"  # may call whisper-1 and the alias fast
CHATTER_KEY = "sk-gw-test-chatter"  # may call gpt-fake only
KEYS = f"""
  - name: listener
    hash: {hash_key(LISTENER_KEY)}
    models: [whisper-1, fast]
  - name: chatter
    hash: {hash_key(CHATTER_KEY)}
    models: [gpt-fake]
"""
AUDIO = ("hello.wav", b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(64), "audio/wav")


@pytest.fixture(scope="module")
def keyed_gateway(upstream: FakeUpstream) -> Iterator[GatewayProcess]:
    config = gateway_config(upstream.base_url, extra=KEYS)
    with GatewayProcess(config, env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as process:
        yield process


@pytest.fixture
def listener(keyed_gateway: GatewayProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{keyed_gateway.url}/v1", api_key=LISTENER_KEY, max_retries=0
    ) as sdk:
        yield sdk


@pytest.fixture
def chatter(keyed_gateway: GatewayProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{keyed_gateway.url}/v1", api_key=CHATTER_KEY, max_retries=0
    ) as sdk:
        yield sdk


def test_transcription_with_a_model_the_key_lists_reaches_the_upstream(
    listener: openai.OpenAI, upstream: FakeUpstream
) -> None:
    transcription = listener.audio.transcriptions.create(model="whisper-1", file=AUDIO)
    assert transcription.text == TRANSCRIPTION_TEXT
    seen = upstream.last()
    assert seen.path == "/v1/audio/transcriptions"
    assert b'name="model"\r\n\r\nwhisper-1\r\n' in seen.body
    assert AUDIO[1] in seen.body


def test_transcription_with_a_model_the_key_does_not_list_is_403(
    chatter: openai.OpenAI, upstream: FakeUpstream
) -> None:
    upstream.clear()
    with pytest.raises(openai.PermissionDeniedError) as refused:
        chatter.audio.transcriptions.create(model="whisper-1", file=AUDIO)
    assert refused.value.code == "model_not_allowed"
    assert upstream.requests == []


@pytest.mark.parametrize("key", [LISTENER_KEY, CHATTER_KEY])
def test_a_file_upload_has_no_model_and_passes_any_model_list(
    keyed_gateway: GatewayProcess, key: str
) -> None:
    with openai.OpenAI(base_url=f"{keyed_gateway.url}/v1", api_key=key, max_retries=0) as sdk:
        uploaded = sdk.files.create(file=("notes.jsonl", b"{}\n"), purpose="assistants")
    assert uploaded.id == FILE_ID


def test_uploads_when_unlisted_models_are_refused(strict_gateway: GatewayProcess) -> None:
    with openai.OpenAI(base_url=f"{strict_gateway.url}/v1", api_key=DEMO_KEY, max_retries=0) as sdk:
        with pytest.raises(openai.NotFoundError) as refused:
            sdk.audio.transcriptions.create(model="whisper-1", file=AUDIO)
        assert refused.value.code == "model_not_found"
        assert sdk.files.create(file=("a.jsonl", b"{}\n"), purpose="batch").id == FILE_ID


def test_a_narrow_key_lists_and_retrieves_only_what_it_may_call(
    listener: openai.OpenAI, upstream: FakeUpstream
) -> None:
    # whisper-1 is allowed but the upstream does not list it; fast is an alias of gpt-4o-mini.
    models = list(listener.models.list())
    assert [model.id for model in models] == ["fast"]
    assert (models[0].created, models[0].owned_by) == (CREATED, "fake-upstream")
    fast = listener.models.retrieve("fast")
    assert (fast.id, fast.created) == ("fast", CREATED)
    assert upstream.last().path == "/v1/models/gpt-4o-mini"
    upstream.clear()
    with pytest.raises(openai.NotFoundError) as refused:
        listener.models.retrieve("gpt-fake")
    assert refused.value.code == "model_not_found"
    assert upstream.requests == []


def test_a_wide_key_lists_the_upstreams_models_and_the_aliases(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert ids == ["gpt-fake", "gpt-4o-mini", "text-embedding-fake", "fast"]
    assert client.models.retrieve("fast").id == "fast"
    assert client.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"


def test_an_upstream_error_on_the_model_list_reaches_the_sdk_unchanged(
    client: openai.OpenAI,
) -> None:
    with pytest.raises(openai.InternalServerError) as failed:
        client.models.list(extra_headers={"x-fake-status": "503"})
    assert "asked to fail with status 503" in failed.value.message
