"""A job as clients read it: the JSON of ``GET /v1/jobs/{id}``, the list, and the webhook.

The upstream's answer is kept byte for byte: its body is given as text when it is UTF-8 (JSON
strings carry any UTF-8 exactly) and as ``body_base64`` otherwise; ``GET /v1/jobs/{id}/result``
returns it raw, status and headers included. The job's request is shown by method and path
only: its body and headers are the client's own and were sent once already.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import orjson

from gateway.http.headers import HOP_BY_HOP
from gateway.jobs.model import Headers, Job, JobResult

# Not worth showing, or not the job's to show: framing, and cookies the upstream set.
_HIDDEN = HOP_BY_HOP | {b"content-length", b"set-cookie"}


def job_view(job: Job, *, body: bool = True) -> dict[str, Any]:
    """``body``: with the answer's body (False for lists: a page of 100 finished jobs would
    otherwise carry up to 100 answers; ``GET /v1/jobs/{id}`` has it)."""
    return {
        "id": job.id,
        "object": "job",
        "status": job.status.value,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "expires_at": job.expires_at,
        "attempts": job.attempts,
        "cancel_requested": job.cancel_requested,
        "request": {"method": job.request.method, "path": job.request.path},
        "metadata": job.metadata,
        "response": None if job.result is None else _result_view(job.result, body),
        "error": None
        if job.error is None
        else {"code": job.error.code, "message": job.error.message},
        "webhook": None
        if job.webhook_url is None
        else {
            "url": job.webhook_url,
            "state": job.webhook_state.value,
            "deliveries": [
                {
                    "attempt": d.attempt,
                    "at": d.at,
                    "status": d.status,
                    "error": d.error,
                    "duration_ms": round(d.duration_ms, 1),
                }
                for d in job.deliveries
            ],
        },
    }


def kept_headers(headers: Headers) -> Headers:
    """The upstream's response headers a job keeps and shows."""
    return tuple((name, value) for name, value in headers if name not in _HIDDEN)


def _result_view(result: JobResult, body: bool) -> dict[str, Any]:
    headers: dict[str, str] = {}
    for name, value in result.headers:
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        # Repeated fields join with a comma (RFC 9110 §5.3), as a client library would.
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    view: dict[str, Any] = {"status_code": result.status, "headers": headers}
    if not body:
        return view
    try:
        view["body"] = result.body.decode("utf-8")
    except UnicodeDecodeError:
        view["body"] = None
        view["body_base64"] = base64.b64encode(result.body).decode("ascii")
    return view


def webhook_payload(job: Job) -> bytes:
    """The body of the job's webhook: Standard Webhooks' envelope (``type``, ``timestamp``,
    ``data``), the event named after how the job ended (``job.completed``...)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(job.finished_at or time.time()))
    view = job_view(job)
    # The receiver learns of the delivery it is reading, not of the ones still to come.
    if view["webhook"] is not None:
        view["webhook"] = {"url": job.webhook_url}
    return orjson.dumps({"type": f"job.{job.status.value}", "timestamp": stamp, "data": view})
