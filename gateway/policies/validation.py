"""Request rules (a route's ``validate:``), compiled once per route and config snapshot.

``request_validators`` turns each route's ``RequestRules`` into a ``RequestValidator``: a tuple
of small checks chosen for the route's shape (chat/completions, completions, embeddings,
responses), so a rule the admin did not write costs nothing and one that does not apply to the
shape is never looked at. Admission calls ``check`` on the body it parsed anyway (once, with
orjson), right after parsing and before the model rules and the limits, so a refused request
costs its key nothing; a route without rules never gets here.

A refusal is OpenAI's 400 for the same fault, worded as OpenAI's API reference words it:
``param`` is the JSON path of the value (``messages[3].role``, ``stop[1]``, ``tools``) and
``code`` one of ``invalid_type``, ``invalid_value``, ``missing_required_parameter``,
``string_above_max_length``, ``array_above_max_length``, ``array_below_min_length``,
``integer_above_max_value``, ``integer_below_min_value``, ``decimal_above_max_value``,
``decimal_below_min_value``. A message quotes at most 40 characters of what the client sent.

Why checks written out over the parsed dict rather than a schema library: measured with
``bench/validation.py`` (the same rules as a pydantic model and as msgspec structs, each given
the dict orjson parsed just before, as in a request; three runs pinned to one core of a 2-core
machine, µs per request):

    body (full rule set)   | these checks | pydantic model_validate | msgspec.convert
    chat, 10 messages      |    3.8 - 4.0 |             11.4 - 12.4 |       3.4 - 3.7
    chat, 200 messages     |      43 - 47 |               288 - 397 |         47 - 49

    a route without rules: one attribute test in admission, 23 - 27 ns; a whole request in
    process (tests/support/standin.py) takes 64 - 68 µs without rules, 71 - 73 µs with them.

pydantic costs three times as much, and more on long bodies. msgspec costs the same, but it is
one more dependency, its errors are text (``Expected `str` of length <= 3 - at
`$.messages[1].content```) that would have to be parsed back into OpenAI's ``param`` and
``code``, and both libraries still need code for what a type cannot say (the total of all
messages' text, one range over whichever token field is present, roles that depend on
``system_messages``). The checks below name the exact path where they fail.

The parsed document comes from orjson, so ``type(x) is dict`` (faster than ``isinstance``) is
exact: orjson makes only dict, list, str, int, float, bool and None.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from gateway import errors
from gateway.config.model import GatewayConfig
from gateway.config.request_rules import (
    ROLES,
    SYSTEM_ROLES,
    RequestRules,
    Shape,
    shape_of,
)
from gateway.policies import refusals

__all__ = ["RequestValidator", "compile_rules", "request_validators"]

Document = dict[str, Any]
Check = Callable[[Document], None]

# Model names OpenAI serves are a few dozen characters; a longer one never reaches the admin's
# expression, which then cannot be made to backtrack over a megabyte of client input.
MAX_MODEL_CHARS = 256
# Message roles in the order OpenAI's API lists them in its own refusals.
_ROLE_ORDER = ("system", "assistant", "user", "function", "tool", "developer")
# The fields that bound a response's length, per shape (OpenAI's API reference: Chat
# Completions has max_tokens, deprecated, and max_completion_tokens; Responses has
# max_output_tokens; Embeddings produce no tokens).
_OUTPUT_TOKENS: Mapping[Shape, tuple[str, ...]] = MappingProxyType(
    {
        Shape.CHAT: ("max_tokens", "max_completion_tokens"),
        Shape.COMPLETIONS: ("max_tokens",),
        Shape.RESPONSES: ("max_output_tokens",),
        Shape.EMBEDDINGS: (),
    }
)


@dataclass(frozen=True, slots=True)
class RequestValidator:
    """The checks of one route, in the order they run."""

    route: str
    shape: Shape
    checks: tuple[Check, ...]

    def check(self, document: Any) -> Document:
        """``document`` if it keeps every rule; raises the refusal (``GatewayError``) if not."""
        if type(document) is not dict:
            raise errors.invalid_body_value(
                f"Invalid type for the request body: expected a JSON object, but got "
                f"{refusals.kind(document)} instead.",
                None,
                "invalid_type",
            )
        for check in self.checks:
            check(document)
        return document


def request_validators(config: GatewayConfig) -> Mapping[str, RequestValidator]:
    """One validator per route that has rules, by route name.

    The loader has checked that every named set exists and every such route has a shape
    (``config/checks.py``); a config that skipped those checks fails here, at build, rather than
    on a request."""
    validators: dict[str, RequestValidator] = {}
    for route in config.routes:
        if route.rules is None:
            continue
        rules = route.rules
        if not isinstance(rules, RequestRules):
            rules = config.request_rules[rules]
        shape = shape_of(route.target_path(), route.path)
        if shape is None:
            raise ValueError(f"route {route.name!r}: request rules need an OpenAI-shaped path")
        validators[route.name] = compile_rules(rules, shape, route.name)
    return validators


def compile_rules(rules: RequestRules, shape: Shape, route: str = "") -> RequestValidator:
    """The checks ``rules`` make on a body of ``shape``; the rules that do not apply to it are
    left out."""
    checks: list[Check] = []
    if shape is Shape.CHAT:
        checks.append(_messages(rules))
    elif shape is Shape.RESPONSES:
        checks.append(_response_input(rules))
    elif rules.max_input_items is not None or rules.max_input_chars is not None:
        key = "prompt" if shape is Shape.COMPLETIONS else "input"
        checks.append(_inputs(key, rules.max_input_items, rules.max_input_chars))
    if rules.model_pattern is not None:
        checks.append(_model(rules.model_pattern))
    if rules.max_output_tokens is not None:
        bounds = rules.max_output_tokens
        for key in _OUTPUT_TOKENS[shape]:
            checks.append(_integer(key, bounds.min, bounds.max))
    if shape is not Shape.EMBEDDINGS:
        for key, range_ in (("temperature", rules.temperature), ("top_p", rules.top_p)):
            if range_ is not None:
                checks.append(_decimal(key, range_.min, range_.max))
    if shape in (Shape.CHAT, Shape.COMPLETIONS):
        if rules.max_stop is not None or rules.max_stop_chars is not None:
            checks.append(_stop(rules.max_stop, rules.max_stop_chars))
        if rules.max_n is not None:
            checks.append(_integer("n", None, rules.max_n))
    if rules.max_tools is not None and shape in (Shape.CHAT, Shape.RESPONSES):
        checks.append(_array_length("tools", rules.max_tools))
        if shape is Shape.CHAT:
            # The deprecated form of 'tools' in Chat Completions: left unchecked it would let a
            # client past the cap.
            checks.append(_array_length("functions", rules.max_tools))
    return RequestValidator(route, shape, tuple(checks))


# --- messages: chat/completions ----------------------------------------------------------------


def _messages(rules: RequestRules) -> Check:
    low = 1 if rules.min_messages is None else rules.min_messages
    high = rules.max_messages
    refuse_role = _RoleRefusal.of(rules, "messages")
    allowed = refuse_role.allowed
    per_message = rules.max_message_chars
    total_cap = rules.max_total_chars
    measure = per_message is not None or total_cap is not None

    def check(document: Document) -> None:
        messages = document.get("messages")
        if messages is None:
            raise refusals.missing("messages")
        if type(messages) is not list:
            raise refusals.invalid_type("messages", "an array of messages", messages)
        count = len(messages)
        if count < low:
            raise refusals.array_too_short("messages", low, count)
        if high is not None and count > high:
            raise refusals.array_too_long("messages", high, count)
        total = 0
        for i, message in enumerate(messages):
            if type(message) is not dict:
                raise refusals.invalid_type(f"messages[{i}]", "an object", message)
            role = message.get("role")
            if type(role) is not str or role not in allowed:
                raise refuse_role(i, role)
            if measure:
                content = message.get("content")
                if type(content) is str:  # the common case, without a call
                    length = len(content)
                else:
                    length = _text_length(content, "messages", i)
                if per_message is not None and length > per_message:
                    raise refusals.string_too_long(f"messages[{i}].content", per_message, length)
                total += length
        if total_cap is not None and total > total_cap:
            raise errors.invalid_body_value(
                f"Invalid 'messages': text too long. Expected at most {total_cap} characters of "
                f"content in all messages, but got {total} instead.",
                "messages",
                "string_above_max_length",
            )

    return check


@dataclass(frozen=True, slots=True)
class _RoleRefusal:
    """The refusal of a message's role, for the roles a route allows."""

    array: str  # 'messages' or 'input'
    allowed: frozenset[str]
    configured: frozenset[str]  # before system_messages: false took the system roles out
    supported: str  # "'system', 'user', and 'assistant'"

    @classmethod
    def of(cls, rules: RequestRules, array: str) -> _RoleRefusal:
        configured = ROLES if rules.roles is None else frozenset(rules.roles)
        allowed = configured if rules.system_messages else configured - SYSTEM_ROLES
        names = [f"'{role}'" for role in _ROLE_ORDER if role in allowed]
        supported = names[0] if len(names) == 1 else ", ".join(names[:-1]) + ", and " + names[-1]
        return cls(array, allowed, configured, supported)

    def __call__(self, index: int, role: object) -> errors.GatewayError:
        param = f"{self.array}[{index}].role"
        if role is None:
            return refusals.missing(param)
        if type(role) is not str:
            return refusals.invalid_type(param, "a string", role)
        if role in self.configured:  # a system or developer message, refused by system_messages
            return errors.invalid_body_value(
                f"Invalid value for '{param}': {role} messages are not allowed on this route.",
                param,
                "invalid_value",
            )
        return errors.invalid_body_value(
            f"Invalid value: {refusals.quote(role)}. Supported values are: {self.supported}.",
            param,
            "invalid_value",
        )


