"""Helpers for the jobs tests: wait for a job's end, in process or over HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import httpx

from gateway.types import ASGIApp
from tests.support.standin import call

FINISHED = frozenset({"completed", "failed", "cancelled", "expired"})


async def job_when_done(
    app: ASGIApp, job_id: str, headers: Sequence[tuple[str, str]], timeout: float = 10.0
) -> dict[str, Any]:
    """Poll ``GET /v1/jobs/{id}`` in process until the job ends; its last view."""
    deadline = time.monotonic() + timeout
    while True:
        answer = await call(app, "GET", f"/v1/jobs/{job_id}", headers=headers)
        assert answer.status == 200, answer.body
        view: dict[str, Any] = answer.json()
        if view["status"] in FINISHED:
            return view
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {view['status']} after {timeout} s")
        await asyncio.sleep(0.02)


def job_when_done_over_http(
    base_url: str, job_id: str, headers: dict[str, str], timeout: float = 20.0
) -> dict[str, Any]:
    """Poll ``GET /v1/jobs/{id}`` of a gateway process with httpx until the job ends."""
    deadline = time.monotonic() + timeout
    while True:
        answer = httpx.get(f"{base_url}/v1/jobs/{job_id}", headers=headers, timeout=5)
        assert answer.status_code == 200, answer.text
        view: dict[str, Any] = answer.json()
        if view["status"] in FINISHED:
            return view
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {view['status']} after {timeout} s")
        time.sleep(0.05)
