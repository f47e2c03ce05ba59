"""Benchmark: a burst of async jobs, in process and in Redis (issue #13's criterion).

How to run (from anywhere; needs ``taskset`` and, for the Redis store, ``redis-server`` on PATH;
the gateway installed)::

    python bench/jobs.py                      # both stores, 1,000 jobs each, about 20 s
    python bench/jobs.py --store memory --jobs 200 --delay-ms 20 --concurrency 4

It prints a table and writes ``bench/results/jobs.json`` (git-ignored). For each store the run
starts a gateway (``gateway serve``, access log on, no limits, one key, ``jobs: {store: memory or
redis, concurrency: C, per_key_concurrency: C}``) pinned to CPU 0; with Redis, a private
``redis-server`` (no persistence) on CPU 1. The fake upstream runs in this process, in a thread
of its own (``tests.support.fakeupstream.FakeUpstream``), because only there does it record when
each request arrived and ended: that record is what shows the bound. This process (the client and
the fake upstream) is pinned to CPU 1, like bench/run.py's load.

Each job is ``POST /v1/chat/completions`` with ``Prefer: respond-async`` and ``x-fake-delay-ms``
(a job replays its request's headers, so the fake upstream holds each job's request that long:
jobs take time and overlap). The client first submits one job per connection and waits for
their end (a warm-up: connections open, the gateway's first requests served, its Redis pool grown;
a cold gateway adds ~100 ms to the first submissions), forgets them, then submits all the jobs in
a burst on 64 connections (each connection submits one job after another), and polls two
one-job pages (``status=queued``, ``status=in_progress``) every 0.25 s until both are empty; the
list is then read in full, 100 jobs a page.

What each figure means:

- **submit p50 / p90 / p99 / max**: one submission's latency, from sending the request to the
  202's headers (the client's own queueing is not in it: each of the 64 connections sends its
  next job only once the previous one was answered). Every submission must be answered 202.
  With 64 submissions always open these are mostly queueing: p50 is about 64 divided by the
  submissions/s, so whichever of the gateway (CPU 0) and the client (CPU 1) is busier sets it.
- **burst s (submissions/s)**: from the first submission to the last 202.
- **jobs/s**: the jobs divided by the time from the first submission to the last job's
  ``finished_at`` (the gateway's own time stamp, so the poll's period does not count).
  **ceiling** is what the bound allows: ``concurrency / delay``; the upstream's hold time per
  request is slightly longer than the delay, and the gateway's own work per job comes on top.
- **wall s**: from the first submission until the poll saw every job ended (includes up to one
  poll period, 0.25 s, and the final tally).
- **completed / failed / other**: the jobs' end states; all must be ``completed``.
- **upstream max in flight**: the most chat completion requests the fake upstream held at once,
  the maximum overlap of the intervals from its ``received_at`` to its ``completed_at`` (the
  reply's last byte handed to the server). It must not exceed ``concurrency`` (shown next to
  it). The upstream sees each request after the gateway sent it and ends it before the gateway
  read the answer, so its intervals lie within the gateway's: this count can only be lower than
  the gateway's true number of requests open, never higher.
- **upstream requests**: chat completions the fake upstream received; one per job unless a job
  ran twice (at-least-once: a lapsed lease).
- **hold p50 / max**: how long the fake upstream held a request (``completed_at -
  received_at``), against the asked delay: what sharing this process's interpreter with the
  client cost the fake upstream (a hold well above the delay means it was held up here, which
  lowers jobs/s; it cannot raise the in-flight count above what the gateway sent).
- **upstream mean in flight**: the holds' sum over the upstream's busy span (first request
  received to last completed): how close to the bound the jobs ran on average.
- **CPU % burst / all**: the gateway's, the client's (this process's main thread, the fake
  upstream's thread not included) and Redis's CPU time, during the burst (first submission to
  last 202) and from the first submission to the end of the poll, in percent of one core. The
  gateway near 100% over the whole run would mean that it, not the bound, set jobs/s.

The run warns when the CPUs are busy before it starts: other work on the machine moves the
submission latencies by a factor of two or more, jobs/s by a few percent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from load import REQUEST, percentile
from procs import Server, ServerFailed, busy_seconds
from run import CHAT, KEY, LOAD_CPU, ROOT, _git, _table, _terminate, start_gateway, start_redis

# The fake upstream runs in this process (its record of each request's times is the evidence of
# the bound), and ``tests`` is not installed: the repository's root must be importable.
sys.path.insert(0, str(ROOT))

from tests.support.fakeupstream import FakeUpstream, RecordedRequest

RESULTS = ROOT / "bench" / "results" / "jobs.json"
CONNECTIONS = 64
POLL_PERIOD = 0.25
PAGE = 100  # the list endpoint's largest page
FINISHED = frozenset({"completed", "failed", "cancelled", "expired"})
# Time allowed for all jobs to end, beyond what the bound makes them take at least.
SLACK_S = 60.0
STORES = ("memory", "redis")

Results = dict[str, Any]


@dataclass(frozen=True)
class Plan:
    jobs: int
    delay_ms: int
    concurrency: int


@dataclass
class Burst:
    """What the client saw while submitting."""

    ids: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds, one per submission
    refused: Counter[str] = field(default_factory=Counter)  # status (or error) -> count
    first_wall: float = 0.0  # time.time() of the first submission: the jobs' clock
    first: float = 0.0  # perf_counter() of the first submission
    last: float = 0.0  # perf_counter() when the last 202 arrived


def gateway_config(
    path: Path, upstream: FakeUpstream, store: str, plan: Plan, redis: str | None
) -> None:
    """The gateway under test: no limits (a refusal would make jobs wait, which is not what is
    measured), one key, the jobs' bounds as asked."""
    from gateway.auth import hash_key

    config: dict[str, object] = {
        # No drain delay: each store's gateway is stopped at once after its run.
        "server": {"host": "127.0.0.1", "access_log": True, "drain_delay": 0},
        "upstreams": {"fake": {"base_url": upstream.base_url, "auth": {"style": "none"}}},
        "routes": [{"name": "chat", "path": CHAT, "upstream": "fake"}],
        "allow_unlisted_models": True,
        "keys": [{"name": "bench", "hash": hash_key(KEY)}],
        "jobs": {
            "store": store,
            "concurrency": plan.concurrency,
            "per_key_concurrency": plan.concurrency,
        },
    }
    if redis is not None:
        config["redis"] = {"url": redis}
    path.write_text(yaml.safe_dump(config, sort_keys=False))


