"""One run of a job: its request through the same pipeline as a synchronous one.

The run is an ASGI request the gateway makes to itself, without a socket: the job's method,
path, headers and body, with the owner's key named in the scope (``jobs/scope.py``) instead of
a key in the headers. So a job meets exactly the rules, limits, budgets, retries and failover a
synchronous request meets, is logged and counted like one (under the job's id as its request
id), and its answer is what the upstream sent, byte for byte.

A run ends one of three ways: with an answer (completed, or failed when it is an error), with
the limits' 429 (the worker waits for capacity and runs it again: a queued job waits instead of
failing), or cut (the upstream failed mid-answer, or the answer outgrew ``max_result_bytes``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import unquote

import orjson

from gateway.context import SCOPE_KEY, RequestContext
from gateway.http.request_id import REQUEST_ID
from gateway.jobs.model import Job, JobError, JobResult, Status
from gateway.jobs.scope import JOB_OWNER
from gateway.jobs.views import kept_headers
from gateway.types import ASGIApp, Message, RawHeaders, Scope
from gateway.upstream.retry_after import retry_after_seconds

# Refusals a run waits out instead of failing: the key's buckets and concurrency are short for
# now, or the limits store cannot be asked for now.
_WAIT_REASONS = frozenset({"requests", "tokens", "concurrency", "unavailable"})


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Status
    result: JobResult | None
    error: JobError | None
    # Set when the limits refused the run for now: seconds to wait before running it again.
    # The status, answer and error are then the refusal's, for a job that may wait no longer.
    wait: float | None = None


class JobRunner:
    def __init__(self, app: ASGIApp, max_result_bytes: int) -> None:
        """``app``: the relay as the gateway serves it, its lifecycle middleware included."""
        self._app = app
        self._max_result_bytes = max_result_bytes

    async def run(self, job: Job) -> Outcome:
        request = job.request
        head: Message | None = None
        body = bytearray()
        complete = False
        too_large = False
        sent = False
        never = asyncio.Event()

        async def receive() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            # Nobody hangs up: a run ends by its answer, by being cancelled, or by an answer
            # too large to keep.
            await never.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal head, complete, too_large
            if message["type"] == "http.response.start":
                head = message
            elif message["type"] == "http.response.body" and not too_large:
                body.extend(message.get("body", b""))
                if len(body) > self._max_result_bytes:
                    # Leave as a client that hangs up would: the relay closes the upstream
                    # request, so the upstream stops generating what nobody keeps.
                    too_large = True
                    never.set()
                    return
                complete = not message.get("more_body", False)

        scope = _scope(job)
        await self._app(scope, receive, send)
        if too_large:
            return Outcome(
                Status.FAILED,
                None,
                JobError(
                    "result_too_large",
                    f"The upstream's answer is larger than {self._max_result_bytes} bytes, the "
                    "most a job keeps (jobs.max_result_bytes).",
                ),
            )
        if head is None:
            return Outcome(
                Status.FAILED, None, JobError("no_response", "The request got no answer.")
            )
        status: int = head["status"]
        result = JobResult(status, kept_headers(tuple(head["headers"])), bytes(body))
        context: RequestContext | None = scope.get(SCOPE_KEY)
        if (
            status == 429
            and context is not None
            and context.limit == "refused"
            and context.limit_reason in _WAIT_REASONS
        ):
            # A refusal that names no time to come back can never pass (a request larger than
            # its bucket): that one fails the job like any error answer.
            wait = retry_after_seconds(result.headers)
            if wait is not None:
                return Outcome(Status.FAILED, result, _error_of(result), wait=wait)
        if not complete:
            return Outcome(
                Status.FAILED,
                result,
                JobError(
                    "upstream_cut",
                    "The upstream's answer was cut before its end; the part received is kept.",
                ),
            )
        if status >= 400:
            return Outcome(Status.FAILED, result, _error_of(result))
        return Outcome(Status.COMPLETED, result, None)


def _scope(job: Job) -> Scope:
    request = job.request
    headers: RawHeaders = [(name, value) for name, value in request.headers]
    headers.append((b"content-length", str(len(request.body)).encode("ascii")))
    # The job's id is its runs' request id: one name in the access log, the upstream's logs
    # and the job.
    headers.append((REQUEST_ID, job.id.encode("ascii")))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": unquote(request.path),
        "raw_path": request.path.encode("latin-1"),
        "root_path": "",
        "query_string": request.query,
        "headers": headers,
        "client": None,
        "server": None,
        "state": {},
        JOB_OWNER: job.owner,
    }


def _error_of(result: JobResult) -> JobError:
    """The error the answer states in OpenAI's shape, or one naming its status."""
    try:
        document = orjson.loads(result.body)
        error = document["error"]
        code = error.get("code") or error.get("type") or f"http_{result.status}"
        return JobError(str(code), str(error.get("message") or ""))
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return JobError(f"http_{result.status}", f"The upstream answered {result.status}.")
