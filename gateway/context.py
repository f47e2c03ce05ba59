"""What happened to one request: a typed record the steps write and the observers read.

One ``RequestContext`` is made per HTTP request by the outermost middleware
(``gateway/pipeline/lifecycle.py``) and travels in the ASGI scope under a single key. The
forwarded-header middleware, the admission steps and the relay fill it in as they go; when the
response has ended, the access log (and later the metrics and the admin status) read the finished
record. Fields stay ``None`` for steps a request never reached: a request refused at routing has
no key, one refused by a limit has no upstream time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.types import Scope

# The one scope key the gateway adds; everything else it knows about the request is typed below.
SCOPE_KEY = "gateway.context"


@dataclass(slots=True)
class Try:
    """One attempt at the upstream: where it went and how it ended ("ok"; before the head:
    "connect", "timeout", "protocol", "client"; an answer replaced by a later attempt:
    "status_503", "fallback_400", ...)."""

    upstream: str
    target: str
    outcome: str


@dataclass(slots=True, eq=False)
class RequestContext:
    request_id: str
    method: str
    path: str
    # perf_counter() when the request reached the gateway app.
    started: float = field(default_factory=time.perf_counter)

    # Set by the forwarded-header middleware: the client's address as a trusted proxy named it
    # (else the peer's), and the hops the relay may send on as X-Forwarded-For.
    client: str | None = None
    forwarded_for: tuple[str, ...] = ()

    # Admission: what the request was matched to and who sent it.
    route: str | None = None
    key: str | None = None
    team: str | None = None
    model: str | None = None  # as the client named it
    upstream_model: str | None = None  # as the upstream was asked for it, when renamed
    upstream: str | None = None
    # One of the gateway's own endpoints (health, metrics, admin): not API traffic.
    own: bool = False
    # The limit decision: "allowed", "refused", "degraded" (Redis failed, a fallback decided),
    # or None when no limit applies to the request; for a refusal, why: "requests", "tokens",
    # "concurrency", "budget" or "unavailable" (the shared limits could not be checked).
    limit: str | None = None
    limit_reason: str | None = None
    # limits.max_wait: milliseconds the request slept until its slot (also when the client left
    # meanwhile); None when it was admitted without waiting.
    queue_wait_ms: int | None = None

    # The attempts (``pipeline/failover.py``): how many, the label of the target that served
    # (or last failed), and each one's outcome.
    attempts: int = 0
    target: str | None = None
    tries: list[Try] = field(default_factory=list)

    # The exchange.
    status: int = 0
    bytes_sent: int | None = None
    # perf_counter() intervals from sending upstream: to the response head (the upstream's time
    # to first byte), to the first body chunk, and to the end of the exchange.
    upstream_seconds: float | None = None
    first_chunk_seconds: float | None = None
    upstream_total_seconds: float | None = None
    event_stream: bool = False
    # What failed upstream: "connect", "timeout", "protocol" (before the head), "stream" (after
    # it), or "client" (a fault in the gateway's HTTP client).
    upstream_error: str | None = None
    # The class of an exception that escaped the request path (answered 500, or cut).
    gateway_error: str | None = None
    client_gone: bool = False
    tokens_in: int | None = None
    tokens_out: int | None = None
    # What the reported usage cost at the configured prices, in micro-dollars; None without
    # usage or a price (gateway/accounting/accounts.py).
    cost_micro_usd: int | None = None

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def status_class(self) -> str:
        return f"{self.status // 100}xx" if self.status else "none"


def context_of(scope: Scope) -> RequestContext | None:
    """The request's context, or None for a scope that did not come through the lifecycle
    middleware (a unit test driving one middleware alone)."""
    context: RequestContext | None = scope.get(SCOPE_KEY)
    return context
