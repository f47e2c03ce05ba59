"""The outermost middleware: the request's context and id, the one error path, the observers."""

from __future__ import annotations

import logging

import orjson
import pytest

from gateway.context import SCOPE_KEY, RequestContext
from gateway.observability.access_log import AccessLog
from gateway.pipeline.lifecycle import Lifecycle
from gateway.types import Receive, Scope, Send
from tests.support.standin import call


async def answer_ok(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def fail_before_head(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("a bug in a step, quoting sk-upstream-secret")


async def fail_after_head(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"part", "more_body": True})
    raise RuntimeError("a bug after the head")


async def test_an_exception_in_the_request_path_is_an_openai_shaped_500_naming_the_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="gateway.request"):
        response = await call(Lifecycle(fail_before_head), "POST", "/v1/chat/completions")
    assert response.status == 500
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "internal_error"
    assert error["type"] == "api_error"
    request_id = response.headers["x-request-id"]
    assert request_id in error["message"]
    # The exception's text stays in the log, with its traceback and the same id.
    assert b"sk-upstream-secret" not in response.body
    record = next(r for r in caplog.records if r.name == "gateway.request")
    assert request_id in record.getMessage()
    assert record.exc_info is not None


async def test_an_exception_after_the_head_cuts_the_response_instead_of_ending_it() -> None:
    response = await call(Lifecycle(fail_after_head), "GET", "/v1/models")
    assert response.status == 200
    assert response.body == b"part"
    assert not response.complete


async def test_the_access_line_is_written_for_every_ending_with_its_request_id() -> None:
    lines: list[str] = []
    app = Lifecycle(fail_before_head, observers=[AccessLog(lines.append)])
    response = await call(app, "POST", "/v1/chat/completions")
    line = orjson.loads(lines[0])
    assert line["request_id"] == response.headers["x-request-id"]
    assert line["status"] == 500
    assert line["error"] == "RuntimeError"
    assert line["client"] == "127.0.0.1"


async def test_a_usable_inbound_request_id_is_kept_and_returned() -> None:
    response = await call(Lifecycle(answer_ok), "GET", "/", headers=[("x-request-id", "abc-123")])
    assert response.headers["x-request-id"] == "abc-123"
    assert response.headers["x-gateway-request-id"] == "abc-123"


@pytest.mark.parametrize(
    "inbound",
    [
        ["x" * 129],  # too long
        ["has space"],
        ["tab\there"],
        ["caf\xe9"],  # not ASCII
        [""],
        ["one", "two"],  # two ids: neither can be kept
    ],
)
async def test_an_unusable_inbound_request_id_is_replaced_by_a_new_one(inbound: list[str]) -> None:
    response = await call(
        Lifecycle(answer_ok), "GET", "/", headers=[("x-request-id", v) for v in inbound]
    )
    request_id = response.headers["x-request-id"]
    assert request_id not in inbound
    assert len(request_id) == 32
    int(request_id, 16)


async def test_every_request_gets_its_own_id() -> None:
    ids = {
        (await call(Lifecycle(answer_ok), "GET", "/")).headers["x-request-id"] for _ in range(50)
    }
    assert len(ids) == 50


async def test_an_upstream_request_id_in_the_response_is_relayed_unchanged() -> None:
    async def upstream_answer(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"x-request-id", b"req_upstream_1")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})

    response = await call(Lifecycle(upstream_answer), "GET", "/", headers=[("x-request-id", "c1")])
    assert response.header_list("x-request-id") == ["req_upstream_1"]
    assert response.headers["x-gateway-request-id"] == "c1"


async def test_the_context_is_in_the_scope_for_the_steps_below() -> None:
    seen: list[RequestContext] = []

    async def step(scope: Scope, receive: Receive, send: Send) -> None:
        context = scope[SCOPE_KEY]
        context.route = "chat"
        seen.append(context)
        await answer_ok(scope, receive, send)

    observed: list[RequestContext] = []
    await call(Lifecycle(step, observers=[observed.append]), "POST", "/v1/chat/completions")
    assert observed == seen
    assert observed[0].route == "chat"
    assert observed[0].status == 200


async def test_a_failing_observer_does_not_fail_the_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(context: RequestContext) -> None:
        raise ValueError("observer bug")

    with caplog.at_level(logging.ERROR, logger="gateway.request"):
        response = await call(Lifecycle(answer_ok, observers=[broken]), "GET", "/")
    assert response.status == 200
    assert response.complete
    assert any("observer" in r.getMessage() for r in caplog.records)
