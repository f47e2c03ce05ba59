"""A large, valid config for the speed tests: many routes, many keys, a few of everything else.

The shape follows a real multi-tenant deployment: a handful of upstreams, each route with an alias
or two, each key with a team, a short list of allowed routes and models, and its own limits.
"""

from __future__ import annotations

import hashlib

BIG_ROUTES = 1_000
BIG_KEYS = 10_000


def big_config(routes: int = BIG_ROUTES, keys: int = BIG_KEYS, upstreams: int = 10) -> str:
    """YAML text of a config with ``routes`` routes and ``keys`` keys, valid as written."""
    lines = ["upstreams:"]
    for u in range(upstreams):
        lines += [
            f"  up{u}:",
            f"    base_url: http://upstream-{u}.internal:8000/v1",
            "    auth: {style: bearer, key: sk-upstream-key-0123456789}",
            "    headers: {x-tenant: gateway}",
            "    timeouts: {connect: 2, read: 300}",
        ]
    lines.append("routes:")
    for r in range(routes):
        lines += [
            f"  - name: route-{r}",
            f"    path: /v1/r{r}/chat/completions",
            "    methods: [POST, GET]",
            f"    upstream: up{r % upstreams}",
            "    aliases:",
            f"      - path: /r{r}/chat/completions",
            "        deprecated: 2025-01-01",
            f"        successor: /v1/r{r}/chat/completions",
        ]
    lines.append("models:")
    for m in range(100):
        lines.append(f"  model-{m}: {{upstream: up{m % upstreams}, model: upstream-model-{m}}}")
    lines.append("keys:")
    for k in range(keys):
        digest = hashlib.sha256(f"key-{k}".encode()).hexdigest()
        lines += [
            f"  - name: key-{k}",
            f"    hash: sha256:{digest}",
            f"    team: team-{k % 50}",
            f"    routes: [route-{k % routes}, route-{(k + 1) % routes}]",
            '    models: ["model-*", model-1]',
            "    limits: {requests_per_minute: 600, tokens_per_minute: 100000}",
        ]
    lines += [
        "limits:",
        "  default: {requests_per_minute: 60, tokens_per_minute: 10000}",
        "  teams:",
        *(f"    team-{t}: {{tokens_per_minute: 1000000}}" for t in range(50)),
        "",
    ]
    return "\n".join(lines)
