"""Errors the gateway itself produces, in OpenAI's error shape.

Every refusal the gateway makes is a ``GatewayError`` carrying the status, message, type, param
and code that OpenAI's API would use for the same fault, so SDKs raise the same exception classes
(``openai.NotFoundError``, ``openai.RateLimitError`` ...) whether the upstream or the gateway
refused. Upstream errors are never wrapped: they pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from gateway.types import RawHeaders, Send

JSON_CONTENT_TYPE = (b"content-type", b"application/json")


class GatewayError(Exception):
    """A request refused by the gateway, rendered as ``{"error": {...}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers: RawHeaders = list(headers)

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        )

    async def send(self, send: Send, extra_headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        body = self.body()
        headers: RawHeaders = [
            JSON_CONTENT_TYPE,
            (b"content-length", str(len(body)).encode()),
            *self.headers,
            *extra_headers,
        ]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


# The catalogue: one constructor per fault, so messages stay consistent across modules.


def invalid_json() -> GatewayError:
    return GatewayError(
        400,
        "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
        "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
        "sent was not valid JSON.)",
        code="invalid_json",
    )


def body_too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"Request body is larger than the gateway's limit of {limit} bytes.",
        code="request_too_large",
    )


def missing_key() -> GatewayError:
    return GatewayError(
        401,
        "You didn't provide an API key. You need to provide your API key in an Authorization "
        "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the x-api-key "
        "or api-key header.",
        code="missing_api_key",
    )


def invalid_key() -> GatewayError:
    # The presented key is not echoed, not even masked: error bodies end up in client logs.
    return GatewayError(401, "Incorrect API key provided.", code="invalid_api_key")


def owner_gone() -> GatewayError:
    """A job's run whose key was removed from the config since the job was submitted."""
    return GatewayError(
        401, "The API key that submitted this job no longer exists.", code="invalid_api_key"
    )


def route_not_allowed(route: str) -> GatewayError:
    return GatewayError(
        403,
        f"Your API key is not allowed to use the route '{route}'.",
        type="permission_error",
        code="route_not_allowed",
    )


def model_not_allowed(model: str) -> GatewayError:
    return GatewayError(
        403,
        f"Your API key is not allowed to use the model '{model}'.",
        type="permission_error",
        code="model_not_allowed",
        param="model",
    )


def unknown_route(method: str, path: str) -> GatewayError:
    return GatewayError(
        404,
        f"Invalid URL ({method} {path})",
        code="unknown_url",
    )


def method_not_allowed(method: str, path: str, allowed: Sequence[str]) -> GatewayError:
    return GatewayError(
        405,
        f"Method {method} is not allowed for {path}; allowed: {', '.join(allowed)}.",
        code="method_not_allowed",
        headers=[(b"allow", ", ".join(allowed).encode())],
    )


def unknown_model(model: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model '{model}' does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )


def unsupported_media(media: str, route: str) -> GatewayError:
    return GatewayError(
        415,
        f"Route '{route}' applies model rules to JSON bodies; a '{media}' body cannot be "
        "checked. Send JSON, or ask the gateway's admin to set model_in_body: false for the "
        "route.",
        code="unsupported_media_type",
    )


def invalid_model_type() -> GatewayError:
    return GatewayError(
        400,
        "Invalid type for 'model': expected a string.",
        code="invalid_type",
        param="model",
    )


def invalid_body_value(message: str, param: str | None, code: str) -> GatewayError:
    """400 for a JSON body that breaks its route's request rules (``validate``), worded as
    OpenAI's API words the same fault: ``param`` is the JSON path of the value at fault
    (``messages[3].role``), ``code`` OpenAI's (``invalid_value``, ``invalid_type``,
    ``string_above_max_length``...). The message never quotes more than a short excerpt of
    what the client sent."""
    return GatewayError(400, message, code=code, param=param)


def uncheckable_media(media: str, route: str) -> GatewayError:
    # The client's Content-Type is quoted cut short: a head field may be kilobytes long.
    shown = media if len(media) <= 40 else media[:40] + "..."
    return GatewayError(
        415,
        f"Route '{route}' checks JSON request bodies; a '{shown}' body cannot be checked. Send "
        "JSON (Content-Type: application/json).",
        code="unsupported_media_type",
    )


def upstream_unreachable(upstream: str) -> GatewayError:
    # Names the upstream as the admin called it, never its URL (docs/design.md §5: peers that
    # disclose the upstream URL in errors are what we avoid).
    return GatewayError(
        502,
        f"The gateway could not connect to upstream '{upstream}'.",
        type="api_error",
        code="upstream_unreachable",
    )


def upstream_timeout(upstream: str) -> GatewayError:
    return GatewayError(
        504,
        f"Upstream '{upstream}' did not answer in time.",
        type="api_error",
        code="upstream_timeout",
    )


def upstream_failed(upstream: str) -> GatewayError:
    return GatewayError(
        502,
        f"Upstream '{upstream}' closed the connection before sending a response.",
        type="api_error",
        code="upstream_error",
    )


def malformed_request(reason: str) -> GatewayError:
    return GatewayError(400, f"Malformed HTTP request: {reason}.", code="malformed_request")


