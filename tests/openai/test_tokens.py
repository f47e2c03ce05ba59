from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.openai.tokens import (
    IMAGE_TOKENS,
    MESSAGE_OVERHEAD,
    estimate_prompt,
    estimate_tokens,
    tokens_to_reserve,
)


def test_chat_messages_count_four_characters_a_token_plus_the_completion_maximum() -> None:
    body = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "x" * 40},
            {"role": "user", "content": "y" * 80},
        ],
        "max_completion_tokens": 100,
    }
    assert estimate_tokens(body, 4096) == 2 * MESSAGE_OVERHEAD + 30 + 100


def test_content_parts_count_text_and_a_flat_amount_per_image() -> None:
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "z" * 400},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            }
        ],
        "max_tokens": 10,
    }
    assert estimate_tokens(body, 4096) == MESSAGE_OVERHEAD + 100 + IMAGE_TOKENS + 10


def test_the_default_maximum_applies_when_the_request_names_none() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert estimate_tokens(body, 4096) == MESSAGE_OVERHEAD + 1 + 4096


def test_n_completions_reserve_n_times_the_maximum() -> None:
    body = {"prompt": "a" * 8, "max_tokens": 50, "n": 3}
    assert estimate_tokens(body, 4096) == 2 + 150


def test_responses_api_input_items_instructions_and_output_maximum() -> None:
    body = {
        "model": "gpt-4.1",
        "instructions": "i" * 40,
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "t" * 40}]},
            {"type": "function_call_output", "call_id": "c1", "output": "8 chars!"},
        ],
        "max_output_tokens": 7,
    }
    assert estimate_tokens(body, 4096) == 10 + 10 + 2 + 7


def test_tools_count_by_their_json_length() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {"messages": [], "tools": tools, "max_tokens": 0}
    assert estimate_tokens(body, 4096) == -(-len(orjson.dumps(tools)) // 4)


def test_tool_calls_in_history_are_counted() -> None:
    body = {
        "messages": [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "1", "function": {"name": "lookup", "arguments": "a" * 34}}],
            }
        ],
        "max_tokens": 0,
    }
    assert estimate_tokens(body, 4096) == MESSAGE_OVERHEAD + 10


def test_embeddings_reserve_no_output_and_token_arrays_count_one_each() -> None:
    assert estimate_tokens({"model": "text-embedding-3-small", "input": "abcd" * 5}, 4096) == 5
    body: dict[str, Any] = {"model": "x", "input": [[1, 2, 3], [4, 5]], "encoding_format": "float"}
    assert estimate_tokens(body, 4096) == 5


def test_non_ascii_text_counts_its_utf8_bytes() -> None:
    # 12 CJK characters are 36 UTF-8 bytes: 9 tokens, not 3.
    assert estimate_prompt({"prompt": "漢" * 12}) == 9


@pytest.mark.parametrize("body", [None, {}])
def test_no_body_reserves_nothing(body: dict[str, Any] | None) -> None:
    assert estimate_tokens(body, 4096) == 0


def test_odd_values_are_ignored_not_fatal() -> None:
    body = {"messages": [1, None, {"content": 5}], "max_tokens": True, "n": "2", "prompt": [None]}
    assert estimate_tokens(body, 100) == 3 * MESSAGE_OVERHEAD + 100


def test_deeply_nested_json_is_reserved_from_its_size_not_a_crash() -> None:
    # 1,000 levels: orjson accepts up to 1,024, deeper than Python's recursion limit allows.
    payload = b'{"model":"m","messages":' + b'[{"content":' * 499 + b'"x"' + b"}]" * 499 + b"}"
    document = orjson.loads(payload)
    assert tokens_to_reserve(document, len(payload), 4096) >= len(payload) // 4