# --- the client ------------------------------------------------------------------------------


async def submit_burst(session: aiohttp.ClientSession, base: str, plan: Plan) -> Burst:
    burst = Burst()
    body = json.dumps(REQUEST).encode()
    headers = {
        "Authorization": f"Bearer {KEY}",
        "Content-Type": "application/json",
        "Prefer": "respond-async",
        "x-fake-delay-ms": str(plan.delay_ms),
    }
    numbers = iter(range(plan.jobs))
    started = False

    async def connection() -> None:
        nonlocal started
        for _ in numbers:  # shared: each job is taken by one connection
            begun = time.perf_counter()
            if not started:
                started = True
                burst.first, burst.first_wall = begun, time.time()
            try:
                async with session.post(base + CHAT, data=body, headers=headers) as response:
                    answered = time.perf_counter()
                    await response.read()
                    location = response.headers.get("Location", "")
                    status = response.status
            except aiohttp.ClientError as exc:
                burst.refused[type(exc).__name__] += 1
                continue
            burst.latencies.append(answered - begun)
            burst.last = max(burst.last, answered)
            if status == 202 and location.startswith("/v1/jobs/"):
                burst.ids.append(location.removeprefix("/v1/jobs/"))
            else:
                burst.refused[str(status)] += 1

    await asyncio.gather(*(connection() for _ in range(CONNECTIONS)))
    return burst


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url, headers={"Authorization": f"Bearer {KEY}"}) as response:
        if response.status != 200:
            raise RuntimeError(f"GET {url} answered {response.status}: {await response.text()}")
        return await response.json()


async def any_with_status(session: aiohttp.ClientSession, base: str, status: str) -> bool:
    page = await get_json(session, f"{base}/v1/jobs?status={status}&limit=1")
    return bool(page["data"])


async def all_jobs(session: aiohttp.ClientSession, base: str) -> list[dict[str, Any]]:
    """Every job of the key, a page of 100 at a time."""
    jobs: list[dict[str, Any]] = []
    after = ""
    while True:
        page = await get_json(session, f"{base}/v1/jobs?limit={PAGE}{after}")
        jobs.extend(page["data"])
        if not page["has_more"]:
            return jobs
        after = f"&after={page['last_id']}"


