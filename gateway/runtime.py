"""One immutable snapshot of everything a request needs, built from one config.

The app holds a single reference to the current snapshot; a request reads it once and finishes on
it, so a reload (which builds a new snapshot and swaps the reference) never changes the rules
under a request in flight (DESIGN §1). Upstream pools are created here, in the lifespan, and
handed down explicitly: nothing lives in module globals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote_plus, urlencode

from gateway.auth import KeyRing
from gateway.config.model import GatewayConfig, ModelAlias, Timeouts, Upstream
from gateway.limits import Limiter, Planner
from gateway.routing import RouteTable
from gateway.upstream import ClientFactory, UpstreamClient


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    name: str
    config: Upstream
    client: UpstreamClient
    # The upstream's credentials and static headers, added after the client's are filtered.
    added_headers: tuple[tuple[str, str], ...]
    extra_query: str
    append_forwarded_for: bool
    # Lower-cased names of added_headers: the client's headers of these names are dropped.
    added_names: frozenset[bytes]

    def url(self, path: str, query_string: bytes) -> str:
        """``base_url`` + the route's upstream path + the client's query, unchanged."""
        url = self.config.base_url + path
        query = query_string.decode("latin-1")
        if self.extra_query:
            if query:
                # The configured parameters (api-version, ...) replace the client's own.
                kept = [
                    pair
                    for pair in query.split("&")
                    if unquote_plus(pair.split("=", 1)[0]) not in self.config.query
                ]
                query = "&".join([*kept, self.extra_query])
            else:
                query = self.extra_query
        return f"{url}?{query}" if query else url


def _auth_headers(upstream: Upstream) -> list[tuple[str, str]]:
    key = upstream.auth.key.get_secret_value() if upstream.auth.key else ""
    if not key or upstream.auth.style == "none":
        return []
    if upstream.auth.style == "bearer":
        return [("authorization", f"Bearer {key}")]
    return [(upstream.auth.style, key)]


def _target(name: str, upstream: Upstream, client: UpstreamClient) -> UpstreamTarget:
    policy = upstream.forwarded_for
    if policy is None:
        # Third-party APIs (https) learn nothing about our clients; internal ones (plain http,
        # usually a cluster-local vLLM or Ollama) get the address for their own logs.
        policy = "strip" if upstream.base_url.startswith("https://") else "append"
    added = (*((k.lower(), v) for k, v in upstream.headers.items()), *_auth_headers(upstream))
    return UpstreamTarget(
        name=name,
        config=upstream,
        client=client,
        added_headers=added,
        added_names=frozenset(k.encode("latin-1") for k, _ in added),
        extra_query=urlencode(upstream.query),
        append_forwarded_for=policy == "append",
    )


@dataclass(frozen=True, slots=True)
class Runtime:
    config: GatewayConfig
    routes: RouteTable
    keys: KeyRing
    upstreams: Mapping[str, UpstreamTarget]
    models: Mapping[str, ModelAlias]
    # Per route name: the route's own timeouts, or None to use the upstream's.
    route_timeouts: Mapping[str, Timeouts | None]
    planner: Planner
    # Shared by every snapshot (its buckets outlive a reload); owned by the app's lifespan.
    limiter: Limiter

    def timeouts(self, route: str, upstream: UpstreamTarget) -> Timeouts:
        return self.route_timeouts.get(route) or upstream.config.timeouts

    async def aclose(self) -> None:
        for target in self.upstreams.values():
            await target.client.aclose()


def build_runtime(
    config: GatewayConfig,
    client_factory: ClientFactory,
    limiter: Limiter,
    previous: Runtime | None = None,
) -> Runtime:
    """A snapshot for ``config``. Pools of upstreams whose settings did not change are reused
    from ``previous`` (so a reload keeps warm connections); the caller closes the rest."""
    upstreams: dict[str, UpstreamTarget] = {}
    for name, upstream in config.upstreams.items():
        old = previous.upstreams.get(name) if previous else None
        if old is not None and old.config == upstream:
            client = old.client
        else:
            client = client_factory(max_connections=upstream.max_connections)
        upstreams[name] = _target(name, upstream, client)
    return Runtime(
        config=config,
        routes=RouteTable(config.routes),
        keys=KeyRing(config.keys),
        upstreams=upstreams,
        models=dict(config.models),
        route_timeouts={route.name: route.timeouts for route in config.routes},
        planner=Planner.from_config(config),
        limiter=limiter,
    )


def retired_clients(previous: Runtime, current: Runtime) -> list[UpstreamClient]:
    """The pools of ``previous`` that ``current`` no longer uses."""
    kept = {id(target.client) for target in current.upstreams.values()}
    return [t.client for t in previous.upstreams.values() if id(t.client) not in kept]
