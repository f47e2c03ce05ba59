"""Requests in flight per key and per team: ``max_concurrent``, counted in this process.

Rate limits bound how often a key may start requests; they do not bound how many it holds open.
One client with 2,000 slow streams would otherwise fill the upstream pool and leave every other
key waiting. The cap counts a request from its admission to the last byte of its response, so
an open stream holds its slot for as long as it is open.

The count is per gateway process, on purpose: what it protects (the upstream connection pool,
the event loop, memory) is per process. With N replicas behind a balancer a key may hold up to N
times its cap in all. Counters are plain integers on the event loop: no lock, no await.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway import errors
from gateway.config.model import GatewayConfig


@dataclass(frozen=True, slots=True)
class ConcurrencyCaps:
    """One key's caps: its own, and its team's (shared by all of the team's keys)."""

    key: int | None
    team: str | None
    team_cap: int | None


def concurrency_caps(config: GatewayConfig) -> Mapping[str, ConcurrencyCaps]:
    """Per key name, for the keys that have any cap; a key absent here is not counted."""
    out: dict[str, ConcurrencyCaps] = {}
    for key in config.keys:
        own = key.limits if key.limits is not None else config.limits.default
        team = config.limits.teams.get(key.team) if key.team is not None else None
        team_cap = team.max_concurrent if team is not None else None
        if own.max_concurrent is not None or team_cap is not None:
            out[key.name] = ConcurrencyCaps(own.max_concurrent, key.team, team_cap)
    return out


class ConcurrencyLimiter:
    """Counts held by the app for its whole life, so a reload keeps what is in flight."""

    def __init__(self) -> None:
        self._keys: dict[str, int] = {}
        self._teams: dict[str, int] = {}

    def in_flight(self, key: str) -> int:
        return self._keys.get(key, 0)

    def acquire(self, key: str, caps: ConcurrencyCaps) -> Slot:
        """A slot for one request of ``key``, or ``errors.too_many_concurrent`` (429)."""
        held = self._keys.get(key, 0)
        if caps.key is not None and held >= caps.key:
            raise errors.too_many_concurrent(f"key '{key}'", caps.key)
        team = caps.team if caps.team_cap is not None else None
        if team is not None and caps.team_cap is not None:
            team_held = self._teams.get(team, 0)
            if team_held >= caps.team_cap:
                raise errors.too_many_concurrent(f"team '{team}'", caps.team_cap)
            self._teams[team] = team_held + 1
        self._keys[key] = held + 1
        return Slot(self, key, team)

    def _release(self, key: str, team: str | None) -> None:
        _decrement(self._keys, key)
        if team is not None:
            _decrement(self._teams, team)


def _decrement(counts: dict[str, int], name: str) -> None:
    left = counts.get(name, 0) - 1
    if left > 0:
        counts[name] = left
    else:
        counts.pop(name, None)  # idle keys cost no memory


class Slot:
    """One request's hold on its key's (and team's) count; released exactly once."""

    __slots__ = ("_key", "_limiter", "_team")

    def __init__(self, limiter: ConcurrencyLimiter, key: str, team: str | None) -> None:
        self._limiter: ConcurrencyLimiter | None = limiter
        self._key = key
        self._team = team

    def release(self) -> None:
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            limiter._release(self._key, self._team)
