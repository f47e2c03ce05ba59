"""The jobs API's refusals, in OpenAI's error shape (``errors.GatewayError``)."""

from __future__ import annotations

from gateway.errors import GatewayError


def job_not_found(job_id: str) -> GatewayError:
    # The same answer for a job that never was and for another key's: ids reveal nothing.
    shown = job_id if len(job_id) <= 64 and job_id.isascii() and job_id.isprintable() else "?"
    return GatewayError(404, f"No job found with id '{shown}'.", code="job_not_found")


def bad_submission(message: str, param: str | None) -> GatewayError:
    return GatewayError(400, message, param=param, code="invalid_job")


def webhooks_not_configured() -> GatewayError:
    return GatewayError(
        400,
        "This gateway has no webhook signing secret configured, so it sends no webhooks; "
        "submit the job without one and poll it.",
        param="webhook",
        code="webhooks_not_configured",
    )


def webhook_not_allowed(problem: str) -> GatewayError:
    return GatewayError(
        400, f"The webhook URL is not allowed: {problem}", param="webhook.url", code="webhook_url"
    )


def idempotency_key_reused() -> GatewayError:
    # draft-ietf-httpapi-idempotency-key-header §2.7: a key reused for another request is 422.
    return GatewayError(
        422,
        "This Idempotency-Key was already used for a different request.",
        param="Idempotency-Key",
        code="idempotency_key_reused",
    )


def bad_query(message: str, param: str) -> GatewayError:
    return GatewayError(400, message, param=param, code="invalid_query")


def too_many_jobs(limit: int) -> GatewayError:
    # 429 as for any limit, with a time to come back: a job of the key ending frees a place.
    return GatewayError(
        429,
        f"This API key has {limit} jobs not finished yet, the most it may have "
        "(jobs.max_queued_per_key); wait for some to end, or cancel some.",
        type="rate_limit_error",
        code="too_many_jobs",
        headers=[(b"retry-after", b"5")],
    )


def store_unavailable() -> GatewayError:
    # The jobs store (Redis) cannot be reached now: nothing was stored or read; try again.
    return GatewayError(
        503,
        "The job store cannot be reached right now; try again shortly.",
        type="api_error",
        code="jobs_unavailable",
        headers=[(b"retry-after", b"1")],
    )