def _text_length(content: object, array: str, index: int) -> int:
    """Characters of text in a message's content: a string, or the 'text' of its content parts
    (OpenAI's API reference: text parts carry 'text'; image, audio and file parts carry none).
    The parameter path is built only for a refusal."""
    if type(content) is str:
        return len(content)
    if content is None:
        return 0  # an assistant message that only calls tools
    if type(content) is not list:
        param = f"{array}[{index}].content"
        raise refusals.invalid_type(param, "a string or an array of content parts", content)
    total = 0
    for j, part in enumerate(content):
        if type(part) is not dict:
            raise refusals.invalid_type(f"{array}[{index}].content[{j}]", "an object", part)
        text = part.get("text")
        if text is None:
            continue
        if type(text) is not str:
            raise refusals.invalid_type(f"{array}[{index}].content[{j}].text", "a string", text)
        total += len(text)
    return total


# --- input: responses, embeddings, completions -------------------------------------------------


def _response_input(rules: RequestRules) -> Check:
    """The Responses API's 'input' (a string, or an array of items: messages with a role, and
    others such as function call outputs) and 'instructions', its system message."""
    refuse_role = _RoleRefusal.of(rules, "input")
    allowed = refuse_role.allowed
    items_cap = rules.max_input_items
    chars_cap = rules.max_input_chars
    system_ok = rules.system_messages

    def check(document: Document) -> None:
        value = document.get("input")
        chars = 0
        if type(value) is str:
            chars = len(value)
        elif type(value) is list:
            if items_cap is not None and len(value) > items_cap:
                raise refusals.array_too_long("input", items_cap, len(value))
            for i, item in enumerate(value):
                if type(item) is not dict:
                    raise refusals.invalid_type(f"input[{i}]", "an object", item)
                role = item.get("role")
                if role is not None and (type(role) is not str or role not in allowed):
                    raise refuse_role(i, role)
                if chars_cap is not None:
                    chars += _text_length(item.get("content"), "input", i)
                    output = item.get("output")  # a function call's output, sent to the model
                    if type(output) is str:
                        chars += len(output)
        elif value is not None:
            raise refusals.invalid_type("input", "a string or an array of input items", value)
        instructions = document.get("instructions")
        if instructions is not None:
            if not system_ok:
                raise errors.invalid_body_value(
                    "Invalid value for 'instructions': system instructions are not allowed on "
                    "this route.",
                    "instructions",
                    "invalid_value",
                )
            if chars_cap is not None:
                if type(instructions) is not str:
                    raise refusals.invalid_type("instructions", "a string", instructions)
                chars += len(instructions)
        if chars_cap is not None and chars > chars_cap:
            raise errors.invalid_body_value(
                f"Invalid 'input': text too long. Expected at most {chars_cap} characters in "
                f"'input' and 'instructions', but got {chars} instead.",
                "input",
                "string_above_max_length",
            )

    return check


