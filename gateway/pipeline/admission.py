"""Admission: may this request go upstream, where to, and as what?

``admit`` reads top to bottom as the algorithm (after Go's ``ReverseProxy.ServeHTTP``): judge
the path, match a route, authenticate the key, take its concurrency slot, read the body when a
rule needs it, check the route's request rules (``gateway/policies/validation.py``), apply the
model rules (from a JSON body, a form's ``model`` field, or a model named in the path), then the
budgets and the limits, last, so that a request refused for any other reason costs its key
nothing. It returns the outbound request, or raises the refusal (``errors.py``); nothing reaches
the upstream for a refused request.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from gateway import errors
from gateway.accounting.accounts import KeyAccount
from gateway.accounting.budgets import SpendDecision
from gateway.auth import Principal
from gateway.context import RequestContext
from gateway.http import body as request_body
from gateway.http import multipart
from gateway.jobs.scope import JOB_OWNER
from gateway.limits import Decision, Plan
from gateway.limits.concurrency import ConcurrencyLimiter, Slot
from gateway.limits.waiting import wait_for_slot
from gateway.openai.stream_options import ask_for_stream_usage
from gateway.openai.tokens import reservation_parts, tokens_to_reserve
from gateway.pipeline import model_rules
from gateway.pipeline.dispatch import Dispatch, Rename
from gateway.pipeline.model_rules import Resolved, Rewrite
from gateway.pipeline.settlement import Settlement
from gateway.routing import Match, MethodMismatch, PathVerdict, judge_path, relative_raw_path
from gateway.runtime import Runtime
from gateway.types import Body, RawHeaders, Receive, Scope

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


@dataclass(slots=True)
class Held:
    """What admission takes and the request gives back however it ends (refused, cut,
    cancelled or complete), and the headers every answer to it carries."""

    lease: request_body.BodyLease
    slot: Slot | None = None
    # Headers the gateway adds to the response: deprecation notices, the caller's limits.
    extra: RawHeaders = field(default_factory=list)

    def release(self) -> None:
        self.lease.release()
        if self.slot is not None:
            self.slot.release()


@dataclass(frozen=True, slots=True)
class Admitted:
    dispatch: Dispatch
    settlement: Settlement | None
    rewrite: Rewrite | None


class Judged(NamedTuple):
    """A request the rules allow, before its budgets and limits: what ``judge`` found out.
    A tuple: made and unpacked on every request (a dataclass's ``__init__`` cost ~60 Python
    opcodes per request, bench/opcodes.py)."""

    match: Match
    principal: Principal
    resolved: Resolved
    # The client's body as it came, and as it goes upstream (the model rules may change it).
    received: Body
    payload: Body
    document: dict[str, Any] | None
    rewrite: Rewrite | None
    rename: Rename | None


async def admit(
    runtime: Runtime,
    concurrency: ConcurrencyLimiter,
    scope: Scope,
    receive: Receive,
    context: RequestContext,
    held: Held,
) -> Admitted:
    judged = await judge(runtime, scope, receive, context, held, concurrency)
    return await _charge(runtime, scope, receive, context, held, judged)


async def judge(
    runtime: Runtime,
    scope: Scope,
    receive: Receive,
    context: RequestContext,
    held: Held,
    concurrency: ConcurrencyLimiter | None,
) -> Judged:
    """Every rule but the budgets and limits: the path, the route, the key, the key's
    concurrency slot (unless ``concurrency`` is None: a job's submission takes none, its run
    does), the body, the request rules and the model rules. Raises the refusal."""
    headers: RawHeaders = scope["headers"]
    method: str = scope["method"]
    root_path: str = scope.get("root_path", "")
    path = relative_raw_path(scope.get("raw_path"), scope["path"], root_path)

    # Judged by what the path means once decoded; what is forwarded is exactly the raw path that
    # was matched.
    verdict = judge_path(path)
    if verdict is PathVerdict.UNSAFE:
        raise errors.unsafe_path()
    match = runtime.routes.match(method, path)
    if match is None:
        raise errors.unknown_route(method, path)
    if isinstance(match, MethodMismatch):
        raise errors.method_not_allowed(method, path, match.allowed)
    if verdict is PathVerdict.ENCODED_SLASH and not match.encoded_slashes_confined(path):
        raise errors.unsafe_path()
    held.extra = _endpoint_headers(match, root_path)
    route = match.endpoint.route
    context.route = route.name

    owner: str | None = scope.get(JOB_OWNER)
    principal = runtime.keys.authenticate(headers) if owner is None else _owner(runtime, owner)
    context.key = principal.name
    context.team = principal.config.team
    if not principal.may_use_route(route.name):
        raise errors.route_not_allowed(route.name)

    caps = runtime.concurrency.get(principal.name)
    if caps is not None and concurrency is not None:
        # Held until the response's last byte: an open stream keeps its slot.
        try:
            held.slot = concurrency.acquire(principal.name, caps)
        except errors.GatewayError:
            context.limit, context.limit_reason = "refused", "concurrency"
            raise

    payload = await request_body.read_body(
        receive, headers, runtime.config.server.max_body_bytes, held.lease
    )
    received = payload
    resolved = Resolved(runtime.upstreams[route.upstream], None, None)
    document: dict[str, Any] | None = None
    rewrite: Rewrite | None = None
    rename: Rename | None = None
    if route.rules is not None and method in _BODY_METHODS:
        # The route's request rules (validate:), before the model rules and the limits: a
        # refused request costs its key nothing. The model rules read the document parsed here.
        document = _checked_document(runtime, route.name, headers, payload)
    if route.model_in_body and method in _BODY_METHODS and payload:
        media = request_body.media_type(headers)
        if request_body.may_be_json(media):
            parsed = request_body.parse_json(payload) if document is None else document
            if isinstance(parsed, dict):
                document = parsed
                resolved = model_rules.resolve_model(
                    runtime, principal, document.get("model"), resolved.upstream
                )
                if resolved.renamed is not None:
                    document["model"] = resolved.renamed
                asked = route.stream_usage and ask_for_stream_usage(document)
                if resolved.renamed is not None or asked:
                    # Re-serialised once, and only when a rule changed the document; otherwise
                    # the client's bytes go upstream untouched.
                    payload = orjson.dumps(document)
                rename = functools.partial(_json_with_model, document)
        elif media == multipart.FORM_DATA:
            if (
                not principal.all_models
                or not runtime.config.allow_unlisted_models
                or runtime.models
            ):
                resolved, payload, rename = model_rules.resolve_form_model(
                    runtime, principal, headers, payload, resolved.upstream
                )
        elif not principal.all_models or not runtime.config.allow_unlisted_models:
            # A model rule applies but the model of a binary body cannot be read: refuse rather
            # than let the body pass unchecked.
            raise errors.unsupported_media(media.decode("latin-1"), route.name)
    elif route.model_in_path is not None:
        resolved, match, rewrite = model_rules.resolve_path_model(
            runtime, principal, match, route.model_in_path, resolved.upstream
        )
    elif route.models_list and method == "GET":
        rewrite = model_rules.model_list_rewrite(runtime, principal, resolved.upstream)
    context.upstream = resolved.upstream.name
    context.model = resolved.model
    context.upstream_model = resolved.renamed
    return Judged(match, principal, resolved, received, payload, document, rewrite, rename)


async def _charge(
    runtime: Runtime,
    scope: Scope,
    receive: Receive,
    context: RequestContext,
    held: Held,
    judged: Judged,
) -> Admitted:
    """The budgets and the limits, then the outbound request."""
    match, principal, resolved, _, payload, document, rewrite, rename = judged
    route = match.endpoint.route
    method: str = scope["method"]
    headers: RawHeaders = scope["headers"]
    upstream = resolved.upstream
    # Budgets and limits come last among the checks: a request refused for any other reason
    # costs its key nothing. The budget first, so that a budget refusal costs no rate limit.
    account = runtime.accounts.of(principal.name)
    spend = None
    if account is not None and account.budgets:
        spend = await _reserve_budget(runtime, account, resolved, document, len(payload), context)
    decision: Decision | None = None
    plan = runtime.planner.charges(
        key=principal.config, route=route.name, model=resolved.model, tokens=0
    )
    if plan.buckets.buckets:
        try:
            decision = await _admit(runtime, plan, document, len(payload), receive, context, held)
        except BaseException:
            if spend is not None:
                # Refused by a limit, or its client left while it waited: the request will not
                # be settled, so its budget reservation goes back now.
                held.extra = [*held.extra, *spend.headers(given_back=True)]
                await runtime.limiter.release(spend)
            raise
    if spend is not None:
        held.extra = [*held.extra, *spend.headers()]
    settlement: Settlement | None = None
    if account is not None or plan.buckets.buckets:
        settlement = Settlement(
            runtime.limiter,
            decision if plan.buckets.has_tokens else None,
            runtime.accounts,
            account,
            spend,
            limited=bool(plan.buckets.buckets),
        )

    alias = resolved.alias
    if alias is not None and alias.fallbacks and resolved.model is not None:
        steps = runtime.alias_chains[resolved.model]
    else:
        steps = runtime.chains[upstream.name]
    dispatch = Dispatch(
        method=method,
        path=match.upstream_path,
        query=scope.get("query_string", b""),
        headers=headers,
        forwarded_for=_forwarded_for(context),
        request_id=context.request_id,
        body=payload,
        body_model=resolved.renamed or resolved.model,
        rename=rename,
        timeouts=runtime.route_timeouts.get(route.name),
        steps=steps,
        fallback_on=alias.fallback_on if alias is not None else (),
        target_header=runtime.config.server.target_header,
    )
    return Admitted(dispatch, settlement, rewrite)


async def _reserve_budget(
    runtime: Runtime,
    account: KeyAccount,
    resolved: Resolved,
    document: dict[str, Any] | None,
    size: int,
    context: RequestContext,
) -> SpendDecision | None:
    """Reserve the request's estimated cost on its budgets, or raise the refusal. None when no
    reservation is made: a request that names no model, or whose model has no price, costs
    nothing a budget counts, so a budget never stops it."""
    accounts = runtime.accounts
    if resolved.model is None:
        return None
    price = accounts.prices.price(resolved.renamed, resolved.model)
    if price is None:
        return None
    prompt, output = reservation_parts(document, size, runtime.config.limits.default_max_tokens)
    plan = account.spend_plan(price.estimate(prompt, output), accounts.clock.now())
    spend = await runtime.limiter.reserve(plan)
    context.limit = "degraded" if spend.degraded else "allowed"
    if not spend.allowed:
        context.limit = "refused"
        context.limit_reason = "unavailable" if spend.unavailable else "budget"
        raise spend.error(accounts.clock.time())
    return spend


async def _admit(
    runtime: Runtime,
    plan: Plan,
    document: dict[str, Any] | None,
    size: int,
    receive: Receive,
    context: RequestContext,
    held: Held,
) -> Decision:
    """The limits' decision on the request, after its wait for a slot when it was given one
    (``limits.max_wait``); raises the refusal."""
    if plan.buckets.has_tokens:
        reserve = tokens_to_reserve(document, size, runtime.config.limits.default_max_tokens)
        plan = Plan(plan.key_name, plan.buckets, reserve)
    decision = await runtime.limiter.admit(plan)
    degraded = decision.degraded or context.limit == "degraded"  # the budget's, maybe
    context.limit = "degraded" if degraded else "allowed"
    if not decision.allowed:
        context.limit = "refused"
        context.limit_reason = "unavailable" if decision.unavailable else decision.kind
        raise decision.error()
    waited = 0
    if decision.wait_ms:
        # Admitted for a slot in the future (limits.max_wait): sleep until it. A client that
        # leaves meanwhile gives the slot back and the request ends (ClientDisconnected).
        waited = await wait_for_slot(runtime.limiter, decision, receive, context)
    held.extra = [*held.extra, *decision.headers(waited)]
    return decision


def _checked_document(
    runtime: Runtime, route: str, headers: RawHeaders, payload: Body
) -> dict[str, Any]:
    """The body parsed, if it keeps the route's request rules. A body that is not JSON cannot
    be checked, so it is refused (415) rather than let through unchecked; an empty one is not
    JSON either (400)."""
    media = request_body.media_type(headers)
    if not request_body.may_be_json(media):
        raise errors.uncheckable_media(media.decode("latin-1"), route)
    return runtime.validators[route].check(request_body.parse_json(payload))


def _json_with_model(document: dict[str, Any], model: str) -> Body:
    return orjson.dumps({**document, "model": model})


def _endpoint_headers(match: Match, root_path: str) -> RawHeaders:
    endpoint = match.endpoint
    if not endpoint.deprecated:
        return []
    extra = list(endpoint.deprecation_headers)
    link = endpoint.successor_link(root_path)
    if link is not None:
        extra.append(link)
    return extra


def _owner(runtime: Runtime, owner: str) -> Principal:
    """A job's run: the key that submitted it (``jobs/execution.py``), which the job names
    instead of keeping the key."""
    principal = runtime.keys.named(owner)
    if principal is None:
        raise errors.owner_gone()
    return principal


def _forwarded_for(context: RequestContext) -> str | None:
    """What X-Forwarded-For says to the targets that are told the client's address."""
    chain = context.forwarded_for
    if chain:
        return ", ".join(chain)
    return context.client
