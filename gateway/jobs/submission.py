"""Taking a job: admitted like the synchronous request, then stored and queued.

At submission the job meets every rule a synchronous request meets (the path, the route, the
key and what it may use, the request rules, the model rules) and is refused at once with the
same error if one refuses it, a budget already spent included. Its budgets and rate limits
are charged when it runs, not now: a job may wait in the queue long past any reservation's
life, and a queued job is meant to wait for capacity rather than fail with 429 (docs/jobs.md).
Neither is its concurrency slot taken at submission: the job takes it when it runs.

The job keeps the request as it came (method, raw path, query, body, headers), without the
caller's credentials: the key is kept by name only (``jobs/scope.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gateway.config.jobs import JobsSettings
from gateway.context import RequestContext
from gateway.http.headers import HOP_BY_HOP
from gateway.jobs import refusals
from gateway.jobs.hosts import WebhookHosts
from gateway.jobs.model import Job, JobRequest, Status, WebhookState, new_job_id
from gateway.jobs.store import JobStore, QueueFull
from gateway.pipeline.admission import Held, judge
from gateway.pipeline.model_rules import Resolved
from gateway.routing import relative_raw_path
from gateway.runtime import Runtime
from gateway.types import RawHeaders, Receive, Scope

# Not replayed: the caller's credentials (the job runs as its key, by name), cookies, framing
# (recomputed), and the headers that asked for the job itself.
_NOT_KEPT = HOP_BY_HOP | {
    b"authorization",
    b"proxy-authorization",
    b"x-api-key",
    b"api-key",
    b"cookie",
    b"content-length",
    b"host",
    b"prefer",
    b"idempotency-key",
    b"x-request-id",
    b"x-gateway-webhook-url",
}
# OpenAI's metadata bounds: 16 pairs, keys up to 64 characters, values up to 512.
MAX_METADATA = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_IDEMPOTENCY_KEY = 255


@dataclass(frozen=True, slots=True)
class Asked:
    """What the client asked of the job besides its request."""

    webhook_url: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None


class Submitter:
    def __init__(
        self,
        store: JobStore,
        settings: JobsSettings,
        *,
        webhooks_signed: bool,
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._settings = settings
        self._webhooks_signed = webhooks_signed
        self._clock = clock
        # Parsed allow-lists by the key's entries (keys share lists; a reload keeps them).
        self._hosts: dict[tuple[str, ...], WebhookHosts] = {}

    async def submit(
        self,
        runtime: Runtime,
        scope: Scope,
        receive: Receive,
        context: RequestContext,
        held: Held,
        asked: Asked,
    ) -> tuple[Job, bool]:
        """The job for this request, and whether it is new (False: the same Idempotency-Key
        was used before, and that job is returned). Raises the refusal."""
        judged = await judge(runtime, scope, receive, context, held, None)
        principal = judged.principal
        if judged.resolved.model is not None:
            await _budget_left(runtime, principal.name, judged.resolved, context)
        if asked.webhook_url is not None:
            if not self._webhooks_signed:
                raise refusals.webhooks_not_configured()
            problem = self.hosts_for(principal.config.webhook_hosts).check_url(asked.webhook_url)
            if problem is not None:
                raise refusals.webhook_not_allowed(problem)
        now = self._clock()
        path = relative_raw_path(scope.get("raw_path"), scope["path"], scope.get("root_path", ""))
        request = JobRequest(
            method=scope["method"],
            path=path,
            query=scope.get("query_string", b""),
            headers=tuple(kept_request_headers(scope["headers"])),
            body=bytes(judged.received),
        )
        idempotency = None
        if asked.idempotency_key is not None:
            idempotency = hashlib.sha256(asked.idempotency_key.encode("utf-8")).hexdigest()
        job = Job(
            id=new_job_id(),
            owner=principal.name,
            team=principal.config.team,
            status=Status.QUEUED,
            created_at=now,
            expires_at=now + self._settings.queue_timeout,
            request=request,
            metadata=dict(asked.metadata),
            webhook_url=asked.webhook_url,
            idempotency=idempotency,
            webhook_state=WebhookState.WAITING
            if asked.webhook_url is not None
            else WebhookState.NONE,
        )
        try:
            stored = await self._store.submit(job)
        except QueueFull as full:
            raise refusals.too_many_jobs(full.limit) from None
        if stored.id == job.id:
            return stored, True
        if (stored.request.method, stored.request.path, stored.request.query) != (
            request.method,
            request.path,
            request.query,
        ) or stored.request.body != request.body:
            raise refusals.idempotency_key_reused()
        return stored, False

    def hosts_for(self, entries: tuple[str, ...]) -> WebhookHosts:
        hosts = self._hosts.get(entries)
        if hosts is None:
            if len(self._hosts) > 1024:
                self._hosts.clear()  # bounded: lists come from the config, a few per gateway
            hosts = self._hosts[entries] = WebhookHosts.parse(entries)
        return hosts


async def _budget_left(
    runtime: Runtime, key: str, resolved: Resolved, context: RequestContext
) -> None:
    """Refuse at once a key whose budget is already spent, as its synchronous request is (and
    only where it is: a request naming a priced model, ``admission._reserve_budget``): a
    reservation of nothing is refused only by a budget at or past its limit (the SPEND script),
    and takes nothing, so nothing is given back. A job's own cost is reserved when it runs.
    When the budgets cannot be read now (Redis away, ``on_failure: closed``), the job is taken
    and its run decides."""
    accounts = runtime.accounts
    account = accounts.of(key)
    if account is None or not account.budgets:
        return
    if accounts.prices.price(resolved.renamed, resolved.model) is None:
        return
    spend = await runtime.limiter.reserve(account.spend_plan(0, accounts.clock.now()))
    if not spend.allowed and not spend.unavailable:
        context.limit, context.limit_reason = "refused", "budget"
        raise spend.error(accounts.clock.time())


def kept_request_headers(headers: RawHeaders) -> RawHeaders:
    return [(name, value) for name, value in headers if name not in _NOT_KEPT]


def checked_metadata(value: object) -> dict[str, str]:
    """The job's metadata, as OpenAI bounds it; raises the refusal naming what is wrong."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise refusals.bad_submission("'metadata' must be an object of strings.", "metadata")
    if len(value) > MAX_METADATA:
        raise refusals.bad_submission(
            f"'metadata' may hold at most {MAX_METADATA} pairs.", "metadata"
        )
    for key, item in value.items():
        if len(key) > MAX_METADATA_KEY:
            raise refusals.bad_submission(
                f"metadata keys are at most {MAX_METADATA_KEY} characters.", "metadata"
            )
        if not isinstance(item, str) or len(item) > MAX_METADATA_VALUE:
            raise refusals.bad_submission(
                f"metadata values are strings of at most {MAX_METADATA_VALUE} characters.",
                f"metadata.{key}" if key.isidentifier() else "metadata",
            )
    return dict(value)


def checked_idempotency_key(headers: RawHeaders) -> str | None:
    values = [value for name, value in headers if name == b"idempotency-key"]
    if not values:
        return None
    raw = values[0].strip()
    if len(values) > 1 or not raw or len(raw) > MAX_IDEMPOTENCY_KEY:
        raise refusals.bad_submission(
            f"Idempotency-Key must be one header of 1 to {MAX_IDEMPOTENCY_KEY} characters.",
            "Idempotency-Key",
        )
    return raw.decode("latin-1")