def _inputs(key: str, items_cap: int | None, chars_cap: int | None) -> Check:
    """Embeddings' 'input' and completions' 'prompt' (OpenAI's API reference): a string, an
    array of strings, an array of token ids, or an array of arrays of token ids. A token id
    counts as one character."""

    def check(document: Document) -> None:
        value = document.get(key)
        if value is None:
            return
        if type(value) is str:
            count, chars = 1, len(value)
        elif type(value) is list:
            if value and type(value[0]) is int:  # one input, as token ids
                count, chars = 1, len(value)
                if chars_cap is not None:
                    for i, token in enumerate(value):
                        if type(token) is not int:
                            raise refusals.invalid_type(
                                f"{key}[{i}]", "an integer (a token id)", token
                            )
            else:
                count, chars = len(value), 0
                if items_cap is not None and count > items_cap:
                    raise refusals.array_too_long(key, items_cap, count)
                if chars_cap is not None:
                    for i, entry in enumerate(value):
                        if type(entry) is not str and type(entry) is not list:
                            expected = "a string or an array of token ids"
                            raise refusals.invalid_type(f"{key}[{i}]", expected, entry)
                        chars += len(entry)
        else:
            raise refusals.invalid_type(key, "a string or an array", value)
        if items_cap is not None and count > items_cap:
            raise refusals.array_too_long(key, items_cap, count)
        if chars_cap is not None and chars > chars_cap:
            raise errors.invalid_body_value(
                f"Invalid '{key}': text too long. Expected at most {chars_cap} characters in "
                f"all, but got {chars} instead.",
                key,
                "string_above_max_length",
            )

    return check


