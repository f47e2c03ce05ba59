"""Request rules: what a route lets through of an OpenAI-shaped request body (``validate:``).

A route opts in with ``validate:``, either a rule set written on the route or the name of one in
the top-level ``request_rules`` table (several routes naming one set form a group). Every rule is
optional and says nothing about fields it does not name; the request shapes come from OpenAI's
API reference (Chat Completions, Completions, Embeddings, Responses). Which shape a route carries
is decided once, at load, from the ending of its upstream path or, failing that, of its public
path (``shape_of``); a rule that does not apply to a route's shape is ignored for that route.

The rules are checked on each request by ``gateway.policies.validation``, compiled once per
route and config snapshot; this module only says what an admin may write.
"""

from __future__ import annotations

import enum
import re
from typing import Any, Literal

from pydantic import Field, TypeAdapter, field_validator, model_validator

from gateway.config.fields import Model, Name

__all__ = [
    "ROLES",
    "SYSTEM_ROLES",
    "IntRange",
    "NumberRange",
    "RequestRules",
    "Role",
    "Shape",
    "rules_or_name",
    "shape_of",
]

# The message roles of OpenAI's Chat Completions API ('function' is deprecated there but still
# accepted); the Responses API uses the first four.
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
ROLES: frozenset[str] = frozenset(("system", "developer", "user", "assistant", "tool", "function"))
# 'developer' replaced 'system' for OpenAI's reasoning models: both carry the operator's
# instructions, so allowing one but not the other would be a loophole.
SYSTEM_ROLES: frozenset[str] = frozenset(("system", "developer"))


class Shape(enum.Enum):
    """The request body a route carries, after OpenAI's endpoint of that name."""

    CHAT = "chat/completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"


# Longest ending first: '/chat/completions' also ends in '/completions'.
_ENDINGS = tuple((f"/{shape.value}", shape) for shape in Shape)


def shape_of(*paths: str) -> Shape | None:
    """The shape of the first of ``paths`` (upstream path, then public path) whose last segments
    name one of OpenAI's endpoints; None when none does (a catch-all route, say)."""
    for path in paths:
        trimmed = path.rstrip("/")
        for ending, shape in _ENDINGS:
            if trimmed.endswith(ending):
                return shape
    return None


class IntRange(Model):
    """Bounds for an integer; either may be left out."""

    min: int | None = Field(None, ge=0, description="Smallest value accepted.")
    max: int | None = Field(None, ge=0, description="Largest value accepted.")

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        _check_range(self.min, self.max)
        return self


class NumberRange(Model):
    """Bounds for a number (integer or decimal); either may be left out."""

    min: float | None = Field(None, description="Smallest value accepted.")
    max: float | None = Field(None, description="Largest value accepted.")

    @model_validator(mode="after")
    def _ordered(self) -> NumberRange:
        _check_range(self.min, self.max)
        return self


def _check_range(low: float | None, high: float | None) -> None:
    if low is None and high is None:
        raise ValueError("give 'min', 'max' or both")
    if low is not None and high is not None and low > high:
        raise ValueError(f"'min' ({low:g}) is above 'max' ({high:g})")


class RequestRules(Model):
    """What a route accepts in a JSON request body. Every rule is optional; a route with rules
    always checks that the body is a JSON object and, on chat/completions, that 'messages' is a
    non-empty array of messages with known roles. A refusal is 400 in OpenAI's shape, with
    'param' naming the JSON path (messages[3].role) and OpenAI's 'code'."""

    max_messages: int | None = Field(
        None, ge=1, description="chat/completions: most entries in 'messages'."
    )
    min_messages: int | None = Field(
        None, ge=0, description="chat/completions: fewest entries in 'messages'. Default 1."
    )
    roles: frozenset[Role] | None = Field(
        None,
        min_length=1,
        description="Message roles accepted (chat/completions 'messages', responses 'input' "
        "items). Default: system, developer, user, assistant, tool, function.",
    )
    system_messages: bool = Field(
        True,
        description="Accept system and developer messages (and the responses API's "
        "'instructions'). Default true.",
    )
    max_message_chars: int | None = Field(
        None,
        ge=1,
        description="chat/completions: most characters of text in one message's content (a "
        "string, or the 'text' of its content parts).",
    )
    max_total_chars: int | None = Field(
        None,
        ge=1,
        description="chat/completions: most characters of text in all messages' content.",
    )
    max_output_tokens: IntRange | None = Field(
        None,
        description="Bounds for whichever of max_tokens, max_completion_tokens (chat, "
        "completions) or max_output_tokens (responses) the request gives.",
    )
    temperature: NumberRange | None = Field(None, description="Bounds for 'temperature'.")
    top_p: NumberRange | None = Field(None, description="Bounds for 'top_p'.")
    max_stop: int | None = Field(
        None, ge=0, description="chat/completions, completions: most 'stop' sequences."
    )
    max_stop_chars: int | None = Field(
        None, ge=1, description="chat/completions, completions: most characters in one 'stop'."
    )
    max_n: int | None = Field(
        None, ge=1, description="chat/completions, completions: largest 'n' (choices)."
    )
    model_pattern: re.Pattern[str] | None = Field(
        None,
        description="Regular expression (Python syntax) the whole 'model' must match; the "
        "request must then name a model. Names over 256 characters never match.",
    )
    max_tools: int | None = Field(
        None,
        ge=0,
        description="Most entries in 'tools' (chat/completions, responses) and in the "
        "deprecated 'functions' (chat/completions).",
    )
    max_input_items: int | None = Field(
        None,
        ge=1,
        description="embeddings 'input', completions 'prompt', responses 'input': most entries "
        "(a string is one, and so is one array of token ids).",
    )
    max_input_chars: int | None = Field(
        None,
        ge=1,
        description="embeddings 'input', completions 'prompt', responses 'input' and "
        "'instructions': most characters of text in all (a token id counts as one).",
    )

    @field_validator("model_pattern", mode="before")
    @classmethod
    def _compile(cls, value: object) -> object:
        # Compiled here, once, so that a bad expression is a config error with its place rather
        # than a failure on the first request; the message says what is wrong and where.
        if isinstance(value, str):
            try:
                return re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RequestRules:
        if (
            self.min_messages is not None
            and self.max_messages is not None
            and self.min_messages > self.max_messages
        ):
            raise ValueError(
                f"'min_messages' ({self.min_messages}) is above 'max_messages' "
                f"({self.max_messages})"
            )
        if self.roles is not None and self.roles <= SYSTEM_ROLES and not self.system_messages:
            raise ValueError("'roles' allows only system messages, which 'system_messages' refuses")
        return self


_NAME: TypeAdapter[str] = TypeAdapter(Name)


def rules_or_name(value: Any) -> Any:
    """A route's ``validate``: a rule set, or the name of one in ``request_rules``.

    Dispatched by hand rather than left to pydantic's union, whose errors would carry the
    member's name in their location (``validate.RequestRules.max_messages``) and be reported
    twice, once per member."""
    if value is None or isinstance(value, RequestRules):
        return value
    if isinstance(value, str):
        return _NAME.validate_python(value)
    if isinstance(value, dict):
        return RequestRules.model_validate(value)
    raise ValueError("expected a mapping of rules, or the name of a set in 'request_rules'")
