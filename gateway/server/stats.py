"""Counters of what the connection protocol refused, per process, shown on ``/readyz``."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class ConnectionStats:
    opened: int = 0
    refused_over_capacity: int = 0  # beyond server.connections.max_open
    head_too_large: int = 0  # 431: a header field, the field count or the whole head
    uri_too_long: int = 0  # 414
    malformed: int = 0  # 400: framing, characters, WebSocket upgrades
    timeouts: int = 0  # 408: a head or body too slow
    idle_closed: int = 0  # connections that never sent a byte

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
