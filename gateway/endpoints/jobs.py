"""The jobs API: submit, poll, fetch the answer, cancel and list (docs/jobs.md).

- ``Prefer: respond-async`` on any routed request (RFC 7240 §4.1): ``202 Accepted`` with the
  job, ``Location: /v1/jobs/{id}`` and ``Preference-Applied: respond-async``; with ``wait=N``
  too (§4.3), the answer itself when the job ends within N seconds. An optional
  ``X-Gateway-Webhook-URL`` header names the job's webhook.
- ``POST /v1/jobs`` with ``{"method", "path", "body", "webhook": {"url"}, "metadata"}``: the same
  job, described in a body (for clients that cannot set headers).
- ``GET /v1/jobs/{id}``: the job (``Retry-After`` while it is not finished);
  ``GET /v1/jobs/{id}/result``: the upstream's answer as it came (status, headers, body).
- ``DELETE /v1/jobs/{id}`` or ``POST /v1/jobs/{id}/cancel``: cancel it.
- ``GET /v1/jobs?status=&limit=&after=``: the caller's jobs, newest first, a page at a time.

Only the key that submitted a job sees it (or its team's keys, with ``jobs.visibility: team``);
any other key gets the 404 an unknown id gets. An ``Idempotency-Key`` header makes a second
submission return the first job.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from gateway import errors
from gateway.auth import Principal
from gateway.config.checks import JOBS_PREFIX
from gateway.context import SCOPE_KEY, RequestContext
from gateway.http import body as request_body
from gateway.http.body import BodyBudget, ClientDisconnected
from gateway.http.prefer import PREFERENCE_APPLIED, Preferences
from gateway.jobs import refusals
from gateway.jobs.model import Job, Status
from gateway.jobs.service import JobService
from gateway.jobs.store import STORE_FAILURES
from gateway.jobs.submission import Asked, checked_idempotency_key, checked_metadata
from gateway.jobs.views import job_view
from gateway.pipeline.admission import Held
from gateway.runtime import Runtime
from gateway.types import Message, RawHeaders, Receive, Scope, Send

logger = logging.getLogger("gateway.jobs")

PREFIX = JOBS_PREFIX

_JOB_PATH = re.compile(r"^/v1/jobs/([A-Za-z0-9_-]{1,80})(/result|/cancel)?$")
_WEBHOOK_HEADER = b"x-gateway-webhook-url"
_JSON = (b"content-type", b"application/json")
_NO_STORE = (b"cache-control", b"no-store")
_MAX_LIMIT = 100
_DEFAULT_LIMIT = 20
# While a cancel reaches a running job (its worker looks twice a second), DELETE waits this long
# to answer with the job's end rather than with ``cancel_requested``.
_CANCEL_WAIT = 2.0
_POLL_STEP = 0.1
_ENVELOPE_FIELDS = frozenset({"method", "path", "body", "webhook", "metadata"})


def is_jobs_path(relative: str) -> bool:
    return relative == PREFIX or relative.startswith(PREFIX + "/")


class JobsApi:
    def __init__(
        self,
        service: JobService,
        runtime: Callable[[], Runtime],
        bodies: BodyBudget,
        submitted: Callable[[], None] | None = None,
    ) -> None:
        """``submitted``: told of every new job (the metrics' counter)."""
        self._submitted = submitted
        self._service = service
        self._runtime = runtime
        self._bodies = bodies

    # -- submission --------------------------------------------------------------------------

    async def submit_preferred(
        self, scope: Scope, receive: Receive, send: Send, preferences: Preferences
    ) -> None:
        """A routed request that asked ``Prefer: respond-async``."""
        headers: RawHeaders = scope["headers"]
        webhook = _header(headers, _WEBHOOK_HEADER)
        try:
            asked = Asked(webhook_url=webhook, idempotency_key=checked_idempotency_key(headers))
        except errors.GatewayError as refusal:
            await refusal.send(send)
            return
        await self._submit(scope, receive, send, asked, preferences.wait, preferred=True)

    async def _submit(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        asked: Asked,
        wait: float | None,
        *,
        preferred: bool,
    ) -> None:
        runtime = self._runtime()
        context: RequestContext = scope[SCOPE_KEY]
        held = Held(self._bodies.lease())
        try:
            try:
                job, created = await self._service.submitter.submit(
                    runtime, scope, receive, context, held, asked
                )
            except errors.GatewayError as refusal:
                await refusal.send(send, held.extra)
                return
            except ClientDisconnected:
                context.client_gone = True
                return
            except STORE_FAILURES:
                logger.warning("a job submission could not reach the job store")
                await refusals.store_unavailable().send(send, held.extra)
                return
        finally:
            held.release()
        if created and self._submitted is not None:
            self._submitted()
        if wait is not None and not job.status.terminal:
            try:
                job = await self._wait_for_end(job, min(wait, self._service.settings.max_wait))
            except STORE_FAILURES:
                # The job exists: the client gets its 202 and id, as last known, not an error
                # that would make it submit again.
                logger.warning("waiting on job %s could not reach the job store", job.id)
        if job.status.terminal and job.result is not None and wait is not None:
            # RFC 7240 §4.3: answered within the wait, the answer itself, synchronously.
            await _send_result(send, job)
            return
        location = f"{scope.get('root_path', '')}{PREFIX}/{job.id}".encode("latin-1")
        headers: RawHeaders = [(b"location", location), *self._retry_after(job)]
        if preferred:
            # RFC 7240 §3: names a preference the request stated; POST /v1/jobs stated none.
            headers.append((PREFERENCE_APPLIED, b"respond-async"))
        await _send_json(send, 202, job_view(job), headers)

    async def _submit_envelope(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /v1/jobs``: the job's request described in the body."""
        headers: RawHeaders = scope["headers"]
        runtime = self._runtime()
        lease = self._bodies.lease()
        try:
            raw = await request_body.read_body(
                receive, headers, runtime.config.server.max_body_bytes, lease
            )
            envelope = request_body.parse_json(raw)
            inner, asked = _envelope(envelope, headers)
        except errors.GatewayError as refusal:
            await refusal.send(send)
            return
        except ClientDisconnected:
            return
        finally:
            lease.release()
        method, target, body = inner
        split = urlsplit(target)
        inner_headers = [
            (name, value)
            for name, value in headers
            if name not in (b"content-type", b"content-length", b"idempotency-key")
        ]
        if body is not None:
            inner_headers.append((b"content-type", b"application/json"))
        payload = b"" if body is None else orjson.dumps(body)
        inner_headers.append((b"content-length", str(len(payload)).encode("ascii")))
        root_path: str = scope.get("root_path", "")
        inner_scope = {
            **scope,
            "method": method,
            "path": root_path + split.path,
            "raw_path": (root_path + split.path).encode("latin-1"),
            "query_string": split.query.encode("latin-1"),
            "headers": inner_headers,
        }
        delivered = False

        async def inner_receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": payload, "more_body": False}
            return await receive()

        await self._submit(inner_scope, inner_receive, send, asked, None, preferred=False)

    # -- the rest of the API ------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send, relative: str) -> None:
        method: str = scope["method"]
        try:
            if relative == PREFIX:
                if method == "POST":
                    await self._submit_envelope(scope, receive, send)
                    return
                if method not in ("GET", "HEAD"):
                    raise errors.method_not_allowed(method, relative, ("GET", "HEAD", "POST"))
                await self._list(scope, send, self._caller(scope))
                return
            found = _JOB_PATH.match(relative)
            if found is None:
                raise errors.unknown_route(method, relative)
            job_id, action = found.group(1), found.group(2)
            if action == "/cancel":
                if method != "POST":
                    raise errors.method_not_allowed(method, relative, ("POST",))
                await self._cancel(send, self._caller(scope), job_id)
            elif action == "/result":
                if method not in ("GET", "HEAD"):
                    raise errors.method_not_allowed(method, relative, ("GET", "HEAD"))
                job = await self._visible(self._caller(scope), job_id)
                await self._result(send, job)
            elif method == "DELETE":
                await self._cancel(send, self._caller(scope), job_id)
            elif method in ("GET", "HEAD"):
                job = await self._visible(self._caller(scope), job_id)
                await _send_json(send, 200, job_view(job), self._retry_after(job))
            else:
                raise errors.method_not_allowed(method, relative, ("GET", "HEAD", "DELETE"))
        except errors.GatewayError as refusal:
            await refusal.send(send)
        except STORE_FAILURES:
            logger.warning("a jobs API call could not reach the job store")
            await refusals.store_unavailable().send(send)

    def _caller(self, scope: Scope) -> Principal:
        principal = self._runtime().keys.authenticate(scope["headers"])
        context: RequestContext | None = scope.get(SCOPE_KEY)
        if context is not None:
            context.key = principal.name
            context.team = principal.config.team
        return principal

    def _sees(self, principal: Principal, job: Job) -> bool:
        if job.owner == principal.name:
            return True
        team = principal.config.team
        return (
            self._service.settings.visibility == "team" and team is not None and (job.team == team)
        )

    async def _visible(self, principal: Principal, job_id: str) -> Job:
        job = await self._service.store.get(job_id)
        if job is None or not self._sees(principal, job):
            raise refusals.job_not_found(job_id)
        return job

    async def _result(self, send: Send, job: Job) -> None:
        if job.result is None:
            if job.status.terminal:
                raise errors.GatewayError(
                    409,
                    f"Job '{job.id}' ended {job.status.value} without an answer.",
                    code="job_has_no_result",
                )
            raise errors.GatewayError(
                409,
                f"Job '{job.id}' is {job.status.value}; its answer is not here yet.",
                code="job_not_finished",
                headers=self._retry_after(job),
            )
        await _send_result(send, job)

    async def _cancel(self, send: Send, principal: Principal, job_id: str) -> None:
        job = await self._visible(principal, job_id)
        if not job.status.terminal:
            cancelled = await self._service.store.cancel(job_id, time.time())
            job = cancelled if cancelled is not None else job
            if job.cancel_requested and not job.status.terminal:
                job = await self._wait_for_end(job, _CANCEL_WAIT)
        await _send_json(send, 200, job_view(job), self._retry_after(job))

    async def _list(self, scope: Scope, send: Send, principal: Principal) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        status = _one(query, "status")
        if status is not None and status not in Status.__members__.values():
            raise refusals.bad_query(
                f"'status' must be one of {', '.join(s.value for s in Status)}.", "status"
            )
        limit_text = _one(query, "limit")
        limit = _DEFAULT_LIMIT
        if limit_text is not None:
            if (
                not limit_text.isascii()
                or not limit_text.isdigit()
                or not 1 <= int(limit_text[:4]) <= _MAX_LIMIT
                or len(limit_text) > 4
            ):
                raise refusals.bad_query(
                    f"'limit' must be a whole number from 1 to {_MAX_LIMIT}.", "limit"
                )
            limit = int(limit_text)
        after = _one(query, "after")
        team = principal.config.team
        index = (
            f"team:{team}"
            if self._service.settings.visibility == "team" and team is not None
            else f"key:{principal.name}"
        )
        jobs, more = await self._service.store.page(
            index, status=Status(status) if status else None, limit=limit, after=after
        )
        data = [job_view(job, body=False) for job in jobs]
        await _send_json(
            send,
            200,
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": more,
            },
            [],
        )

    async def _wait_for_end(self, job: Job, seconds: float) -> Job:
        """The job once it ended, or as it is after ``seconds``. Polls its status only (one
        field), reading the whole job, answer included, once at the end."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        store = self._service.store
        while loop.time() < deadline:
            await asyncio.sleep(_POLL_STEP)
            status = await store.status(job.id)
            if status is None or status.terminal:
                break
        found = await store.get(job.id)
        return job if found is None else found

    def _retry_after(self, job: Job) -> RawHeaders:
        if job.status.terminal:
            return []
        return [(b"retry-after", str(self._service.settings.poll_after).encode("ascii"))]


def _envelope(envelope: object, headers: RawHeaders) -> tuple[tuple[str, str, Any], Asked]:
    if not isinstance(envelope, dict):
        raise refusals.bad_submission("The body must be a JSON object.", None)
    unknown = sorted(set(envelope) - _ENVELOPE_FIELDS)
    if unknown:
        raise refusals.bad_submission(
            f"Unknown field '{unknown[0][:64]}'; a job has "
            + ", ".join(sorted(_ENVELOPE_FIELDS))
            + ".",
            unknown[0][:64],
        )
    method = envelope.get("method", "POST")
    if (
        not isinstance(method, str)
        or not method.isascii()
        or not method.isalpha()
        or not method.isupper()
        or len(method) > 16
    ):
        raise refusals.bad_submission("'method' must be an HTTP method such as POST.", "method")
    path = envelope.get("path")
    if not isinstance(path, str) or not path.startswith("/") or len(path) > 2048:
        raise refusals.bad_submission(
            "'path' must be the gateway path to call, such as /v1/chat/completions.", "path"
        )
    if any(ord(c) < 0x21 or ord(c) > 0x7E for c in path) or "#" in path:
        raise refusals.bad_submission("'path' must be printable ASCII without spaces.", "path")
    if is_jobs_path(urlsplit(path).path):
        raise refusals.bad_submission("A job cannot call the jobs API.", "path")
    webhook = envelope.get("webhook")
    url: str | None = None
    if webhook is not None:
        if not isinstance(webhook, dict) or not isinstance(webhook.get("url"), str):
            raise refusals.bad_submission(
                "'webhook' must be an object with a 'url' string.", "webhook"
            )
        url = webhook["url"]
    asked = Asked(
        webhook_url=url,
        metadata=checked_metadata(envelope.get("metadata")),
        idempotency_key=checked_idempotency_key(headers),
    )
    return (method, path, envelope.get("body")), asked


def _header(headers: RawHeaders, wanted: bytes) -> str | None:
    for name, value in headers:
        if name == wanted:
            return value.decode("latin-1").strip() or None
    return None


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


async def _send_json(
    send: Send, status: int, document: dict[str, Any], headers: RawHeaders
) -> None:
    body = orjson.dumps(document)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                _JSON,
                _NO_STORE,
                (b"content-length", str(len(body)).encode("ascii")),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _send_result(send: Send, job: Job) -> None:
    result = job.result
    assert result is not None
    # Stored without framing or hop-by-hop fields (``views.kept_headers``): sent as they are.
    headers: RawHeaders = [*result.headers]
    headers.append((b"content-length", str(len(result.body)).encode("ascii")))
    headers.append((b"x-gateway-job-id", job.id.encode("ascii")))
    await send({"type": "http.response.start", "status": result.status, "headers": headers})
    await send({"type": "http.response.body", "body": result.body})
