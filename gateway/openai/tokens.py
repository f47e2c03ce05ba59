"""A cheap estimate of a request's tokens, to reserve before the upstream answers.

The reservation is the prompt estimate plus the completion maximum the request names
(``max_completion_tokens``, ``max_tokens`` or ``max_output_tokens``, times ``n``), or the
configured default when it names none. The prompt is estimated at four characters per token
(four UTF-8 bytes for non-ASCII text, which keeps CJK text from being undercounted by 3x) over
every place OpenAI-style APIs carry text; token arrays count one per element; images a flat
``IMAGE_TOKENS``. No tokenizer: the estimate only has to be in the right range, since the
reservation is corrected from the response's ``usage`` (``UsageTap``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import orjson

# A 1024x1024 image at high detail; the common case of a vision request.
IMAGE_TOKENS = 765
# Role, separators and priming that each chat message adds on top of its content.
MESSAGE_OVERHEAD = 4
_OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_TEXT_FIELDS = ("text", "refusal", "arguments", "output", "transcript")


def estimate_tokens(body: Mapping[str, Any] | None, default_max_tokens: int) -> int:
    """Tokens to reserve for a request with this parsed JSON body (``None``: not JSON)."""
    if not body:
        return 0
    return estimate_prompt(body) + output_reservation(body, default_max_tokens)


def estimate_prompt(body: Mapping[str, Any]) -> int:
    counter = _Counter()
    messages = body.get("messages")
    if isinstance(messages, list):
        counter.tokens += MESSAGE_OVERHEAD * len(messages)
        for message in messages:
            counter.add(message)
    for field in ("input", "prompt", "instructions", "system", "suffix"):
        value = body.get(field)
        if value is not None:
            counter.add(value)
    for field in ("tools", "functions", "response_format", "text"):
        value = body.get(field)
        if isinstance(value, list | dict) and value:
            counter.chars += len(orjson.dumps(value))
    return counter.total()


def output_reservation(body: Mapping[str, Any], default_max_tokens: int) -> int:
    """The completion tokens a request may use: its own maximum times ``n``, else the default.
    Embeddings produce none."""
    for field in _OUTPUT_FIELDS:
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            break
    else:
        if _looks_like_embeddings(body):
            return 0
        value = default_max_tokens
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        value *= n
    return int(value)


def _looks_like_embeddings(body: Mapping[str, Any]) -> bool:
    if "messages" in body or "prompt" in body:
        return False
    if "encoding_format" in body or "dimensions" in body:
        return True
    model = body.get("model")
    return isinstance(model, str) and "embed" in model


class _Counter:
    __slots__ = ("chars", "tokens")

    def __init__(self) -> None:
        self.chars = 0  # counted four to a token
        self.tokens = 0  # counted directly (token arrays, images, per-message overhead)

    def total(self) -> int:
        return self.tokens + math.ceil(self.chars / 4)

    def add(self, value: Any) -> None:
        """Count the text in a message, content part list, input item or token array."""
        if isinstance(value, str):
            self.chars += len(value) if value.isascii() else len(value.encode())
        elif isinstance(value, list):
            if value and isinstance(value[0], int):
                self.tokens += len(value)  # a token array
                return
            for item in value:
                self.add(item)
        elif isinstance(value, dict):
            self._add_part(value)

    def _add_part(self, part: dict[str, Any]) -> None:
        kind = part.get("type")
        if kind in ("image_url", "input_image", "image"):
            self.tokens += IMAGE_TOKENS
            return
        content = part.get("content")
        if content is not None:
            self.add(content)
        for field in _TEXT_FIELDS:
            text = part.get(field)
            if isinstance(text, str):
                self.add(text)
        name = part.get("name")
        if isinstance(name, str):
            self.add(name)
        calls = part.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                if isinstance(call, dict):
                    self.add(call.get("function"))
        call = part.get("function_call")
        if isinstance(call, dict):
            self.add(call)


def tokens_to_reserve(
    document: Mapping[str, Any] | None, body_size: int, default_max_tokens: int
) -> int:
    """Tokens to reserve at admission for a request whose parsed body is ``document``."""
    prompt, output = reservation_parts(document, body_size, default_max_tokens)
    return prompt + output


def reservation_parts(
    document: Mapping[str, Any] | None, body_size: int, default_max_tokens: int
) -> tuple[int, int]:
    """``tokens_to_reserve`` as its two parts, the prompt estimate and the output ceiling (a
    budget prices them differently)."""
    if not document:
        return 0, 0
    try:
        return estimate_prompt(document), output_reservation(document, default_max_tokens)
    except RecursionError:
        # Pathologically nested JSON (orjson accepts 1024 levels): a bound from its size.
        return body_size // 4, default_max_tokens
