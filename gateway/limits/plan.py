"""From configuration to charges: which buckets a request of a key, route and model pays into.

A request is charged to, each time the limits exist:

- the key's own limits (``keys[].limits``, or ``limits.default`` when it names none);
- its team's limits (``limits.teams[team]``), one bucket shared by all the team's keys;
- per key and route (``limits.routes[route]``);
- per key and model (``limits.models``: the exact public name, else the first shell pattern
  that matches, in config order). The bucket is per concrete model: a pattern says which
  limits apply, each model matching it has its own bucket, as with OpenAI's per-model limits.

Redis keys never contain the API key: a key is named by the first 16 hex digits of its
configured hash. All of one request's keys share one hash tag so one script can touch them all on
Redis Cluster: ``{k:<id>}`` for a key without a team, ``{t:<team>}`` for every bucket of a key
in a team (its own and the team's). A team is thus one slot; that is the price of charging the
team's bucket atomically with the key's.

How long a short request may wait for capacity (``max_wait``) is the key's (its own limits, or
``limits.default``), or the route's when ``limits.routes[route]`` sets one: the more specific
scope wins, as a route may serve work that can wait longer (a batch) or not at all (``0``).
``max_waiting`` is the key's (default ``DEFAULT_MAX_WAITING``).

The planner is built once per config snapshot; ``charges()`` is a dict lookup and an
allocation.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Iterable

from gateway.config.model import ApiKey, GatewayConfig, Limits, LimitsSection
from gateway.limits import lua
from gateway.limits.buckets import Bucket, BucketSet, Plan
from gateway.limits.waiting import DEFAULT_MAX_WAITING

# Combinations cached per key; models may be client-chosen (allow_unlisted_models), so bound it.
_MAX_COMBINATIONS = 1024
_SAFE_MODEL = re.compile(r"[A-Za-z0-9._:/@+-]{1,64}")


def limit_buckets(limits: Limits, prefix: str, scope: str) -> list[Bucket]:
    """The buckets one ``Limits`` describes: none for a rate of ``null``."""
    out: list[Bucket] = []
    if limits.requests_per_minute is not None:
        rpm = limits.requests_per_minute
        capacity = limits.request_burst if limits.request_burst is not None else rpm
        out.append(Bucket(f"{prefix}:rpm", "requests", capacity, rpm / 60, scope))
    if limits.tokens_per_minute is not None:
        tpm = limits.tokens_per_minute
        capacity = limits.token_burst if limits.token_burst is not None else tpm
        out.append(Bucket(f"{prefix}:tpm", "tokens", capacity, tpm / 60, scope))
    return out


def key_id(key: ApiKey) -> str:
    """The key's name in Redis: 16 hex digits of its configured hash, never the key."""
    return key.hash.removeprefix("sha256:")[:16]


def team_tag(team: str, namespace: str = "rl") -> str:
    """The prefix, hash tag included, of everything a team's keys keep in Redis."""
    return f"{namespace}:{{t:{team}}}"


def key_prefix(key: ApiKey, namespace: str = "rl") -> str:
    """The prefix of a key's own buckets and counters: under its team's hash tag when it has a
    team (so that one script can charge both), else under its own."""
    if key.team is None:
        return f"{namespace}:{{k:{key_id(key)}}}"
    return f"{team_tag(key.team, namespace)}:k:{key_id(key)}"


def _model_part(model: str) -> str:
    if _SAFE_MODEL.fullmatch(model):
        return model
    return "h" + hashlib.sha256(model.encode()).hexdigest()[:16]


