"""Application teams point the official openai SDK at the gateway and change nothing else."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator

import openai
import pytest

from tests.conftest import DEMO_KEY
from tests.fakeupstream import FakeUpstream
from tests.gatewayproc import GatewayProcess

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
