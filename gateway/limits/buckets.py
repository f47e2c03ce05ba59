"""The limiter's vocabulary: buckets, what a request is charged, and the decision.

A request's plan names the buckets it is charged to (requests buckets cost 1, token buckets cost
the request's token estimate). A limiter admits the plan, debiting every bucket, or refuses it,
debiting none, and says so in a ``Decision``, which also renders OpenAI's ``x-ratelimit-*``
headers and the 429 refusal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gateway import errors
from gateway.errors import GatewayError
from gateway.types import RawHeaders

Kind = Literal["requests", "tokens"]

# OpenAI's x-ratelimit-* names, per kind of bucket: limit, remaining, reset.
_HEADER_NAMES: dict[Kind, tuple[bytes, bytes, bytes]] = {
    "requests": (
        b"x-ratelimit-limit-requests",
        b"x-ratelimit-remaining-requests",
        b"x-ratelimit-reset-requests",
    ),
    "tokens": (
        b"x-ratelimit-limit-tokens",
        b"x-ratelimit-remaining-tokens",
        b"x-ratelimit-reset-tokens",
    ),
}
# Every header a Decision may set; the proxy drops the upstream's copies (they describe the
# gateway's own upstream key, not the caller's limits) before adding ours.
RATELIMIT_HEADERS = frozenset(name for names in _HEADER_NAMES.values() for name in names)
# The milliseconds an admitted request waited for its slot (limits.max_wait), when it waited.
QUEUE_WAIT_HEADER = b"x-gateway-queue-wait-ms"
_PER_MIN: dict[Kind, str] = {
    "requests": "requests per min (RPM)",
    "tokens": "tokens per min (TPM)",
}


@dataclass(frozen=True, slots=True)
class Bucket:
    """One token bucket: holds up to ``capacity`` and refills ``per_second``."""

    key: str  # Redis key (also the local limiter's); never contains a raw API key
    kind: Kind
    capacity: int
    per_second: float
    scope: str  # for messages: "key 'demo'", "team 'ml'", "key 'demo' on model 'gpt-4o'"


@dataclass(frozen=True, slots=True, eq=False)
class BucketSet:
    """The buckets one key, route and model are charged to, built once per combination.

    ``admit_command`` and ``settle_command`` are the Redis commands without their last
    argument (see ``gateway.limits.lua``), so an admission allocates almost nothing.
    Compared and hashed by identity: the planner hands out the same object every time.

    ``max_wait_ms`` is how long a request short of capacity may wait for it (``limits.max_wait``;
    0: not at all) and ``max_waiting`` how many of the key's requests may wait at once in this
    process; ``no_wait_command`` is ``admit_command`` with no waiting, for when that many do.
    """

    buckets: tuple[Bucket, ...]
    admit_command: tuple[str, ...]
    settle_command: tuple[str, ...]
    max_wait_ms: int = 0
    max_waiting: int = 0
    no_wait_command: tuple[str, ...] = ()

    @property
    def has_tokens(self) -> bool:
        return bool(self.settle_command)


@dataclass(frozen=True, slots=True)
class Charge:
    bucket: Bucket
    cost: int


@dataclass(frozen=True, slots=True)
class Plan:
    """What one request is charged: every bucket of ``buckets``; token buckets ``tokens``."""

    key_name: str
    buckets: BucketSet
    tokens: int

    @property
    def charges(self) -> tuple[Charge, ...]:
        return tuple(
            Charge(b, self.tokens if b.kind == "tokens" else 1) for b in self.buckets.buckets
        )

    def cost(self, bucket: Bucket) -> int:
        return self.tokens if bucket.kind == "tokens" else 1


@dataclass(frozen=True, slots=True)
class Decision:
    """A limiter's answer to a plan.

    ``remaining`` and ``reset_ms`` run parallel to ``plan.buckets.buckets``: the bucket's level
    after this request (floored; negative after overuse, or while requests wait for it) and the
    milliseconds until it is full again (-1: it never refills). Both are empty when no limiter
    could be asked (``unavailable``).

    ``wait_ms`` > 0 (a ``Scheduled`` decision): admitted for a slot that many milliseconds away
    (``limits.max_wait``).
    """

    plan: Plan
    allowed: bool
    retry_after_ms: int = 0  # refused: wait this long; -1: waiting cannot help (too large)
    remaining: tuple[int, ...] = ()
    reset_ms: tuple[int, ...] = ()
    limiting: int = -1  # index of the bucket that refused, -1 if none
    degraded: bool = False  # decided without the shared store (Redis down or skipped)
    unavailable: bool = False  # limits could not be checked and on_failure is 'closed': 503

    # Properties, not fields, so that the decisions of requests that do not wait (nearly all)
    # cost no more to make than before waiting existed; ``Scheduled`` has them as fields.
    @property
    def wait_ms(self) -> int:
        return 0

    @property
    def ticket(self) -> object:
        return None

    @property
    def limiting_bucket(self) -> Bucket | None:
        return self.plan.buckets.buckets[self.limiting] if self.limiting >= 0 else None

    @property
    def kind(self) -> Kind | None:
        """The kind of the bucket that refused: the error body's ``type``."""
        bucket = self.limiting_bucket
        return bucket.kind if bucket is not None else None

    def headers(self, waited_ms: int = 0) -> RawHeaders:
        """OpenAI's ``x-ratelimit-*`` headers for the caller's own limits, and after a wait of
        ``waited_ms`` (> 0) ``x-gateway-queue-wait-ms``, with the resets that much nearer.

        Per kind, the most constraining bucket speaks: the lowest remaining, then the latest
        reset. A kind without buckets gets no headers.
        """
        best: dict[Kind, tuple[int, int, int]] = {}
        for bucket, remaining, reset in zip(
            self.plan.buckets.buckets, self.remaining, self.reset_ms, strict=False
        ):
            seen = best.get(bucket.kind)
            if seen is None or (remaining, -reset) < (seen[1], -seen[2]):
                best[bucket.kind] = (bucket.capacity, remaining, reset)
        out: RawHeaders = []
        for kind, (limit, remaining, reset) in best.items():
            names = _HEADER_NAMES[kind]
            out.append((names[0], str(limit).encode()))
            out.append((names[1], str(max(remaining, 0)).encode()))
            if reset >= 0:
                reset = reset - waited_ms if reset > waited_ms else 0  # as of the end of the wait
                out.append((names[2], format_duration(reset).encode()))
        if waited_ms > 0:
            out.append((QUEUE_WAIT_HEADER, str(waited_ms).encode()))
        return out

    def message(self) -> str:
        """The refusal's text, after OpenAI's wording."""
        if self.unavailable:
            return "Rate limits cannot be checked right now. Please try again shortly."
        bucket = self.limiting_bucket
        if bucket is None:
            return ""
        cost = self.plan.cost(bucket)
        used = bucket.capacity - self.remaining[self.limiting]
        what = f"{_PER_MIN[bucket.kind]} on {bucket.scope}"
        if cost > bucket.capacity:
            return (
                f"Request too large for {what}: Limit {bucket.capacity}, Requested {cost}. "
                f"The input or output tokens must be reduced in order to run successfully."
            )
        if self.retry_after_ms < 0:
            return (
                f"Rate limit reached for {what}: Limit {bucket.capacity}, Used {used}, "
                f"Requested {cost}. This limit does not refill."
            )
        return (
            f"Rate limit reached for {what}: Limit {bucket.capacity}, Used {used}, "
            f"Requested {cost}. Please try again in {format_duration(self.retry_after_ms)}."
        )

    def refusal_headers(self) -> RawHeaders:
        """``retry-after`` (whole seconds, rounded up, at least 1), ``retry-after-ms`` and the
        ``x-ratelimit-*`` headers; no retry headers when waiting cannot help."""
        out: RawHeaders = []
        if self.retry_after_ms > 0:
            seconds = max(1, -(-self.retry_after_ms // 1000))
            out.append((b"retry-after", str(seconds).encode()))
            out.append((b"retry-after-ms", str(self.retry_after_ms).encode()))
        out += self.headers()
        return out

    def error(self) -> GatewayError:
        """The refusal as the gateway's error: 429 ``rate_limit_exceeded`` whose ``type`` is
        ``requests`` or ``tokens``, or 503 when the limits could not be checked."""
        if self.unavailable:
            return errors.limits_unavailable(self.message(), self.refusal_headers())
        return errors.rate_limited(
            self.message(),
            self.kind or "requests",
            self.refusal_headers(),
            retry_useless=self.retry_after_ms < 0,
        )


@dataclass(frozen=True, slots=True)
class Scheduled(Decision):
    """Admitted for a slot ``wait_ms`` milliseconds away (``limits.max_wait``): every bucket is
    debited already, and the request must sleep until then, or give the slot back
    (``Limiter.give_back``) with ``ticket``, the limiter's own record of what it debited."""

    wait_ms: int = 0
    ticket: object = None


def format_duration(ms: int) -> str:
    """Milliseconds as a Go ``time.Duration`` string, the form of OpenAI's reset headers:
    ``0s``, ``20ms``, ``1s``, ``1.5s``, ``6m0s``, ``1m30.5s``, ``1h0m0s``."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    sec = f"{seconds}.{millis:03d}".rstrip("0") if millis else str(seconds)
    if hours:
        return f"{hours}h{minutes}m{sec}s"
    if minutes:
        return f"{minutes}m{sec}s"
    return f"{sec}s"
