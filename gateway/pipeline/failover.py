"""The attempt loop: send a request until an answer worth relaying comes back, before anything
has gone to the client.

Rules (docs/resilience.md; Envoy's router is the model):

- Only what happens before the response head is retried: a connect error, a timeout before the
  head (``retry.on_timeout``), a connection closed before the head, or a status in
  ``retry.on_status``. Once a head is relayed, nothing is retried or hidden (``relay.py``).
- An untried usable target is tried first, at once; a target tried again waits a jittered,
  exponential backoff. A 429's ``Retry-After`` rests that target; when every target is out only
  for a while, the loop waits for the first to come back if that is within the budget.
- ``retry.attempts`` and ``retry.budget`` bound each step; a fallback chain moves to its next step
  when a step has no usable target, has used its attempts or budget, or answered as
  ``fallback_on`` lists.
- When no further attempt will be made, the last answer is relayed as the upstream sent it (a
  client sees the upstream's own 503 or 429), or the last failure becomes the gateway's 502/504.

Every attempt is written to the request's context (the access line and metrics read it), and
reported to its target's health.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import orjson

from gateway.context import RequestContext, Try
from gateway.http.decoding import decoded_body
from gateway.pipeline.dispatch import Dispatch, Step
from gateway.pipeline.held_bodies import hold_body
from gateway.upstream.group import UpstreamGroup
from gateway.upstream.retry_after import retry_after_seconds
from gateway.upstream.seam import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamResponse,
    UpstreamStreamError,
    UpstreamTimeout,
)
from gateway.upstream.targets import UpstreamTarget

logger = logging.getLogger("gateway.failover")

# The most of an error body read to find its error.code for ``fallback_on``.
FALLBACK_BODY_BYTES = 64 * 1024

Sleep = Callable[[float], Awaitable[None]]


@dataclass(slots=True)
class Answer:
    """An attempt's response: the one relayed, or one kept in case nothing better comes."""

    response: UpstreamResponse
    target: UpstreamTarget
    step: Step
    probe: bool
    sent_at: float  # perf_counter() when this attempt was sent
    attempt: Try  # its record in the context (the outcome changes if it is retried)
    asked: str | None  # the model name this attempt asked for
    # Its target's health was told already (an answer that was going to be retried).
    reported: bool = False

    def finish(self, complete: bool, client_gone: bool) -> None:
        """The relay ended: tell the target's health how it went. A stream the upstream cut is
        a failure; a client that left says nothing about the target."""
        health = self.target.health
        health.outstanding -= 1
        if self.reported:
            return
        if client_gone and not complete:
            if self.probe:
                health.probe_in_flight = False
            return
        if complete and self.response.status < 500:
            if health.succeeded(self.probe):
                logger.info("upstream target '%s' is back in service", self.target.label)
        else:
            _report_failure(self.step.group, self.target, self.probe)

    def discard(self) -> None:
        """A later attempt replaces this answer."""
        self.response.close()
        self.target.health.finished()

    def abandon(self) -> None:
        """The request ended with this answer neither relayed nor replaced (the client left,
        or reading it failed): close it, and leave its target as if it had not been asked."""
        self.discard()
        if self.probe and not self.reported:
            self.target.health.probe_in_flight = False


class Unanswered(Exception):
    """No attempt got a response: the last failure, and the target it came from."""

    def __init__(self, error: UpstreamError, target: UpstreamTarget) -> None:
        super().__init__(str(error))
        self.error = error
        self.target = target


class _ClientFault(UpstreamError):
    """A fault in the HTTP client itself, not the upstream: never retried."""


def failure_kind(exc: BaseException) -> str:
    """What failed before the response head, for the access line and the metrics."""
    if isinstance(exc, _ClientFault):
        return "client"
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, UpstreamConnectError):
        return "connect"
    if isinstance(exc, UpstreamError):
        return "protocol"
    return "client"


