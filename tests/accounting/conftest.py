"""The Redis fixtures of the limits tests (a private redis-server, the session's Cluster)."""

from tests.limits.conftest import (
    flushed_redis_cluster,
    redis_client,
    redis_server,
    shared_redis_cluster,
)

__all__ = ["flushed_redis_cluster", "redis_client", "redis_server", "shared_redis_cluster"]