def websocket_not_supported() -> GatewayError:
    return GatewayError(
        400,
        "WebSocket connections are not supported: the gateway relays HTTP APIs only.",
        code="upgrade_not_supported",
    )


def uri_too_long(limit: int) -> GatewayError:
    return GatewayError(
        414, f"The request target is longer than {limit} bytes.", code="uri_too_long"
    )


def head_too_large(detail: str) -> GatewayError:
    # RFC 6585 §5: 431 Request Header Fields Too Large.
    return GatewayError(
        431, f"Request header fields too large: {detail}.", code="request_header_too_large"
    )


def request_timeout(what: str) -> GatewayError:
    return GatewayError(408, f"The {what} was not received in time.", code="request_timeout")


def too_many_connections() -> GatewayError:
    return GatewayError(
        503,
        "The gateway has too many open connections; retry shortly.",
        type="api_error",
        code="too_many_connections",
        headers=[(b"retry-after", b"1")],
    )


def body_memory_exhausted() -> GatewayError:
    return GatewayError(
        503,
        "The gateway is holding too many request bodies at once; retry shortly.",
        type="api_error",
        code="server_busy",
        headers=[(b"retry-after", b"1")],
    )


def too_many_concurrent(scope: str, limit: int) -> GatewayError:
    return GatewayError(
        429,
        f"Too many concurrent requests for {scope}: at most {limit} at once. Wait for one to "
        "finish.",
        type="requests",
        code="concurrency_limit_exceeded",
        headers=[(b"retry-after", b"1")],
    )


def unsafe_path() -> GatewayError:
    return GatewayError(
        400,
        "Invalid URL: the path contains dot segments, empty segments, an encoded '/' or '\\', "
        "or control characters.",
        code="invalid_path",
    )


def internal_error(request_id: str) -> GatewayError:
    # The request id ties the client's report to the traceback in the gateway's log; nothing
    # of the exception itself is shown (it may quote config values or upstream addresses).
    return GatewayError(
        500,
        f"The gateway failed to process your request (request id {request_id}). The error "
        "is in the gateway's log under that id.",
        type="api_error",
        code="internal_error",
    )


def invalid_content_length() -> GatewayError:
    return GatewayError(400, "Invalid Content-Length header.", code="bad_request")


def several_content_types() -> GatewayError:
    return GatewayError(
        400,
        "Your request has more than one Content-Type header.",
        code="invalid_content_type",
        param="content-type",
    )


def malformed_form(reason: str, param: str | None = None) -> GatewayError:
    return GatewayError(
        400,
        f"Could not parse the multipart form of your request: {reason}.",
        code="invalid_multipart",
        param=param,
    )


def unreadable_model_list(upstream: str) -> GatewayError:
    # A list that cannot be filtered is not sent: it would show the caller models it may not use.
    return GatewayError(
        502,
        f"The gateway could not read the models that upstream '{upstream}' listed.",
        type="api_error",
        code="upstream_error",
    )


def rate_limited(
    message: str, kind: str, headers: Sequence[tuple[bytes, bytes]], *, retry_useless: bool
) -> GatewayError:
    """429 ``rate_limit_exceeded`` whose ``type`` is the bucket's kind (``requests`` or
    ``tokens``), as OpenAI answers."""
    if retry_useless:
        # Waiting cannot help (the request is larger than the bucket): tell the openai SDK
        # not to retry it (it honours x-should-retry).
        headers = [*headers, (b"x-should-retry", b"false")]
    return GatewayError(429, message, type=kind, code="rate_limit_exceeded", headers=headers)


def budget_exceeded(message: str, headers: Sequence[tuple[bytes, bytes]]) -> GatewayError:
    """429 ``budget_exceeded``: the key or its team has spent its budget (``limits.*.budget``).
    The type is OpenAI's for a spent quota, ``insufficient_quota``, so that code handling
    OpenAI's own billing refusal handles this one."""
    return GatewayError(
        429, message, type="insufficient_quota", code="budget_exceeded", headers=headers
    )


def limits_unavailable(message: str, headers: Sequence[tuple[bytes, bytes]]) -> GatewayError:
    """503: the shared limits could not be checked and ``redis.on_failure`` is ``closed``."""
    return GatewayError(
        503, message, type="api_error", code="rate_limit_unavailable", headers=headers
    )


def admin_key_missing(presented: bool) -> GatewayError:
    if presented:
        return GatewayError(401, "Incorrect admin key provided.", code="invalid_api_key")
    return GatewayError(
        401,
        "The admin API needs an admin key: Authorization: Bearer ADMIN_KEY, or HTTP Basic "
        "with the key as password.",
        code="missing_api_key",
    )


def admin_key_required() -> GatewayError:
    # A client key is recognised (to say why it is refused), never accepted, whatever it may do.
    return GatewayError(
        403,
        "The admin API needs an admin key; a client key cannot be used here.",
        type="permission_error",
        code="admin_key_required",
    )


def not_ready() -> GatewayError:
    return GatewayError(503, "The gateway is starting.", type="api_error", code="not_ready")
