"""A job: one routed request the gateway runs in the background, and what became of it.

Immutable records: a store hands out snapshots and makes a new record for every change, so a
job read by an endpoint never changes under it. The statuses are OpenAI's background-mode ones
(``queued``, ``in_progress``, ``completed``, ``failed``, ``cancelled``) plus ``expired`` (Batch
API) for a job that waited in the queue past its deadline (docs/jobs.md).

The record carries the request to replay, but never the caller's credentials: the key is kept
by name (``owner``), and the job runs as that key when it runs (``jobs/execution.py``).
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import orjson

Headers = tuple[tuple[bytes, bytes], ...]


class Status(StrEnum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.EXPIRED})


class WebhookState(StrEnum):
    NONE = "none"  # the job has no webhook
    WAITING = "waiting"  # the job is not finished yet
    PENDING = "pending"  # finished; a delivery is due or being retried
    DELIVERED = "delivered"
    FAILED = "failed"  # the schedule ran out, or the receiver said 410 Gone


def new_job_id() -> str:
    """``job_`` and 24 random bytes, URL-safe: unguessable, so an id says nothing of another."""
    return "job_" + secrets.token_urlsafe(24)


@dataclass(frozen=True, slots=True)
class JobRequest:
    """The request to replay, as admitted at submission."""

    method: str
    path: str  # the raw path, relative to the root path, as the route table matches it
    query: bytes
    # Replayed as sent, without credentials (the key's headers, cookies) or hop-by-hop ones.
    headers: Headers
    body: bytes


@dataclass(frozen=True, slots=True)
class JobResult:
    """The upstream's answer, byte for byte (a streamed answer is its stream's bytes)."""

    status: int
    headers: Headers
    body: bytes


@dataclass(frozen=True, slots=True)
class JobError:
    """Why a job failed or ended without an answer: OpenAI's error code and message."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Delivery:
    """One attempt to deliver the job's webhook."""

    attempt: int
    at: float  # Unix seconds, when the attempt started
    status: int | None  # the receiver's HTTP status; None when no answer came
    error: str | None  # why no answer came (timeout, refused, unsafe address)
    duration_ms: float


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    owner: str  # the submitting key's name
    team: str | None  # that key's team when the job was made
    status: Status
    created_at: float  # Unix seconds
    expires_at: float  # a job still queued then is expired, never run
    request: JobRequest
    metadata: dict[str, str] = field(default_factory=dict)
    webhook_url: str | None = None
    # SHA-256 hex of the Idempotency-Key header (the key itself is the client's to keep).
    idempotency: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0  # runs started (a replica that died mid-run leaves one behind)
    cancel_requested: bool = False
    result: JobResult | None = None
    error: JobError | None = None
    webhook_state: WebhookState = WebhookState.NONE
    deliveries: tuple[Delivery, ...] = ()

    def but(self, **changes: Any) -> Job:
        return replace(self, **changes)

    # -- a job as bytes, for a store that keeps it outside the process ---------------------

    def dumps(self) -> bytes:
        return orjson.dumps(_plain(self))

    @staticmethod
    def loads(data: bytes | str) -> Job:
        return _job(orjson.loads(data))


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _unb64(value: str) -> bytes:
    return base64.b64decode(value)


def headers_plain(headers: Headers) -> list[list[str]]:
    """Headers as JSON can hold them: pairs of base64 strings (a header may hold any byte)."""
    return [[_b64(name), _b64(value)] for name, value in headers]


def headers_from_plain(plain: list[list[str]]) -> Headers:
    return tuple((_unb64(name), _unb64(value)) for name, value in plain)


def _plain(job: Job) -> dict[str, Any]:
    request = job.request
    result = job.result
    return {
        "id": job.id,
        "owner": job.owner,
        "team": job.team,
        "status": job.status.value,
        "created_at": job.created_at,
        "expires_at": job.expires_at,
        "request": {
            "method": request.method,
            "path": request.path,
            "query": _b64(request.query),
            "headers": headers_plain(request.headers),
            "body": _b64(request.body),
        },
        "metadata": job.metadata,
        "webhook_url": job.webhook_url,
        "idempotency": job.idempotency,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "attempts": job.attempts,
        "cancel_requested": job.cancel_requested,
        "result": None
        if result is None
        else {
            "status": result.status,
            "headers": headers_plain(result.headers),
            "body": _b64(result.body),
        },
        "error": None
        if job.error is None
        else {"code": job.error.code, "message": job.error.message},
        "webhook_state": job.webhook_state.value,
        "deliveries": [[d.attempt, d.at, d.status, d.error, d.duration_ms] for d in job.deliveries],
    }


def _job(plain: dict[str, Any]) -> Job:
    request = plain["request"]
    result = plain["result"]
    error = plain["error"]
    return Job(
        id=plain["id"],
        owner=plain["owner"],
        team=plain["team"],
        status=Status(plain["status"]),
        created_at=plain["created_at"],
        expires_at=plain["expires_at"],
        request=JobRequest(
            method=request["method"],
            path=request["path"],
            query=_unb64(request["query"]),
            headers=headers_from_plain(request["headers"]),
            body=_unb64(request["body"]),
        ),
        metadata=plain["metadata"],
        webhook_url=plain["webhook_url"],
        idempotency=plain["idempotency"],
        started_at=plain["started_at"],
        finished_at=plain["finished_at"],
        attempts=plain["attempts"],
        cancel_requested=plain["cancel_requested"],
        result=None
        if result is None
        else JobResult(
            result["status"], headers_from_plain(result["headers"]), _unb64(result["body"])
        ),
        error=None if error is None else JobError(error["code"], error["message"]),
        webhook_state=WebhookState(plain["webhook_state"]),
        deliveries=tuple(Delivery(*entry) for entry in plain["deliveries"]),
    )