async def wait_for_all(
    session: aiohttp.ClientSession, base: str, count: int, deadline: float
) -> list[dict[str, Any]]:
    """Poll until no job is queued or running, then read them all (two cheap one-job pages per
    poll: the full list of 1,000 views at every poll would load the gateway being measured)."""
    while True:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"the {count} jobs did not all end in time")
        await asyncio.sleep(POLL_PERIOD)
        if await any_with_status(session, base, "queued"):
            continue
        if await any_with_status(session, base, "in_progress"):
            continue
        jobs = await all_jobs(session, base)
        if len(jobs) >= count and all(job["status"] in FINISHED for job in jobs):
            return jobs


Snapshot = dict[str, float]


def cpu_snapshot(servers: Mapping[str, Server]) -> Snapshot:
    """CPU seconds so far of each server and of this thread (the client: the fake upstream's
    thread is not in it), with the wall clock."""
    snapshot = {name: server.cpu_seconds() for name, server in servers.items()}
    return snapshot | {"client": time.thread_time(), "wall": time.perf_counter()}


def cpu_pct(before: Snapshot, after: Snapshot, prefix: str) -> Results:
    wall = after["wall"] - before["wall"]
    return {
        f"{prefix}{name}_cpu_pct": round(100 * (after[name] - before[name]) / wall, 1)
        for name in before
        if name != "wall"
    }


async def drive(
    base: str, plan: Plan, servers: Mapping[str, Server], forget_warmup: Callable[[], None]
) -> tuple[Burst, list[dict[str, Any]], float, Results]:
    """Warm up, submit the burst, wait for every job to end: what the client saw, the jobs'
    views, when (perf_counter) the poll saw the end, and the CPU used during the burst and in
    all."""
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # One job per connection first: the client's connections are open, and the gateway has
        # served its first requests (and, with Redis, grown its connection pool and loaded its
        # scripts) before the burst; a cold first burst adds ~100 ms to the first submissions.
        warmup = Plan(jobs=CONNECTIONS, delay_ms=plan.delay_ms, concurrency=plan.concurrency)
        warm = await submit_burst(session, base, warmup)
        if len(warm.ids) != CONNECTIONS:
            raise RuntimeError(f"warm-up: {dict(warm.refused)} of {CONNECTIONS} not answered 202")
        await wait_for_all(session, base, len(warm.ids), time.perf_counter() + SLACK_S)
        forget_warmup()
        began = cpu_snapshot(servers)
        burst = await submit_burst(session, base, plan)
        submitted = cpu_snapshot(servers)
        least = plan.jobs * plan.delay_ms / 1000 / plan.concurrency
        deadline = time.perf_counter() + least + SLACK_S
        jobs = await wait_for_all(session, base, len(warm.ids) + len(burst.ids), deadline)
        seen_end = time.perf_counter()
        cpu = cpu_pct(began, submitted, "burst_") | cpu_pct(began, cpu_snapshot(servers), "")
        return burst, jobs, seen_end, cpu


# --- what the fake upstream saw --------------------------------------------------------------


def max_in_flight(requests: Iterable[RecordedRequest], end: float) -> int:
    """The most intervals [received_at, completed_at] open at once. A request that never
    completed (disconnected, or still open) counts as open until it disconnected, else ``end``:
    the count errs high, never low. At equal times an end goes before a start: a request that
    begins as another ends did not overlap it."""
    events: list[tuple[float, int]] = []
    for request in requests:
        closed = request.completed_at or request.disconnected_at or end
        events += [(request.received_at, 1), (closed, -1)]
    events.sort()
    most = now = 0
    for _, change in events:
        now += change
        most = max(most, now)
    return most


def upstream_summary(requests: Sequence[RecordedRequest], plan: Plan, end: float) -> Results:
    chats = [r for r in requests if r.path == CHAT]
    done = [r for r in chats if r.completed_at is not None]
    holds = [r.completed_at - r.received_at for r in done if r.completed_at is not None]
    # Requests held on average over the upstream's busy span: how close to the bound jobs ran.
    span = max((r.completed_at or 0.0 for r in done), default=0.0) - min(
        (r.received_at for r in done), default=0.0
    )
    return {
        "requests": len(chats),
        "not_completed": sum(r.completed_at is None for r in chats),
        "max_in_flight": max_in_flight(chats, end),
        "mean_in_flight": round(sum(holds) / span, 2) if span > 0 else None,
        "bound": plan.concurrency,
        "hold_p50_ms": round(1000 * statistics.median(holds), 1) if holds else None,
        "hold_p99_ms": round(1000 * percentile(holds, 99), 1) if holds else None,
        "hold_max_ms": round(1000 * max(holds), 1) if holds else None,
    }


