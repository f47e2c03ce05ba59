"""The ``jobs`` section: requests run in the background, polled or called back (docs/jobs.md).

Where jobs live follows the ``redis`` section: with Redis configured they are durable across
replicas (Redis Streams), without it they live in the process and are lost on restart.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from gateway.config.fields import Model, PositiveSeconds

__all__ = ["DEFAULT_SCHEDULE", "JobsSettings", "WebhookSettings"]

# Standard Webhooks' retry schedule (seconds after the previous attempt): at once, 5 s, 5 min,
# 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h; about three days in all.
DEFAULT_SCHEDULE: tuple[float, ...] = (
    0,
    5,
    300,
    1800,
    7200,
    18000,
    36000,
    50400,
    72000,
    86400,
)


class WebhookSettings(Model):
    secret_env: str = Field(
        "GATEWAY_WEBHOOK_SECRET",
        description="Environment variable holding the signing secret, 'whsec_' and base64 of "
        "at least 24 random bytes ('gateway webhooks secret' prints one); several, space "
        "separated, sign every delivery with each (rotation). Unset: jobs with a webhook are "
        "refused. Default GATEWAY_WEBHOOK_SECRET.",
    )
    schedule: tuple[float, ...] = Field(
        DEFAULT_SCHEDULE,
        min_length=1,
        max_length=20,
        description="Seconds to wait before each delivery attempt, after the previous one (the "
        "first counts from the job's end); each with up to 10% jitter. Default Standard "
        "Webhooks': 0, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h.",
    )
    timeout: PositiveSeconds = Field(
        15.0, le=60, description="Seconds a receiver has to answer one attempt. Default 15."
    )

    @field_validator("schedule")
    @classmethod
    def _no_negative_delays(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(delay < 0 for delay in value):
            raise ValueError("delays are seconds, 0 or more")
        return value


class JobsSettings(Model):
    enabled: bool = Field(
        True,
        description="Serve /v1/jobs and Prefer: respond-async. Default true.",
    )
    store: Literal["auto", "memory", "redis"] = Field(
        "auto",
        description="Where jobs live: 'redis' (durable, shared by replicas; needs redis.url), "
        "'memory' (this process; lost on restart), 'auto' (Redis when redis.url is set). "
        "Default auto.",
    )
    concurrency: int = Field(
        8,
        ge=1,
        le=1024,
        description="Jobs running at once per gateway process: the bound on the upstream "
        "requests jobs make, so a burst of jobs cannot starve synchronous traffic. Default 8.",
    )
    per_key_concurrency: int = Field(
        4,
        ge=1,
        le=1024,
        description="Jobs of one key running at once per gateway process. Default 4.",
    )
    lease: PositiveSeconds = Field(
        30.0,
        description="Seconds a running job stays with its replica without a sign of life "
        "(renewed every third of this, at most every half second); a replica that dies leaves "
        "its jobs to another after this. Default 30.",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        le=100,
        description="Runs begun (replicas that died mid-run count) before a job fails for good "
        "with max_attempts_exceeded. Default 3.",
    )
    retention: PositiveSeconds = Field(
        86400.0,
        description="Seconds a finished job (its result included) stays readable. Default a day.",
    )
    queue_timeout: PositiveSeconds = Field(
        86400.0,
        description="Seconds a job may wait in the queue; it is then 'expired' and never runs. "
        "Default a day.",
    )
    max_result_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="Largest upstream answer a job keeps; a larger one fails the job with "
        "result_too_large. Default 16 MiB.",
    )
    visibility: Literal["key", "team"] = Field(
        "key",
        description="Who sees a job: only the key that submitted it, or every key of its team. "
        "Default key.",
    )
    poll_after: int = Field(
        2,
        ge=1,
        le=3600,
        description="Retry-After (seconds) on a job not finished yet. Default 2.",
    )
    max_wait: PositiveSeconds = Field(
        60.0,
        le=600,
        description="Most seconds 'Prefer: respond-async, wait=N' may wait for a job's answer "
        "before the 202. Default 60.",
    )
    shutdown_grace: float = Field(
        10.0,
        ge=0,
        le=600,
        description="Seconds running jobs get to finish when the gateway stops, before they "
        "are cut (with Redis another replica then runs them again). Default 10.",
    )
    max_queued_per_key: int = Field(
        1000,
        ge=1,
        description="Jobs of one key not finished yet (queued or running), across replicas "
        "with Redis; one more is refused with 429 too_many_jobs. Default 1000.",
    )
    webhooks: WebhookSettings = Field(default_factory=lambda: WebhookSettings())