class _KeyPlans:
    """One key's buckets, and its combinations with routes and models as they are asked for."""

    __slots__ = ("base", "cache", "key", "max_wait", "max_waiting", "name", "prefix")

    def __init__(self, key: ApiKey, limits: LimitsSection, namespace: str) -> None:
        self.key = key
        self.name = key.name
        own = key.limits if key.limits is not None else limits.default
        self.prefix = key_prefix(key, namespace)
        base = limit_buckets(own, self.prefix, f"key '{key.name}'")
        if key.team is not None:
            team = limits.teams.get(key.team)
            if team is not None:
                base += limit_buckets(team, team_tag(key.team, namespace), f"team '{key.team}'")
        self.base = tuple(base)
        self.max_wait = own.max_wait
        self.max_waiting = own.max_waiting or DEFAULT_MAX_WAITING
        self.cache: dict[tuple[str, str | None], BucketSet] = {}


class Planner:
    """Turns (key, route, model, token estimate) into a ``Plan``. Pure: no I/O."""

    def __init__(
        self,
        limits: LimitsSection,
        keys: Iterable[ApiKey] = (),
        *,
        namespace: str = "rl",
        previous: Planner | None = None,
    ) -> None:
        """``previous``: the planner of the config being replaced. With the same limits
        section, a key that did not change keeps its plans (and their cache), so a reload of
        many keys costs little on the event loop."""
        self._limits = limits
        self._namespace = namespace
        self._exact_models = dict(limits.models)
        self._model_patterns = [
            (pattern, lim)
            for pattern, lim in limits.models.items()
            if any(c in pattern for c in "*?[")
        ]
        reusable: dict[str, _KeyPlans] = {}
        if previous is not None and previous._limits == limits and previous._namespace == namespace:
            reusable = previous._keys
        self._keys: dict[str, _KeyPlans] = {}
        for key in keys:
            kept = reusable.get(key.name)
            self._keys[key.name] = (
                kept if kept is not None and kept.key == key else _KeyPlans(key, limits, namespace)
            )

    @classmethod
    def from_config(cls, config: GatewayConfig, previous: Planner | None = None) -> Planner:
        return cls(config.limits, config.keys, previous=previous)

    def charges(self, *, key: ApiKey, route: str, model: str | None, tokens: int) -> Plan:
        """The plan for one request: ``tokens`` is the reservation (``estimate_tokens``)."""
        plans = self._keys.get(key.name)
        if plans is None:  # a key not in this snapshot: plan it without caching
            plans = _KeyPlans(key, self._limits, self._namespace)
        bucket_set = plans.cache.get((route, model))
        if bucket_set is None:
            bucket_set = self._combine(plans, route, model)
            if len(plans.cache) >= _MAX_COMBINATIONS:
                plans.cache.clear()
            plans.cache[(route, model)] = bucket_set
        return Plan(plans.name, bucket_set, max(tokens, 0))

    def model_limits(self, model: str) -> Limits | None:
        found = self._exact_models.get(model)
        if found is not None:
            return found
        for pattern, lim in self._model_patterns:
            if fnmatch.fnmatchcase(model, pattern):
                return lim
        return None

    def _combine(self, plans: _KeyPlans, route: str, model: str | None) -> BucketSet:
        buckets = list(plans.base)
        max_wait = plans.max_wait
        route_limits = self._limits.routes.get(route)
        if route_limits is not None:
            buckets += limit_buckets(
                route_limits, f"{plans.prefix}:r:{route}", f"key '{plans.name}' on route '{route}'"
            )
            if route_limits.max_wait is not None:
                max_wait = route_limits.max_wait
        if model is not None:
            model_limits = self.model_limits(model)
            if model_limits is not None:
                buckets += limit_buckets(
                    model_limits,
                    f"{plans.prefix}:m:{_model_part(model)}",
                    f"key '{plans.name}' on model '{model}'",
                )
        wait_ms = round(max_wait * 1000) if max_wait and buckets else 0
        admit = lua.admit_command(buckets, wait_ms)
        return BucketSet(
            tuple(buckets),
            admit,
            lua.settle_command(buckets),
            max_wait_ms=wait_ms,
            max_waiting=plans.max_waiting,
            no_wait_command=lua.admit_command(buckets) if wait_ms else admit,
        )
