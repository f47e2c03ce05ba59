"""The 400s a route's request rules give (``validation.py``), worded as OpenAI's API words the
same faults: ``param`` the JSON path, ``code`` the kind of fault, and at most a few dozen
characters of what the client sent."""

from __future__ import annotations

from gateway import errors

# What a message quotes of a client's value, at most.
QUOTE_CHARS = 40


def missing(param: str) -> errors.GatewayError:
    return errors.invalid_body_value(
        f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    )


def invalid_type(param: str, expected: str, value: object) -> errors.GatewayError:
    return errors.invalid_body_value(
        f"Invalid type for '{param}': expected {expected}, but got {kind(value)} instead.",
        param,
        "invalid_type",
    )


def string_too_long(param: str, limit: int, length: int) -> errors.GatewayError:
    return errors.invalid_body_value(
        f"Invalid '{param}': string too long. Expected a string with maximum length {limit}, "
        f"but got a string with length {length} instead.",
        param,
        "string_above_max_length",
    )


def array_too_long(param: str, limit: int, length: int) -> errors.GatewayError:
    return errors.invalid_body_value(
        f"Invalid '{param}': array too long. Expected an array with maximum length {limit}, "
        f"but got an array with length {length} instead.",
        param,
        "array_above_max_length",
    )


def array_too_short(param: str, limit: int, length: int) -> errors.GatewayError:
    return errors.invalid_body_value(
        f"Invalid '{param}': array too short. Expected an array with minimum length {limit}, "
        f"but got an array with length {length} instead.",
        param,
        "array_below_min_length",
    )


def out_of_range(
    param: str, kind: str, above: bool, bound: float, value: float
) -> errors.GatewayError:
    """``integer_above_max_value``, ``decimal_below_min_value``... as OpenAI names them."""
    side, code, sign = (
        ("above maximum", "above_max", "<=") if above else ("below minimum", "below_min", ">=")
    )
    return errors.invalid_body_value(
        f"Invalid '{param}': {kind} {side} value. Expected a value {sign} {number(bound)}, but "
        f"got {number(value)} instead.",
        param,
        f"{kind}_{code}_value",
    )


def kind(value: object) -> str:
    """A JSON value's type as OpenAI's messages name it ('an integer', 'a decimal number')."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "a boolean"
    if type(value) is int:
        return "an integer"
    if type(value) is float:
        return "a decimal number"
    if type(value) is str:
        return "a string"
    if type(value) is list:
        return "an array"
    if type(value) is dict:
        return "an object"
    return type(value).__name__


def quote(text: str) -> str:
    """``text`` quoted, cut to a few dozen characters: a message never echoes a long value."""
    if len(text) > QUOTE_CHARS:
        text = text[:QUOTE_CHARS] + "..."
    return f"'{text}'"


def number(value: float) -> str:
    """2.0 as '2', 0.25 as '0.25': the bound as the admin wrote it, the value as sent."""
    if type(value) is float and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)
