"""One immutable snapshot of everything a request needs, built from one config.

The app holds a single reference to the current snapshot; a request reads it once and finishes on
it, so a reload (which builds a new snapshot and swaps the reference) never changes the rules
under a request in flight (docs/design.md §1). Upstream pools are created here, in the lifespan, and
handed down explicitly: nothing lives in module globals.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.accounting.accounts import Accounts
from gateway.auth import AdminKeys, KeyRing, admin_keys
from gateway.config.model import GatewayConfig, ModelAlias, Timeouts
from gateway.limits import Limiter, Planner
from gateway.limits.concurrency import ConcurrencyCaps, concurrency_caps
from gateway.pipeline.dispatch import Step
from gateway.policies.validation import RequestValidator, request_validators
from gateway.routing import RouteTable
from gateway.upstream.balance import balancer
from gateway.upstream.egress import proxy_for, proxy_secrets
from gateway.upstream.group import UpstreamGroup, build_group
from gateway.upstream.health import HealthRegistry
from gateway.upstream.seam import ClientFactory, UpstreamClient
from gateway.upstream.targets import UpstreamTarget, build_target
from gateway.upstream.tls import client_ssl_context, tls_files_stamp, warn_unverified

# The admin API is off: no admin key opens it.
_NO_ADMIN_KEYS = AdminKeys({})


@dataclass(frozen=True, slots=True)
class Runtime:
    config: GatewayConfig
    routes: RouteTable
    keys: KeyRing
    upstreams: Mapping[str, UpstreamGroup]
    models: Mapping[str, ModelAlias]
    # Per route name: the route's own timeouts, or None to use the upstream's.
    route_timeouts: Mapping[str, Timeouts | None]
    planner: Planner
    # Per key name: its max_concurrent caps (and its team's); keys without any are absent.
    concurrency: Mapping[str, ConcurrencyCaps]
    # Shared by every snapshot (its buckets outlive a reload); owned by the app's lifespan.
    limiter: Limiter
    # Usage accounting and budgets: which keys are accounted, their budgets, the prices.
    accounts: Accounts
    # Model names the config lists (aliases, keys' exact model names, per-model limits): the
    # only ones metrics may use as label values.
    known_models: frozenset[str] = frozenset()
    # The steps a request takes, made once per snapshot: per upstream name its one step, and
    # per model alias with fallbacks its whole chain (``pipeline/failover.py``).
    chains: Mapping[str, tuple[Step, ...]] = field(default_factory=dict)
    alias_chains: Mapping[str, tuple[Step, ...]] = field(default_factory=dict)
    admin_keys: AdminKeys = _NO_ADMIN_KEYS
    # Per route name: the route's compiled request rules; routes without rules are absent.
    validators: Mapping[str, RequestValidator] = field(default_factory=dict)

    def timeouts(self, route: str, upstream: UpstreamGroup) -> Timeouts:
        return self.route_timeouts.get(route) or upstream.config.timeouts

    def targets(self) -> list[UpstreamTarget]:
        return [target for group in self.upstreams.values() for target in group.targets]

    async def aclose(self) -> None:
        for target in self.targets():
            await target.client.aclose()


@dataclass(frozen=True, slots=True)
class Tables:
    """The parts of a snapshot that are pure computation over the config (no I/O, no event
    loop): built in a worker thread on reload, so a config of many keys and routes does not
    hold the event loop (the thread yields the interpreter every few milliseconds)."""

    routes: RouteTable
    keys: KeyRing
    planner: Planner
    concurrency: Mapping[str, ConcurrencyCaps]
    accounts: Accounts
    validators: Mapping[str, RequestValidator] = field(default_factory=dict)


def build_tables(config: GatewayConfig, previous: Runtime | None = None) -> Tables:
    return Tables(
        routes=RouteTable(config.routes),
        keys=KeyRing(config.keys, previous.keys if previous else None),
        planner=Planner.from_config(config, previous.planner if previous else None),
        concurrency=concurrency_caps(config),
        accounts=Accounts(config),
        validators=request_validators(config),
    )


def build_runtime(
    config: GatewayConfig,
    client_factory: ClientFactory,
    limiter: Limiter,
    previous: Runtime | None = None,
    tables: Tables | None = None,
    health: HealthRegistry | None = None,
) -> Runtime:
    """A snapshot for ``config``. Pools of targets whose upstream's settings did not change are
    reused from ``previous`` (so a reload keeps warm connections); the caller closes the rest.
    The pools are made here, on the event loop; ``tables`` may have been built elsewhere.
    ``health`` keeps what is known about the targets across snapshots (the app owns it)."""
    if health is None:
        health = HealthRegistry()
    upstreams: dict[str, UpstreamGroup] = {}
    kept: set[tuple[str, str, str]] = set()
    for name, upstream in config.upstreams.items():
        old = previous.upstreams.get(name) if previous else None
        stamp = tls_files_stamp(upstream.tls)
        reusable = (
            {t.target: t.client for t in old.targets}
            if old is not None and old.config == upstream and old.tls_stamp == stamp
            else {}
        )
        checked = upstream.health_check is not None
        # Once per upstream and load: it reads the files (and warns about verify: false).
        tls = client_ssl_context(upstream.tls, upstream=name) if not reusable else None
        if reusable and not upstream.tls.verify:
            warn_unverified(name)  # at every load, as when the context is made
        targets = []
        for target in upstream.target_list():
            assert target.name is not None  # target_list names every target
            # Checked at load (config/checks.py): a bad proxy setting never gets this far.
            proxy = proxy_for(target.base_url, upstream.proxy, os.environ)
            client = reusable.get(target.name)
            if client is None:
                client = client_factory(
                    max_connections=upstream.max_connections, tls=tls, proxy=proxy
                )
            kept.add((name, target.name, target.base_url))
            state = health.health(name, target.name, target.base_url, upstream.outlier, checked)
            targets.append(
                build_target(name, upstream, client, target, state, proxy_secrets(proxy))
            )
        upstreams[name] = build_group(name, upstream, targets, balancer, stamp)
    health.keep_only(kept)
    if tables is None:
        tables = build_tables(config, previous)
    chains = {name: (Step(group),) for name, group in upstreams.items()}
    alias_chains = {
        public: (
            Step(upstreams[alias.upstream]),
            *(Step(upstreams[step.upstream], step.model or public) for step in alias.fallbacks),
        )
        for public, alias in config.models.items()
        if alias.fallbacks
    }
    return Runtime(
        chains=chains,
        alias_chains=alias_chains,
        config=config,
        routes=tables.routes,
        keys=tables.keys,
        upstreams=upstreams,
        models=dict(config.models),
        route_timeouts={route.name: route.timeouts for route in config.routes},
        planner=tables.planner,
        concurrency=tables.concurrency,
        limiter=limiter,
        accounts=tables.accounts,
        known_models=listed_models(config),
        admin_keys=admin_keys(config.admin.keys),
        validators=tables.validators,
    )


def listed_models(config: GatewayConfig) -> frozenset[str]:
    """The model names an admin wrote down (patterns such as 'gpt-4o*' are not names)."""
    named = set(config.models) | set(config.limits.models) | set(config.prices.models)
    for key in config.keys:
        named.update(m for m in key.models if not any(c in m for c in "*?["))
    return frozenset(named)


def retired_clients(previous: Runtime, current: Runtime) -> list[UpstreamClient]:
    """The pools of ``previous`` that ``current`` no longer uses."""
    kept = {id(target.client) for target in current.targets()}
    return [t.client for t in previous.targets() if id(t.client) not in kept]
