"""What the fake received: the request log, read and waited on from the test thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

T = TypeVar("T")


@dataclass(eq=False, slots=True)
class RecordedRequest:
    """One request as the server received it.

    ``completed_at`` is set when the last body message is handed to the server and
    ``disconnected_at`` when the client went away before that; both are ``time.monotonic()``
    values, written under the log's lock from the server thread.
    """

    request_id: str
    method: str
    path: str  # the raw path as received, without the query
    query_string: str
    headers: list[tuple[str, str]]  # as received, lower-case names
    body: bytes
    received_at: float
    completed_at: float | None = None
    disconnected_at: float | None = None

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    def header_values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    def json(self) -> Any:
        return orjson.loads(self.body)


class RequestLog:
    """The thread-safe list of what the server received, with waits for the test thread."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._requests: list[RecordedRequest] = []

    def append(self, request: RecordedRequest) -> None:
        with self._changed:
            self._requests.append(request)
            self._changed.notify_all()

    def mark_completed(self, request: RecordedRequest) -> None:
        with self._changed:
            request.completed_at = time.monotonic()
            self._changed.notify_all()

    def mark_disconnected(self, request: RecordedRequest) -> None:
        with self._changed:
            request.disconnected_at = time.monotonic()
            self._changed.notify_all()

    def snapshot(self) -> list[RecordedRequest]:
        with self._changed:
            return list(self._requests)

    def clear(self) -> None:
        with self._changed:
            self._requests.clear()

    def wait_for(self, predicate: Callable[[list[RecordedRequest]], T | None], timeout: float) -> T:
        """Block until ``predicate(requests)`` returns something other than None; return it."""
        with self._changed:
            deadline = time.monotonic() + timeout
            while (found := predicate(self._requests)) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [f"{r.method} {r.path}" for r in self._requests[-5:]]
                    raise TimeoutError(
                        f"fake upstream: condition not met in {timeout}s; saw {seen}"
                    )
                self._changed.wait(remaining)
            return found


def first_disconnected(
    request: RecordedRequest | None,
) -> Callable[[list[RecordedRequest]], RecordedRequest | None]:
    def predicate(requests: list[RecordedRequest]) -> RecordedRequest | None:
        candidates = [request] if request is not None else requests
        return next((r for r in candidates if r.disconnected_at is not None), None)

    return predicate