# --- one store -------------------------------------------------------------------------------


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 2)


def summarize(
    plan: Plan, burst: Burst, jobs: list[dict[str, Any]], seen_end: float, cpu: Results
) -> Results:
    submitted = set(burst.ids)
    ours = [job for job in jobs if job["id"] in submitted]
    states = Counter(job["status"] for job in ours)
    errors = Counter(job["error"]["code"] for job in ours if job["error"] is not None)
    last_finished = max((job["finished_at"] for job in ours), default=burst.first_wall)
    span = last_finished - burst.first_wall
    lat = burst.latencies
    return {
        "submitted": len(burst.ids),
        "refused": dict(burst.refused),
        "submit_p50_ms": _ms(percentile(lat, 50)),
        "submit_p90_ms": _ms(percentile(lat, 90)),
        "submit_p99_ms": _ms(percentile(lat, 99)),
        "submit_max_ms": _ms(max(lat, default=0.0)),
        "burst_s": round(burst.last - burst.first, 3),
        "submissions_per_s": round(len(lat) / (burst.last - burst.first), 1) if lat else 0.0,
        "jobs_per_s": round(len(ours) / span, 1) if span > 0 else 0.0,
        "ceiling_jobs_per_s": round(plan.concurrency * 1000 / plan.delay_ms, 1),
        "last_finished_s": round(span, 3),
        "wall_s": round(seen_end - burst.first, 3),
        "completed": states.pop("completed", 0),
        "failed": states.pop("failed", 0),
        "other": dict(states),
        "missing": len(submitted) - len(ours),
        "error_codes": dict(errors),
        "attempts_over_1": sum(job["attempts"] > 1 for job in ours),
        **cpu,
    }


@contextmanager
def maybe_redis(store: str, work: Path) -> Iterator[Server | None]:
    if store != "redis":
        yield None
        return
    with start_redis(work) as server:
        yield server


def measure(store: str, plan: Plan, work: Path) -> Results:
    with ExitStack() as stack:
        upstream = stack.enter_context(FakeUpstream())
        redis = stack.enter_context(maybe_redis(store, work))
        redis_url = None if redis is None else f"redis://127.0.0.1:{redis.port}/0"
        config = work / f"gateway-{store}.yaml"
        gateway_config(config, upstream, store, plan, redis_url)
        gateway = stack.enter_context(start_gateway(config, f"gateway-{store}", work))
        servers = {"gateway": gateway} | ({} if redis is None else {"redis": redis})
        burst, jobs, seen_end, cpu = asyncio.run(
            drive(gateway.url(""), plan, servers, upstream.clear)
        )
        gateway.check_alive()
        results = summarize(plan, burst, jobs, seen_end, cpu)
        results["upstream"] = upstream_summary(upstream.requests, plan, time.monotonic())
        return results


# --- the report ------------------------------------------------------------------------------


def report(results: Results) -> str:
    plan = results["plan"]
    stores: dict[str, Results] = results["stores"]
    rows: list[list[object]] = [["", *stores]]

    def row(label: str, pick: Any) -> None:
        rows.append([label, *(pick(r) for r in stores.values())])

    row("submitted (202)", lambda r: f"{r['submitted']:,} / {plan['jobs']:,}")
    row("submit p50 / p90 ms", lambda r: f"{r['submit_p50_ms']} / {r['submit_p90_ms']}")
    row("submit p99 / max ms", lambda r: f"{r['submit_p99_ms']} / {r['submit_max_ms']}")
    row("burst s (submissions/s)", lambda r: f"{r['burst_s']} ({r['submissions_per_s']:,})")
    row("jobs/s (ceiling)", lambda r: f"{r['jobs_per_s']} ({r['ceiling_jobs_per_s']})")
    row("wall s", lambda r: r["wall_s"])
    row("completed / failed / other", lambda r: _states(r))
    row(
        "upstream max in flight (bound)",
        lambda r: f"{r['upstream']['max_in_flight']} ({r['upstream']['bound']})",
    )
    row("upstream requests", lambda r: f"{r['upstream']['requests']:,}")
    row(
        "hold p50 / max ms",
        lambda r: f"{r['upstream']['hold_p50_ms']} / {r['upstream']['hold_max_ms']}",
    )
    row("upstream mean in flight", lambda r: r["upstream"]["mean_in_flight"])
    row("CPU % burst: gateway / client", lambda r: _cpu(r, "burst_"))
    row("CPU % all: gateway / client", lambda r: _cpu(r, ""))
    if any("redis_cpu_pct" in r for r in stores.values()):
        row(
            "redis CPU % burst / all",
            lambda r: (
                f"{r['burst_redis_cpu_pct']} / {r['redis_cpu_pct']}"
                if "redis_cpu_pct" in r
                else "-"
            ),
        )
    head = (
        f"{plan['jobs']:,} jobs in a burst on {CONNECTIONS} connections, upstream delay "
        f"{plan['delay_ms']} ms, jobs.concurrency = per_key_concurrency = {plan['concurrency']}"
    )
    return f"{head}\n\n{_table(rows)}"


