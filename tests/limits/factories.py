"""Small builders for keys and planners, shared by the limits tests."""

from __future__ import annotations

import hashlib

from gateway.config.model import ApiKey, Limits, LimitsSection
from gateway.limits import Plan, Planner


def raw_key(name: str) -> str:
    return f"sk-test-{name}-0123456789abcdef"


def make_key(name: str, *, team: str | None = None, limits: Limits | None = None) -> ApiKey:
    digest = hashlib.sha256(raw_key(name).encode()).hexdigest()
    return ApiKey(name=name, hash=f"sha256:{digest}", team=team, limits=limits)


def limits(
    rpm: int | None = None,
    tpm: int | None = None,
    *,
    request_burst: int | None = None,
    token_burst: int | None = None,
) -> Limits:
    return Limits(
        requests_per_minute=rpm,
        tokens_per_minute=tpm,
        request_burst=request_burst,
        token_burst=token_burst,
    )


def plan_for(
    key: ApiKey,
    tokens: int = 0,
    *,
    section: LimitsSection | None = None,
    route: str = "chat",
    model: str | None = None,
    namespace: str = "rl",
) -> Plan:
    planner = Planner(section or LimitsSection(), [key], namespace=namespace)
    return planner.charges(key=key, route=route, model=model, tokens=tokens)
