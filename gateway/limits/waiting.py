"""Waiting for capacity (``limits.max_wait``): the requests asleep until their slot.

A limiter may admit a request that is short of capacity "after N ms" (``Decision.wait_ms``): its
buckets are already debited and the slot is its own (``gateway/limits/lua.py`` says how slots are
handed out). ``wait_for_slot`` sleeps until then before the request goes upstream. The client may
leave meanwhile: its body has been read, so the next ASGI message is the disconnect, and on it the
slot is given back (``Limiter.give_back``) and the request ends there.

``max_waiting`` bounds how many of a key's requests sleep at once **in each process**
(``WaitingRoom``). Per process on purpose: what a sleeping request holds (a connection, its body
under the body budget, its ``max_concurrent`` slot, a task) is this process's, as for
``max_concurrent``; across replicas the number waiting is already bounded by construction (a
bucket's debt is at most ``max_wait x rate``); and a shared count would cost a second Redis call
when the wait ends, and be left too high by a process that died with sleepers. A limiter checks
the room before it asks Redis, so a key whose room is full is refused as if it could not wait,
debiting nothing.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from gateway.http.body import ClientDisconnected
from gateway.types import Receive

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.limits.buckets import Decision
    from gateway.limits.limiter import Limiter

# A key's requests waiting at once in one process, when its limits set max_wait but no
# max_waiting.
DEFAULT_MAX_WAITING = 100


class WaitingRoom:
    """Per key name: requests of that key that may be sleeping until their slot, in this
    process. Owned by a limiter (shared with its local fallback), so it outlives config
    snapshots with it."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def enter(self, key: str, cap: int) -> bool:
        """Take a place for one of ``key``'s requests, if fewer than ``cap`` hold one."""
        count = self._counts.get(key, 0)
        if count >= cap:
            return False
        self._counts[key] = count + 1
        return True

    def leave(self, key: str) -> None:
        count = self._counts.get(key, 0) - 1
        if count > 0:
            self._counts[key] = count
        else:
            self._counts.pop(key, None)

    def waiting(self, key: str) -> int:
        return self._counts.get(key, 0)


async def wait_for_slot(
    limiter: Limiter, decision: Decision, receive: Receive, context: RequestContext
) -> int:
    """Sleep until the slot of ``decision`` (admitted with ``wait_ms`` > 0); the milliseconds
    waited, also recorded as ``context.queue_wait_ms``.

    A client that disconnects meanwhile gives the slot back and ``ClientDisconnected`` is
    raised: the request is over and nothing goes upstream. A request cancelled while it sleeps
    (the server shutting down) gives it back too, and stays cancelled. A request never both goes
    upstream and gives its slot back (a disconnect that comes as the sleep ends counts as a
    disconnect), and gives it back at most once: the slot is handed on once."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    watcher = loop.create_task(_disconnected(receive))
    left = True  # until the sleep is known to have run its course
    try:
        done, _ = await asyncio.wait((watcher,), timeout=decision.wait_ms / 1000)
        left = bool(done)
    finally:
        watcher.cancel()
        context.queue_wait_ms = round((loop.time() - started) * 1000)
        limiter.waited(decision)
        if left:
            await limiter.give_back(decision)
    if left:
        raise ClientDisconnected
    return context.queue_wait_ms


async def _disconnected(receive: Receive) -> None:
    """Return once the client has gone. The body was read before the limits were asked, so what
    comes is ``http.disconnect``; anything else is read past."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a receive that fails: the client is unreachable either way
        return
