"""The load: wrk for request rates and latency, an aiohttp client for paced and held-open streams.

Both run in the benchmark's process tree, which ``run.py`` pins to CPU 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from procs import die_with_parent

LUA = Path(__file__).resolve().parent / "post.lua"
REQUEST = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk(
    url: str,
    *,
    connections: int,
    seconds: int,
    key: str,
    stream: bool = False,
    chunks: int | None = None,
) -> WrkResult:
    """One wrk run (one thread) with ``post.lua``; raises if wrk fails."""
    env = {
        **os.environ,
        "BENCH_KEY": key,
        "BENCH_STREAM": "1" if stream else "",
        "BENCH_CHUNKS": "" if chunks is None else str(chunks),
    }
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(LUA), url]
    done = subprocess.run(
        argv,
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=False,
        preexec_fn=die_with_parent,
    )
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    latency = data["latency_us"]
    return WrkResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        errors=sum(data["errors"].values()),
        p50_ms=latency["p50"] / 1000,
        p90_ms=latency["p90"] / 1000,
        p99_ms=latency["p99"] / 1000,
        max_ms=latency["max"] / 1000,
    )


@dataclass
class StreamTrace:
    """One stream as the client saw it: perf_counter times of the request, the response head,
    each complete SSE event, and the end."""

    started: float
    head: float = 0.0
    events: list[float] = field(default_factory=list)
    ended: float = 0.0
    error: str | None = None


def _headers(key: str, chunks: int, interval_ms: int) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {key}",
        "x-fake-chunks": str(chunks),
        "x-fake-interval-ms": str(interval_ms),
    }


async def _stream(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: bytes
) -> StreamTrace:
    trace = StreamTrace(started=time.perf_counter())
    try:
        async with session.post(url, data=body, headers=headers) as response:
            trace.head = time.perf_counter()
            if response.status != 200:
                trace.error = f"HTTP {response.status}: {(await response.read())[:200]!r}"
                return trace
            pending = b""
            async for data in response.content.iter_any():
                now = time.perf_counter()
                parts = (pending + data).split(b"\n\n")
                pending = parts.pop()
                trace.events.extend(now for _ in parts)
    except (aiohttp.ClientError, TimeoutError) as exc:
        trace.error = repr(exc)
    trace.ended = time.perf_counter()
    return trace


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None, sock_read=30),
    )


_STREAM_BODY = json.dumps({**REQUEST, "stream": True}, separators=(",", ":")).encode()


async def paced_streams(
    url: str, *, key: str, concurrency: int, seconds: float, chunks: int, interval_ms: int
) -> list[StreamTrace]:
    """Keep ``concurrency`` paced streams open for ``seconds``, starts spread evenly.

    Each worker runs streams back to back; worker i begins i/concurrency of a stream's length
    late, so new streams start at a steady rate (a burst of simultaneous starts would measure
    the accept queue, not the relay). Streams started during that first ramp are left out."""
    length = chunks * interval_ms / 1000
    headers = _headers(key, chunks, interval_ms)
    async with _session() as session:
        begin = time.perf_counter()
        measure_from = begin + length
        deadline = measure_from + seconds

        async def worker(i: int) -> list[StreamTrace]:
            await asyncio.sleep(i * length / concurrency)
            traces = []
            while time.perf_counter() < deadline:
                traces.append(await _stream(session, url, headers, _STREAM_BODY))
            return traces

        results = await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return [t for traces in results for t in traces if t.started >= measure_from]


async def hold_open(
    url: str,
    *,
    key: str,
    streams: int,
    chunks: int,
    interval_ms: int,
    sample: Callable[[], None],
    every: float = 0.1,
) -> list[StreamTrace]:
    """Open ``streams`` slow streams at once and call ``sample`` every ``every`` seconds until
    all have ended."""
    headers = _headers(key, chunks, interval_ms)
    async with _session() as session:
        tasks = [
            asyncio.ensure_future(_stream(session, url, headers, _STREAM_BODY))
            for _ in range(streams)
        ]
        while not all(task.done() for task in tasks):
            sample()
            await asyncio.wait(tasks, timeout=every)
        sample()
        return [task.result() for task in tasks]


def max_open(traces: Sequence[StreamTrace]) -> int:
    """The most streams that were open (head received, not yet ended) at the same moment."""
    edges = sorted(
        [(t.head, 1) for t in traces if t.head and not t.error]
        + [(t.ended, -1) for t in traces if t.head and not t.error]
    )
    most = current = 0
    for _, step in edges:
        current += step
        most = max(most, current)
    return most