def _cpu(r: Results, prefix: str) -> str:
    return f"{r[prefix + 'gateway_cpu_pct']} / {r[prefix + 'client_cpu_pct']}"


def _states(r: Results) -> str:
    other = sum(r["other"].values()) + r["missing"]
    return f"{r['completed']:,} / {r['failed']} / {other}"


def problems(results: Results) -> list[str]:
    """What breaks the criterion: a refused submission, a job not completed, the bound
    exceeded."""
    found: list[str] = []
    jobs = results["plan"]["jobs"]
    for store, r in results["stores"].items():
        if r["submitted"] != jobs or r["refused"]:
            found.append(f"{store}: {r['submitted']} of {jobs} answered 202; {r['refused']}")
        if r["completed"] != r["submitted"]:
            found.append(
                f"{store}: {r['completed']} completed of {r['submitted']} (failed {r['failed']}, "
                f"other {r['other']}, missing {r['missing']}, errors {r['error_codes']})"
            )
        upstream = r["upstream"]
        if upstream["max_in_flight"] > upstream["bound"]:
            found.append(
                f"{store}: {upstream['max_in_flight']} upstream requests at once, over the "
                f"bound of {upstream['bound']}"
            )
        if upstream["requests"] != r["submitted"]:
            found.append(f"{store}: {upstream['requests']} upstream requests for {jobs} jobs")
    return found


# --- entry point -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000, help="jobs per store (1000)")
    parser.add_argument("--delay-ms", type=int, default=50, help="upstream delay per job (50)")
    parser.add_argument("--store", choices=[*STORES, "both"], default="both")
    parser.add_argument(
        "--concurrency", type=int, default=8, help="jobs.concurrency and per_key_concurrency (8)"
    )
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.delay_ms < 1 or args.concurrency < 1:
        parser.error("--jobs, --delay-ms and --concurrency must be 1 or more")
    plan = Plan(jobs=args.jobs, delay_ms=args.delay_ms, concurrency=args.concurrency)
    stores = STORES if args.store == "both" else (args.store,)
    signal.signal(signal.SIGTERM, _terminate)
    # The client and the fake upstream's thread (started later, so it inherits this) share the
    # load's CPU; the gateway has CPU 0 to itself.
    os.sched_setaffinity(0, {LOAD_CPU})
    before = busy_seconds()
    time.sleep(1)
    busy = {cpu: round(100 * (t - before[cpu]), 1) for cpu, t in busy_seconds().items()}
    if max(busy.values()) > 10:
        print(
            f"warning: the machine is busy before the run (percent per CPU: {busy})",
            file=sys.stderr,
        )
    results: Results = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "plan": vars(plan) | {"connections": CONNECTIONS},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "busy_before_pct": busy,
        },
        "git": _git(),
        "stores": {},
    }
    began = time.monotonic()
    failed: str | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="gateway-bench-jobs-") as work:
            for store in stores:
                print(f"-- {store} store", file=sys.stderr, flush=True)
                results["stores"][store] = measure(store, plan, Path(work))
    except (ServerFailed, RuntimeError) as exc:
        failed = str(exc)
        results["error"] = failed
    except KeyboardInterrupt:
        print("interrupted; every server is stopped", file=sys.stderr)
        return 130
    results["elapsed_s"] = round(time.monotonic() - began, 1)
    found = [] if failed is not None else problems(results)
    results["problems"] = found
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    if failed is not None:
        print(f"benchmark failed: {failed}", file=sys.stderr)
        return 1
    print(report(results))
    for problem in found:
        print(f"PROBLEM: {problem}")
    print(f"\n{results['elapsed_s']} s; results in {RESULTS.relative_to(ROOT)}")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