# --- scalars and short arrays -----------------------------------------------------------------


def _model(pattern: re.Pattern[str]) -> Check:
    def check(document: Document) -> None:
        model = document.get("model")
        if model is None:
            raise refusals.missing("model")
        if type(model) is not str:
            raise refusals.invalid_type("model", "a string", model)
        if len(model) > MAX_MODEL_CHARS:
            raise refusals.string_too_long("model", MAX_MODEL_CHARS, len(model))
        if pattern.fullmatch(model) is None:
            raise errors.invalid_body_value(
                f"Invalid value for 'model': {refusals.quote(model)} is not a model this route "
                "serves.",
                "model",
                "invalid_value",
            )

    return check


def _integer(key: str, low: int | None, high: int | None) -> Check:
    def check(document: Document) -> None:
        value = document.get(key)
        if value is None:
            return
        if type(value) is not int:
            raise refusals.invalid_type(key, "an integer", value)
        if high is not None and value > high:
            raise refusals.out_of_range(key, "integer", True, high, value)
        if low is not None and value < low:
            raise refusals.out_of_range(key, "integer", False, low, value)

    return check


def _decimal(key: str, low: float | None, high: float | None) -> Check:
    def check(document: Document) -> None:
        value = document.get(key)
        if value is None:
            return
        if type(value) is not float and type(value) is not int:
            raise refusals.invalid_type(key, "a number", value)
        if high is not None and value > high:
            raise refusals.out_of_range(key, "decimal", True, high, value)
        if low is not None and value < low:
            raise refusals.out_of_range(key, "decimal", False, low, value)

    return check


def _stop(count_cap: int | None, chars_cap: int | None) -> Check:
    """'stop': a string or an array of strings (OpenAI's API reference allows up to 4)."""

    def check(document: Document) -> None:
        stop = document.get("stop")
        if stop is None:
            return
        if type(stop) is str:
            if count_cap == 0:
                raise errors.invalid_body_value(
                    "Invalid 'stop': this route accepts no stop sequences.",
                    "stop",
                    "array_above_max_length",
                )
            if chars_cap is not None and len(stop) > chars_cap:
                raise refusals.string_too_long("stop", chars_cap, len(stop))
            return
        if type(stop) is not list:
            raise refusals.invalid_type("stop", "a string or an array of strings", stop)
        if count_cap is not None and len(stop) > count_cap:
            raise refusals.array_too_long("stop", count_cap, len(stop))
        for i, entry in enumerate(stop):
            if type(entry) is not str:
                raise refusals.invalid_type(f"stop[{i}]", "a string", entry)
            if chars_cap is not None and len(entry) > chars_cap:
                raise refusals.string_too_long(f"stop[{i}]", chars_cap, len(entry))

    return check


def _array_length(key: str, cap: int) -> Check:
    def check(document: Document) -> None:
        value = document.get(key)
        if value is None:
            return
        if type(value) is not list:
            raise refusals.invalid_type(key, "an array", value)
        if len(value) > cap:
            raise refusals.array_too_long(key, cap, len(value))

    return check
