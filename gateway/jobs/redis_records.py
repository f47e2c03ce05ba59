"""How ``RedisStore`` reads a job back from Redis: the hash its scripts write (layout in
``redis_scripts.py``) and the stream entries XREADGROUP and XAUTOCLAIM return, made into the
job records of ``model.py``. Replies come as bytes (the client has ``decode_responses=False``)
from redis-py, or as flat field/value lists from a script.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson

from gateway.jobs.model import (
    Delivery,
    Headers,
    Job,
    JobError,
    JobResult,
    Status,
    WebhookState,
    headers_from_plain,
    headers_plain,
)


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def headers_json(headers: Headers) -> bytes:
    """Headers as ``Job.dumps`` writes them (``model.headers_plain``)."""
    return orjson.dumps(headers_plain(headers))


def headers_of(data: bytes) -> Headers:
    return headers_from_plain(orjson.loads(data))


def job_of(reply: Any, *, bodies: bool = True) -> Job:
    """A job from a hash: HGETALL's dict, or a script's flat list of fields and values.
    ``bodies`` False: a read that left the bodies out (RENEW, PAGE): the request body is empty,
    a result (if read) has an empty body."""
    if isinstance(reply, dict):
        fields: dict[bytes, bytes] = reply
    else:
        fields = dict(zip(reply[::2], reply[1::2], strict=True))
    started = fields.get(b"started_at")
    finished = fields.get(b"finished_at")
    result = None
    if b"result_status" in fields:
        result = JobResult(
            int(fields[b"result_status"]),
            headers_of(fields[b"result_headers"]),
            fields.get(b"result_body", b"") if bodies else b"",
        )
    stored = Job.loads(fields[b"job"])
    # A record written before the body had its own field keeps it in ``job``.
    body = fields.get(b"body", stored.request.body) if bodies else b""
    error = None
    if b"error_code" in fields:
        error = JobError(fields[b"error_code"].decode(), fields[b"error_message"].decode())
    deliveries = fields.get(b"deliveries")
    return stored.but(
        request=replace(stored.request, body=body),
        status=Status(fields[b"status"].decode()),
        attempts=int(fields[b"attempts"]),
        started_at=None if started is None else float(started),
        finished_at=None if finished is None else float(finished),
        cancel_requested=fields.get(b"cancel") == b"1",
        result=result,
        error=error,
        webhook_state=WebhookState(fields[b"webhook"].decode()),
        deliveries=()
        if deliveries is None
        else tuple(Delivery(*entry) for entry in orjson.loads(deliveries)),
    )


def stream_entries(reply: Any) -> list[tuple[str, str]]:
    """(entry id, job id) from XREADGROUP's answer, in each shape redis-py gives it: a list of
    [stream, entries] (RESP2), or a dict of stream -> entries (RESP3)."""
    if not reply:
        return []
    groups = reply.values() if isinstance(reply, dict) else [item[1] for item in reply]
    out: list[tuple[str, str]] = []
    for entries in groups:
        # redis-py's older RESP3 parser wraps a stream's entries in one more list.
        if entries and isinstance(entries[0], list) and isinstance(entries[0][0], tuple | list):
            entries = entries[0]
        for entry, fields in entries:
            if fields:
                out.append((text(entry), text(fields[b"id"])))
    return out