async def first_answer(
    dispatch: Dispatch,
    context: RequestContext,
    *,
    sleep: Sleep = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> Answer:
    """The answer to relay; raises :class:`Unanswered` when every attempt failed before a
    response head.

    An answer that is to be retried (a 503, a 429, a ``fallback_on`` match) is kept open until
    the next attempt is actually sent: when none is (the budget ran out, no target came back),
    it is the one relayed, as the upstream sent it."""
    steps = dispatch.steps
    if len(steps) == 1:
        only = steps[0]
        if only.group.attempts == 1 and len(only.group.targets) == 1:
            # The common case, a single base_url: one attempt, nothing to choose or wait for
            # (what the loop below would do, without its bookkeeping).
            answer, failure = await _attempt(dispatch, context, only, only.group.targets[0], clock)
            if failure is not None:
                raise failure
            assert answer is not None
            return answer
    last: Unanswered | None = None
    kept: Answer | None = None
    current: Answer | None = None
    stop = False
    try:
        for index, step in enumerate(steps):
            group = step.group
            policy = group.retry
            later = index + 1 < len(steps)
            now = clock()
            deadline = now + policy.budget
            tried: list[UpstreamTarget] = []
            while len(tried) < group.attempts:
                if tried:
                    now = clock()
                    if now >= deadline:
                        break  # the budget is spent: no new attempt, whatever target is left
                target = group.choose(now, tried)
                if target is None:
                    back = group.next_return(now)
                    # Wait for a target that is out only for a while (a 429's Retry-After)
                    # when the step may retry at all and there is no next step to go to: an
                    # upstream configured for one attempt (a single base_url, by default)
                    # never delays a request, and a chain moves on rather than wait.
                    if back is not None and back <= deadline and group.attempts > 1 and not later:
                        await sleep(back - now)
                        now = clock()
                        continue
                    if later or context.attempts:
                        break  # this step cannot serve: the next one, or what was kept
                    # Nothing tried yet and nowhere else to go: try the least bad target
                    # rather than refuse on a health verdict that may be wrong.
                    target = group.last_resort(now)
                elif target in tried:
                    wait = policy.backoff_base * 2 ** (len(tried) - 1)
                    wait = min(policy.backoff_max, wait) * (rng or random).random()
                    if now + wait >= deadline:
                        break
                    await sleep(wait)
                tried.append(target)
                answer, failure = await _attempt(dispatch, context, step, target, clock)
                if failure is not None:
                    last = failure
                    if isinstance(failure.error, _ClientFault) or (
                        isinstance(failure.error, UpstreamTimeout) and not policy.on_timeout
                    ):
                        stop = True  # not to be retried: what was kept, else this failure
                        break
                    continue
                assert answer is not None
                # A new answer replaces the one kept, which stayed open until now so that a
                # later attempt failing before its head still leaves the upstream's own answer.
                if kept is not None:
                    kept.discard()
                    kept = None
                current = answer  # discarded by the handler below if anything here raises
                status = answer.response.status
                if status in policy.on_status:
                    _retrying(answer, f"status_{status}")
                    kept, current = answer, None
                    continue
                if later and dispatch.fallback_on:
                    moved = await _falls_back(answer, dispatch)
                    if moved:
                        _retrying(answer, f"fallback_{status}")
                        kept, current = answer, None
                        break
                return answer
            if stop:
                break
    except BaseException:
        for left in (kept, current):
            if left is not None:
                left.abandon()
        raise
    if kept is not None:
        # Relayed after all: its attempt's outcome is the answer's, as any relayed one's.
        kept.attempt.outcome = "ok"
        context.target = kept.target.label
        context.upstream_model = kept.asked if kept.asked != context.model else None
        return kept
    if last is None:  # every step had attempts >= 1: something was tried
        raise RuntimeError("a request was dispatched to no target")
    raise last


async def _attempt(
    dispatch: Dispatch,
    context: RequestContext,
    step: Step,
    target: UpstreamTarget,
    clock: Callable[[], float],
) -> tuple[Answer | None, Unanswered | None]:
    health = target.health
    probe = health.started(clock())
    context.attempts += 1
    context.target = target.label
    asked = dispatch.model_for(step, target)
    outbound = dispatch.outbound(step, target, asked)
    sent_at = time.perf_counter()
    try:
        limit = step.group.retry.attempt_timeout
        if limit is None:
            response = await target.client.send(outbound)
        else:
            try:
                async with asyncio.timeout(limit):
                    response = await target.client.send(outbound)
            except TimeoutError:
                raise UpstreamTimeout(
                    f"no response head within the attempt timeout of {limit:g} s"
                ) from None
    except Exception as exc:
        health.finished()
        kind = failure_kind(exc)
        context.tries.append(Try(target.name, target.target, kind))
        if isinstance(exc, UpstreamError):
            _report_failure(step.group, target, probe)
            return None, Unanswered(exc, target)
        if probe:
            health.probe_in_flight = False  # says nothing of the target: probe it again
        # A fault in the client itself, not the upstream: an OpenAI-shaped 502 for the caller,
        # the traceback for the operator, and no retry (it would fail the same way).
        logger.exception(
            "upstream client failed for upstream '%s' (request %s)",
            target.name,
            context.request_id,
        )
        return None, Unanswered(_ClientFault(type(exc).__name__), target)
    except BaseException:
        health.finished()
        if probe:
            health.probe_in_flight = False
        raise
    attempt = Try(target.name, target.target, "ok")
    context.tries.append(attempt)
    context.upstream_model = asked if asked != context.model else None
    return Answer(response, target, step, probe, sent_at, attempt, asked), None


def _retrying(answer: Answer, why: str) -> None:
    """An answer that another attempt may replace: its target's health is told now (so that
    the next pick already avoids it), and the attempt's outcome says why. A ``Retry-After`` (on
    a 429, or a 503: RFC 9110 §10.2.3) rests the target for that long."""
    response = answer.response
    target = answer.target
    answer.attempt.outcome = why
    answer.reported = True
    status = response.status
    if status in (429, 503):
        wait = retry_after_seconds(response.raw_headers, time.time())
        if wait is not None:
            target.health.rest(wait)
    if status >= 500:
        _report_failure(answer.step.group, target, answer.probe)
    elif status == 429:
        if answer.probe:
            target.health.probe_in_flight = False  # neither a success nor a failure
    elif target.health.succeeded(answer.probe):
        logger.info("upstream target '%s' is back in service", target.label)


def _report_failure(group: UpstreamGroup, target: UpstreamTarget, probe: bool) -> None:
    seconds = target.health.failed(probe, group.may_eject)
    if seconds is not None:
        logger.warning(
            "upstream target '%s' ejected for %g s (%s)",
            target.label,
            seconds,
            "its probe failed" if probe else "failures in a row",
        )


async def _falls_back(answer: Answer, dispatch: Dispatch) -> bool:
    """Does ``answer`` move the request down its chain (``fallback_on``)? Whatever of its body
    was read to decide is put back in front, in case it is relayed after all."""
    response = answer.response
    status = response.status
    rules = [rule for rule in dispatch.fallback_on if rule.status == status]
    if not rules:
        return False
    if any(rule.code is None for rule in rules):
        return True
    try:
        held, complete = await hold_body(response.read_chunk, None, FALLBACK_BODY_BYTES)
    except UpstreamStreamError:
        # Cut before its code could be read: it cannot be relayed whole, so the chain moves on
        # (kept, it is relayed cut, as the client would have seen it, only if nothing else is).
        answer.response = _Replayed(response, [], False)
        return True
    answer.response = _Replayed(response, held, complete)
    code = _error_code(b"".join(held), response.raw_headers) if complete else None
    return code is not None and any(rule.code == code for rule in rules)


def _error_code(body: bytes, headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    plain = decoded_body(body, list(headers), FALLBACK_BODY_BYTES)
    if plain is None:
        return None
    try:
        document = orjson.loads(plain)
    except orjson.JSONDecodeError:
        return None
    error = document.get("error") if isinstance(document, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


class _Replayed:
    """A response whose first chunks were already read: they are read again first."""

    def __init__(self, inner: UpstreamResponse, held: list[bytes], complete: bool) -> None:
        self._inner = inner
        self._held = held
        self._complete = complete
        self.status = inner.status

    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]:
        return self._inner.raw_headers

    async def read_chunk(self) -> bytes:
        if self._held:
            return self._held.pop(0)
        if self._complete:
            return b""
        return await self._inner.read_chunk()

    def close(self) -> None:
        self._inner.close()

    def release(self) -> None:
        self._inner.release()
