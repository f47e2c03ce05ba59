"""Benchmark: the gateway against a fake upstream, in one run.

How to run (from anywhere; needs ``wrk`` and ``taskset`` on PATH, the gateway installed)::

    python bench/run.py               # the full run, about 4 minutes
    python bench/run.py --quick       # shorter measurements, about 50 s
    python bench/run.py --failover    # only the failover rows (6.), ~75 s (with --quick: ~10 s)

It prints a table and writes ``bench/results/latest.json`` (git-ignored). The run is one process
tree: the system under test (the gateway, or the bare app) is pinned to CPU 0; the fake upstream
(``python -m tests.support.fakeupstream``), wrk and the aiohttp client are pinned to CPU 1
(docs/design.md §5). Ratios within one run are what hold; absolute figures depend on the machine.
Every server is started on a free port, used only once it answers, and stopped on the way out, also
on Ctrl-C or SIGTERM (and on SIGKILL via the kernel's parent-death signal). Run it on an otherwise
quiet machine: it warns when the CPUs are busy before it starts, and flags figures during which
something else ran.

The gateway runs as users run it: ``gateway serve`` with the access log on (one JSON line per
request, to a file here), in-process limits set high enough never to refuse, one key.

What each figure means:

1. **Non-streaming req/s at 64 connections** (wrk, ``bench/post.lua``): direct to the fake
   upstream (the reference), through the gateway, and the bare
   uvicorn app (``bench/bare_app.py``: the same response bytes sent by a bare ASGI app with the
   gateway's uvicorn settings, the Python ceiling). ``gateway / bare``: target >= 0.30. The full
   run adds four rows, each with one thing changed: the access log off, the limits off, the
   metrics off (``metrics.enabled: false``; on, every response's usage is read), and the
   limits kept in Redis (a local ``redis-server`` on CPU 1, with the load; two limiter calls
   per request, admit and settle). ``bench/redis_clients.py`` compares Redis clients on that row.
   CPU columns, in percent of one core over the measurement: the system under test (SUT), the
   fake upstream, wrk, and per CPU "otherN": busy time on CPU N that none of them accounts for
   (anything else running on the machine: the report flags rows where it is large, as
   disturbed). Whichever side is near 100% is the limit; the report notes rows where the SUT
   was not, or where CPU 1 was full too. "us/req" is the SUT's CPU time per request.
2. **Added latency at 1 connection**: wrk's p50 and p99 (C, microsecond histogram: more precise
   than a Python client loop) through the gateway minus direct. Target: added p50 < 0.4 ms.
3. **50-chunk streams at 16 connections**: complete streams/s through the gateway (the fake
   upstream sends 50 pieces, no pacing: 52 events with the final chunk and ``[DONE]``) and from
   the bare app sending the same 52 events itself, one ASGI message each. ``gateway / bare``:
   target >= 1.5 (the relay forwards what arrives in one read as one message, so it may send
   fewer messages than the events it carries).
4. **Paced streams**: 100 streams open at all times, each 20 events 20 ms apart, starts spread
   evenly (aiohttp client). Added time to first event, p50 and p99 (gateway minus direct);
   targets < 1.5 ms and < 10 ms. "Never held back": every event arrives; an event is *held
   back* when it arrives less than half an interval after the previous one although the
   upstream spaced them (the direct runs show which events it spaces); target 0. Lateness is
   each event's delay after its stream's first event, minus the direct runs' median for that
   event.
5. **Memory**: the gateway's RSS when idle (after start-up, and again after the run), and its
   peak RSS (VmHWM, reset just before) while 1,000 slow streams (10 events 500 ms apart) are
   open at once. Target < 150 MB.
6. **Failover**: non-streaming req/s and p99 at 64 connections through three gateways, each
   with one upstream: ``single_base_url`` (the baseline), ``three_targets_healthy`` (three
   targets, all on the one fake upstream, so only the gateway's own cost differs) and
   ``three_targets_one_dead`` (the third target a port that refuses connections, ejected at its
   third failure in a row during the warm-up and kept out for the run). Each is measured after
   its own warm-up, in rounds that alternate the three (the median of the rounds is reported).
   Targets: three healthy targets cost under 5% of req/s over a single ``base_url``; with one
   dead, req/s and p99 stay within 10% of all healthy. (``--failover`` writes
   ``bench/results/failover.json``.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import yaml
from load import (
    REQUEST,
    StreamTrace,
    WrkResult,
    hold_open,
    max_open,
    paced_streams,
    percentile,
    wrk,
)
from procs import CpuMeter, Server, ServerFailed, busy_seconds, free_port, running

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "latest.json"
CHAT = "/v1/chat/completions"
KEY = "sk-gw-bench-key"
SUT_CPU, LOAD_CPU = 0, 1

Results = dict[str, Any]


@dataclass(frozen=True)
class Plan:
    seconds: int  # each wrk measurement
    warmup: int  # each wrk warm-up, same connections, discarded
    paced_seconds: float
    variants: bool  # also the non-streaming rows of VARIANTS
    failover_rounds: int  # rounds of the failover rows, each round every one of them once


FULL = Plan(seconds=10, warmup=2, paced_seconds=5.0, variants=True, failover_rounds=2)
QUICK = Plan(seconds=2, warmup=1, paced_seconds=1.5, variants=False, failover_rounds=1)
# The failover rows: one upstream each, of one base_url or of three targets (section 6).
FAILOVER_VARIANTS = ("single_base_url", "three_targets_healthy", "three_targets_one_dead")
# One thing changed from the gateway as measured: (result name, access log, where the limits
# are kept: "local" in the process, "redis", or None for no limits, metrics on).
Limits = str | None
VARIANTS: tuple[tuple[str, bool, Limits, bool], ...] = (
    ("gateway_log_off", False, "local", True),
    ("gateway_no_limits", True, None, True),
    ("gateway_metrics_off", True, "local", False),
    ("gateway_redis_limits", True, "redis", True),
)


# --- plain HTTP for readiness and samples (no proxies from the environment) ------------------


def http(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, list[tuple[str, str]], bytes]:
    """One request: status, response headers, body (any status)."""
    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=10) as response:
            return int(response.status), response.getheaders(), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, list(exc.headers.items()), exc.read()


def answers(path: str) -> Callable[[Server], bool]:
    def ready(server: Server) -> bool:
        try:
            http(server.url(path))
        except OSError:
            return False
        return True

    return ready


def chat(
    url: str, *, stream: bool = False, chunks: int | None = None
) -> tuple[list[tuple[str, str]], bytes]:
    """One request; raises unless it answers 200."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    if chunks is not None:
        headers["x-fake-chunks"] = str(chunks)
    body = json.dumps({**REQUEST, "stream": True} if stream else REQUEST).encode()
    status, response_headers, data = http(url, body, headers)
    if status != 200:
        raise RuntimeError(f"POST {url} answered {status}: {data[:500]!r}")
    return response_headers, data


_FRAMING = {"content-length", "transfer-encoding", "connection", "date", "server"}


def capture_sample(upstream: Server, path: Path) -> dict[str, int]:
    """The fake upstream's chat response and 50-piece stream, for the bare app to replay."""
    headers, body = chat(upstream.url(CHAT))
    stream_headers, stream = chat(upstream.url(CHAT), stream=True, chunks=50)
    events = [event + b"\n\n" for event in stream.split(b"\n\n") if event.strip()]
    sample = {
        "body": body.decode(),
        "events": [e.decode() for e in events],
        "headers": [(k, v) for k, v in headers if k.lower() not in _FRAMING],
        "stream_headers": [(k, v) for k, v in stream_headers if k.lower() not in _FRAMING],
    }
    path.write_text(json.dumps(sample))
    return {"body_bytes": len(body), "stream_bytes": len(stream), "stream_events": len(events)}


def gateway_config(
    path: Path,
    upstream: Server,
    *,
    access_log: bool,
    limits: Limits,
    redis_url: str | None = None,
    metrics: bool = True,
    upstream_entry: dict[str, object] | None = None,
) -> None:
    """``limits``: "local" (in the process), "redis" (at ``redis_url``) or None.
    ``upstream_entry``: the upstream's config (default: the fake upstream's ``base_url``)."""
    from gateway.auth import hash_key

    if upstream_entry is None:
        upstream_entry = {"base_url": upstream.url("/v1"), "auth": {"style": "none"}}
    config: dict[str, object] = {
        # No drain delay: each measurement stops its gateway at once.
        "server": {"host": "127.0.0.1", "access_log": access_log, "drain_delay": 0},
        "metrics": {"enabled": metrics},
        "upstreams": {"fake": upstream_entry},
        "routes": [{"name": "chat", "path": CHAT, "upstream": "fake"}],
        "allow_unlisted_models": True,
        "keys": [{"name": "bench", "hash": hash_key(KEY)}],
    }
    if limits is not None:  # high enough never to refuse: what they cost is measured
        config["limits"] = {
            "default": {"requests_per_minute": 10**9, "tokens_per_minute": 10**12},
        }
    if limits == "redis":
        if redis_url is None:
            raise ValueError("limits in Redis need a redis_url")
        config["redis"] = {"url": redis_url}
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def start_gateway(
    config: Path, name: str, work: Path, env: Mapping[str, str] | None = None
) -> AbstractContextManager[Server]:
    """``gateway serve`` as users run it, pinned to the SUT's CPU, ready once /readyz answers."""
    port = free_port()
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return running(
        name,
        argv,
        cpu=SUT_CPU,
        port=port,
        log=work / f"{name}.log",
        ready=answers("/readyz"),
        env=None if env is None else {**os.environ, **env},
    )


def start_upstream(work: Path) -> AbstractContextManager[Server]:
    """The fake upstream, on the load's CPU."""
    port = free_port()
    argv = [sys.executable, "-m", "tests.support.fakeupstream", "--host", "127.0.0.1"]
    argv += ["--port", str(port)]
    return running(
        "fake-upstream",
        argv,
        cpu=LOAD_CPU,
        port=port,
        log=work / "fake-upstream.log",
        ready=answers(CHAT),
        cwd=ROOT,
    )


def _redis_answers(server: Server) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def start_redis(work: Path) -> Iterator[Server]:
    """A private ``redis-server`` (no persistence) on the load's CPU: the SUT's CPU stays the
    gateway's alone, and Redis's share of the work shows in its own CPU column."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH: cannot measure limits in Redis")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    argv += ["no", "--dir", str(work)]
    with running(
        "redis", argv, cpu=LOAD_CPU, port=port, log=work / "redis.log", ready=_redis_answers
    ) as server:
        yield server


@contextmanager
def refusing_port() -> Iterator[int]:
    """A port bound but never listening: a connection to it is refused at once (a host that is
    up, its server down), and nothing else can take the port while the benchmark holds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        yield port


def failover_upstream(variant: str, upstream: Server, dead_port: int) -> dict[str, object]:
    """The upstream of a failover row: the fake's ``base_url``, or three targets on it."""
    base_url = upstream.url("/v1")
    if variant == "single_base_url":
        return {"base_url": base_url, "auth": {"style": "none"}}
    targets: list[dict[str, object]] = [{"name": n, "base_url": base_url} for n in ("a", "b", "c")]
    if variant == "three_targets_one_dead":
        targets[2]["base_url"] = f"http://127.0.0.1:{dead_port}/v1"
    return {
        "targets": targets,
        "auth": {"style": "none"},
        # The dead target is ejected at its third failure in a row, within the first warm-up,
        # and stays out for the whole run.
        "outlier": {"consecutive_failures": 3, "base_ejection": 3600, "max_ejection": 3600},
    }


def limiter_stats(gateway: Server) -> dict[str, Any]:
    """The limiter's counters from /readyz: a Redis figure only counts if nothing degraded."""
    _, _, body = http(gateway.url("/readyz"))
    limits: dict[str, Any] = json.loads(body).get("limits", {})
    return limits


# --- measurements ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    connections: int
    chunks: int | None = None  # a stream of this many pieces; None: a plain request


NONSTREAM_64, ONE, STREAMS_16 = Load(64), Load(1), Load(16, chunks=50)


def rate(url: str, plan: Plan, cpu: dict[str, Server], load: Load) -> Results:
    """Warm up, then one wrk measurement with the CPU use of ``cpu``'s servers."""

    def run(seconds: int) -> WrkResult:
        return wrk(
            url,
            connections=load.connections,
            seconds=seconds,
            key=KEY,
            stream=load.chunks is not None,
            chunks=load.chunks,
        )

    run(plan.warmup)
    meter = CpuMeter(cpu, client_cpu=LOAD_CPU)
    meter.start()
    result = run(plan.seconds)
    usage = meter.stop()
    for server in cpu.values():
        server.check_alive()
    figures: Results = {
        "rate": round(result.rate, 1),
        "requests": result.requests,
        "errors": result.errors,
        "p50_ms": round(result.p50_ms, 3),
        "p90_ms": round(result.p90_ms, 3),
        "p99_ms": round(result.p99_ms, 3),
        "max_ms": round(result.max_ms, 3),
        **usage,
    }
    if "sut" in cpu and result.rate:
        figures["sut_cpu_us_per_request"] = round(usage["sut_cpu_pct"] / 100 / result.rate * 1e6, 1)
    return figures


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {
        "min": round(min(values, default=0.0), 3),
        "p50": round(percentile(values, 50), 3),
        "p99": round(percentile(values, 99), 3),
        "max": round(max(values, default=0.0), 3),
    }


def paced_summary(
    direct: Sequence[StreamTrace], gateway: Sequence[StreamTrace], interval_ms: int
) -> Results:
    """Time to first event, lateness and held-back events: see the module docstring."""
    counts = sorted(len(t.events) for t in direct if not t.error)
    expected = counts[len(counts) // 2] if counts else 0
    schedule = [
        percentile([t.events[i] - t.events[0] for t in direct if len(t.events) == expected], 50)
        for i in range(expected)
    ]
    spaced = [i for i in range(1, expected) if schedule[i] - schedule[i - 1] >= interval_ms / 2e3]

    def side(traces: Sequence[StreamTrace]) -> Results:
        complete = [t for t in traces if not t.error and len(t.events) == expected]
        ttfb = [1000 * (t.events[0] - t.started) for t in complete]
        late = [
            1000 * (t.events[i] - t.events[0] - schedule[i])
            for t in complete
            for i in range(1, expected)
        ]
        gaps = [1000 * (t.events[i] - t.events[i - 1]) for t in complete for i in spaced]
        errors = [t.error for t in traces if t.error]
        return {
            "streams": len(traces),
            "incomplete": len(traces) - len(complete),
            "first_error": errors[0] if errors else None,
            "ttfb_ms": _stats(ttfb),
            "lateness_ms": _stats(late),
            "spaced_gap_ms": _stats(gaps),
            "held_back": sum(g < interval_ms / 2 for g in gaps),
        }

    d, g = side(direct), side(gateway)
    return {
        "events_per_stream": expected,
        "direct": d,
        "gateway": g,
        "added_ttfb_p50_ms": round(g["ttfb_ms"]["p50"] - d["ttfb_ms"]["p50"], 3),
        "added_ttfb_p99_ms": round(g["ttfb_ms"]["p99"] - d["ttfb_ms"]["p99"], 3),
    }


def paced(upstream: Server, gateway: Server, plan: Plan) -> Results:
    chunks, interval_ms, concurrency = 20, 20, 100
    runs: dict[str, list[StreamTrace]] = {}
    usage: Results = {}
    for name, server in (("direct", upstream), ("gateway", gateway)):
        meter = CpuMeter({"sut": gateway, "upstream": upstream}, client_cpu=LOAD_CPU)
        meter.start()
        runs[name] = asyncio.run(
            paced_streams(
                server.url(CHAT),
                key=KEY,
                concurrency=concurrency,
                seconds=plan.paced_seconds,
                chunks=chunks,
                interval_ms=interval_ms,
            )
        )
        usage[name] = meter.stop()
        gateway.check_alive()
    summary = paced_summary(runs["direct"], runs["gateway"], interval_ms)
    return {
        "concurrency": concurrency,
        "chunks": chunks,
        "interval_ms": interval_ms,
        **summary,
        "cpu": usage,
    }


def failover(plan: Plan, work: Path, upstream: Server, results: Results) -> None:
    """Section 6: the three failover rows, alternated in rounds; the median round's figures."""
    rows: Results = results.setdefault("failover_c64", {})
    with contextlib.ExitStack() as stack:
        dead = stack.enter_context(refusing_port())
        gateways: dict[str, Server] = {}
        for name in FAILOVER_VARIANTS:
            config = work / f"{name}.yaml"
            entry = failover_upstream(name, upstream, dead)
            gateway_config(config, upstream, access_log=True, limits="local", upstream_entry=entry)
            gateways[name] = stack.enter_context(start_gateway(config, name, work))
            chat(gateways[name].url(CHAT))
        runs: dict[str, list[Results]] = {name: [] for name in FAILOVER_VARIANTS}
        for turn in range(plan.failover_rounds):
            for name, gw in gateways.items():
                step(f"non-streaming, {name} (round {turn + 1} of {plan.failover_rounds})")
                runs[name].append(
                    rate(gw.url(CHAT), plan, {"sut": gw, "upstream": upstream}, NONSTREAM_64)
                )
        for name, figures in runs.items():
            rates = [f["rate"] for f in figures]
            p99s = [f["p99_ms"] for f in figures]
            median = sorted(figures, key=lambda f: f["rate"])[(len(figures) - 1) // 2]
            rows[name] = {
                **median,
                "rate": round(statistics.median(rates), 1),
                "p99_ms": round(statistics.median(p99s), 3),
                "rounds": {"rate": rates, "p99_ms": p99s},
            }
        log = gateways["three_targets_one_dead"].log.read_text(errors="replace")
        rows["three_targets_one_dead"]["dead_target_ejected"] = "'fake/c' ejected" in log
    single, healthy, one_dead = (rows[name] for name in FAILOVER_VARIANTS)
    rows["healthy_over_single"] = {
        "rate": round(healthy["rate"] / single["rate"], 3),
        "p99": round(healthy["p99_ms"] / single["p99_ms"], 3),
    }
    rows["one_dead_over_healthy"] = {
        "rate": round(one_dead["rate"] / healthy["rate"], 3),
        "p99": round(one_dead["p99_ms"] / healthy["p99_ms"], 3),
    }


def memory(gateway: Server) -> Results:
    streams, chunks, interval_ms = 1000, 10, 500
    reset = gateway.reset_peak()
    samples: list[float] = []
    traces = asyncio.run(
        hold_open(
            gateway.url(CHAT),
            key=KEY,
            streams=streams,
            chunks=chunks,
            interval_ms=interval_ms,
            sample=lambda: samples.append(gateway.memory_mb()["VmRSS"]),
        )
    )
    gateway.check_alive()
    after = gateway.memory_mb()
    errors = [t.error for t in traces if t.error]
    return {
        "streams": streams,
        "completed": len(traces) - len(errors),
        "max_open_at_once": max_open(traces),
        "first_error": errors[0] if errors else None,
        "peak_rss_mb": round(after["VmHWM"] if reset else max(samples), 1),
        "peak_from": "VmHWM after clear_refs" if reset else "VmRSS sampled every 0.1 s",
        "max_sampled_rss_mb": round(max(samples), 1),
    }


def measure(plan: Plan, work: Path, results: Results) -> None:
    """Every figure, into ``results`` as it is measured (so a failure keeps what came before)."""
    python = sys.executable

    def gateway(config: Path, name: str) -> AbstractContextManager[Server]:
        return start_gateway(config, name, work)

    with start_upstream(work) as upstream:
        results["sample"] = capture_sample(upstream, work / "sample.json")
        direct = upstream.url(CHAT)
        config = work / "gateway.yaml"
        gateway_config(config, upstream, access_log=True, limits="local")
        nonstream, latency, streams = (
            results.setdefault("nonstream_c64", {}),
            results.setdefault("latency_c1", {}),
            results.setdefault("streams_c16", {}),
        )
        with gateway(config, "gateway") as gw:
            chat(gw.url(CHAT))
            results["memory"] = {"idle_rss_mb": round(gw.memory_mb()["VmRSS"], 1)}
            both = {"sut": gw, "upstream": upstream}
            step("non-streaming, 64 connections")
            nonstream["direct"] = rate(direct, plan, {"upstream": upstream}, NONSTREAM_64)
            nonstream["gateway"] = rate(gw.url(CHAT), plan, both, NONSTREAM_64)
            step("latency, 1 connection")
            latency["direct"] = rate(direct, plan, {"upstream": upstream}, ONE)
            latency["gateway"] = rate(gw.url(CHAT), plan, both, ONE)
            latency["added_p50_ms"] = round(
                latency["gateway"]["p50_ms"] - latency["direct"]["p50_ms"], 3
            )
            latency["added_p99_ms"] = round(
                latency["gateway"]["p99_ms"] - latency["direct"]["p99_ms"], 3
            )
            step("50-chunk streams, 16 connections")
            streams["direct"] = rate(direct, plan, {"upstream": upstream}, STREAMS_16)
            streams["gateway"] = rate(gw.url(CHAT), plan, both, STREAMS_16)
            step("paced streams, 100 open")
            results["paced"] = paced(upstream, gw, plan)
            step("1,000 open streams")
            results["memory"].update(memory(gw))
            time.sleep(1)
            results["memory"]["idle_rss_after_mb"] = round(gw.memory_mb()["VmRSS"], 1)
        for name, access_log, limits, metrics in VARIANTS if plan.variants else ():
            variant = work / f"{name}.yaml"
            with contextlib.ExitStack() as stack:
                cpu = {"upstream": upstream}
                redis_url = None
                if limits == "redis":
                    redis = stack.enter_context(start_redis(work))
                    cpu["redis"] = redis
                    redis_url = f"redis://127.0.0.1:{redis.port}"
                gateway_config(
                    variant,
                    upstream,
                    access_log=access_log,
                    limits=limits,
                    redis_url=redis_url,
                    metrics=metrics,
                )
                gw = stack.enter_context(gateway(variant, name))
                chat(gw.url(CHAT))
                step(f"non-streaming, {name}")
                nonstream[name] = rate(gw.url(CHAT), plan, {"sut": gw, **cpu}, NONSTREAM_64)
                if limits == "redis":
                    nonstream[name]["limiter"] = limiter_stats(gw)
        failover(plan, work, upstream, results)
        port = free_port()
        bare = [python, str(ROOT / "bench" / "bare_app.py"), "--port", str(port)]
        bare += ["--sample", str(work / "sample.json")]
        with running(
            "bare-app", bare, cpu=SUT_CPU, port=port, log=work / "bare-app.log", ready=answers("/")
        ) as app:
            step("bare app")
            nonstream["bare"] = rate(app.url(CHAT), plan, {"sut": app}, NONSTREAM_64)
            streams["bare"] = rate(app.url(CHAT), plan, {"sut": app}, STREAMS_16)
    nonstream["gateway_over_bare"] = round(
        nonstream["gateway"]["rate"] / nonstream["bare"]["rate"], 3
    )
    streams["gateway_over_bare"] = round(streams["gateway"]["rate"] / streams["bare"]["rate"], 3)


def measure_failover(plan: Plan, work: Path, results: Results) -> None:
    """``--failover``: section 6 alone."""
    with start_upstream(work) as upstream:
        failover(plan, work, upstream, results)


def step(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what} ...", file=sys.stderr, flush=True)


# --- report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    figure: str
    value: float
    unit: str
    op: str  # "<" or ">="
    limit: float

    @property
    def passed(self) -> bool:
        return self.value < self.limit if self.op == "<" else self.value >= self.limit


def failover_checks(results: Results) -> list[Check]:
    rows = results.get("failover_c64")
    if not rows:
        return []
    extra, dead = rows["healthy_over_single"], rows["one_dead_over_healthy"]
    return [
        Check("3 healthy targets / single base_url, req/s", extra["rate"], "x", ">=", 0.95),
        Check("1 of 3 targets dead / all healthy, req/s", dead["rate"], "x", ">=", 0.90),
        Check("1 of 3 targets dead / all healthy, p99", dead["p99"], "x", "<", 1.10),
    ]


def failover_report(results: Results) -> str:
    rows = results["failover_c64"]
    extra, dead = rows["healthy_over_single"], rows["one_dead_over_healthy"]
    rounds = results["plan"]["failover_rounds"]
    ejected = rows["three_targets_one_dead"].get("dead_target_ejected")
    lines = [
        f"Failover, non-streaming, 64 connections (median of {rounds} round(s), "
        f"{results['plan']['seconds']} s each after a {results['plan']['warmup']} s warm-up)",
        _table(
            [
                ["", "per s", "p50 ms", "p99 ms", "errors", "SUT", "upstream", "us/req"],
                *[
                    [
                        f"  {name}",
                        rows[name]["rate"],
                        f"{rows[name]['p50_ms']:.3f}",
                        f"{rows[name]['p99_ms']:.3f}",
                        rows[name]["errors"],
                        f"{rows[name].get('sut_cpu_pct', 0):.0f}%",
                        f"{rows[name].get('upstream_cpu_pct', 0):.0f}%",
                        rows[name].get("sut_cpu_us_per_request", "-"),
                    ]
                    for name in FAILOVER_VARIANTS
                ],
            ]
        ),
        f"Compared: 3 healthy targets / single base_url: req/s x{extra['rate']:.3f}, "
        f"p99 x{extra['p99']:.3f}; 1 of 3 dead / all healthy: req/s x{dead['rate']:.3f}, "
        f"p99 x{dead['p99']:.3f} (dead target ejected in the warm-up: "
        f"{'yes' if ejected else 'NO'})",
    ]
    return "\n".join(lines)


def check_table(found: Sequence[Check]) -> str:
    return _table(
        [
            ["Target", "value", "target", ""],
            *[
                [
                    c.figure,
                    f"{c.value:g} {c.unit}".strip(),
                    f"{c.op} {c.limit:g}",
                    "PASS" if c.passed else "MISS",
                ]
                for c in found
            ],
        ]
    )


def checks(results: Results) -> list[Check]:
    nonstream, latency = results["nonstream_c64"], results["latency_c1"]
    streams, paced, mem = results["streams_c16"], results["paced"], results["memory"]
    held = paced["gateway"]["held_back"] + paced["gateway"]["incomplete"]
    not_open = mem["streams"] - mem["max_open_at_once"]
    return [
        Check("non-streaming gateway / bare", nonstream["gateway_over_bare"], "x", ">=", 0.30),
        Check("added p50 latency, 1 connection", latency["added_p50_ms"], "ms", "<", 0.4),
        Check("50-chunk streams gateway / bare", streams["gateway_over_bare"], "x", ">=", 1.5),
        Check("paced: added time to first event p50", paced["added_ttfb_p50_ms"], "ms", "<", 1.5),
        Check("paced: added time to first event p99", paced["added_ttfb_p99_ms"], "ms", "<", 10),
        Check("paced: events held back or missing", held, "", "<", 1),
        Check("1,000 streams: ones never open at once", not_open, "", "<", 1),
        Check("1,000 streams: peak RSS", mem["peak_rss_mb"], "MB", "<", 150),
        *failover_checks(results),
    ]


def _table(rows: Sequence[Sequence[object]]) -> str:
    cells = [[f"{c:,.1f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row))
        for row in cells
    )


def report(results: Results) -> str:
    nonstream, latency, streams = (
        results["nonstream_c64"],
        results["latency_c1"],
        results["streams_c16"],
    )
    paced, mem = results["paced"], results["memory"]

    def cpu(figures: Results, name: str) -> str:
        value = figures.get(f"{name}_cpu_pct")
        return "-" if value is None else f"{value:.0f}%"

    def rows(section: Results, names: Sequence[tuple[str, str]]) -> list[list[object]]:
        return [
            [
                label,
                section[key]["rate"],
                f"{section[key]['p50_ms']:.3f}",
                f"{section[key]['p99_ms']:.3f}",
                section[key]["errors"],
                *(
                    cpu(section[key], name)
                    for name in ("sut", "upstream", "client", f"other{SUT_CPU}", f"other{LOAD_CPU}")
                ),
                section[key].get("sut_cpu_us_per_request", "-"),
            ]
            for label, key in names
            if key in section
        ]

    head = ["", "per s", "p50 ms", "p99 ms", "errors", "SUT", "upstream", "wrk"]
    head += [f"other{SUT_CPU}", f"other{LOAD_CPU}", "us/req"]
    out = [
        f"Gateway benchmark: system under test on CPU {SUT_CPU}; fake upstream, wrk and client "
        f"on CPU {LOAD_CPU}; {results['plan']['seconds']} s per wrk figure",
        "",
        _table(
            [
                ["Non-streaming, 64 connections (req/s)", *head[1:]],
                *rows(
                    nonstream,
                    [
                        ("  direct to fake upstream", "direct"),
                        ("  gateway (access log, limits)", "gateway"),
                        ("  gateway, access log off", "gateway_log_off"),
                        ("  gateway, no limits", "gateway_no_limits"),
                        ("  gateway, metrics off", "gateway_metrics_off"),
                        ("  gateway, limits in Redis", "gateway_redis_limits"),
                        ("  bare uvicorn app", "bare"),
                    ],
                ),
                ["1 connection (req/s)", *head[1:]],
                *rows(latency, [("  direct", "direct"), ("  gateway", "gateway")]),
                ["50-chunk streams, 16 connections (streams/s)", *head[1:]],
                *rows(
                    streams,
                    [
                        ("  direct to fake upstream", "direct"),
                        ("  gateway", "gateway"),
                        ("  bare app, 50 events itself", "bare"),
                    ],
                ),
            ]
        ),
        "",
        f"Added latency at 1 connection (wrk): p50 {latency['added_p50_ms']:+.3f} ms, "
        f"p99 {latency['added_p99_ms']:+.3f} ms",
        "",
        f"Paced streams: {paced['concurrency']} open, {paced['chunks']} pieces "
        f"{paced['interval_ms']} ms apart ({paced['events_per_stream']} events per stream); "
        "times in ms",
        _table(
            [
                [
                    "",
                    "streams",
                    "incomplete",
                    "TTFB p50",
                    "TTFB p99",
                    "late p99",
                    "late max",
                    "gap min",
                    "held back",
                    "SUT",
                    "upstream",
                    "client",
                ],
                *[
                    [
                        f"  {name}",
                        paced[name]["streams"],
                        paced[name]["incomplete"],
                        f"{paced[name]['ttfb_ms']['p50']:.3f}",
                        f"{paced[name]['ttfb_ms']['p99']:.3f}",
                        f"{paced[name]['lateness_ms']['p99']:.3f}",
                        f"{paced[name]['lateness_ms']['max']:.3f}",
                        f"{paced[name]['spaced_gap_ms']['min']:.3f}",
                        paced[name]["held_back"],
                        *(cpu(paced["cpu"][name], p) for p in ("sut", "upstream", "client")),
                    ]
                    for name in ("direct", "gateway")
                ],
            ]
        ),
        "",
        f"Memory: idle RSS {mem['idle_rss_mb']:.1f} MB (after the run "
        f"{mem.get('idle_rss_after_mb', 0):.1f} MB); {mem['max_open_at_once']:,} of "
        f"{mem['streams']:,} streams open at once, {mem['completed']:,} completed; peak RSS "
        f"{mem['peak_rss_mb']:.1f} MB ({mem['peak_from']})",
        "",
        *([failover_report(results), ""] if "failover_c64" in results else []),
        check_table(checks(results)),
    ]
    out.extend(f"\nNote: {note}" for note in notes(results))
    return "\n".join(out)


def notes(results: Results) -> list[str]:
    """What the CPU figures say about the rows: disturbed, or limited by the load side."""
    rows = [
        (f"{section} {name}", figures)
        for section in ("nonstream_c64", "latency_c1", "streams_c16")
        for name, figures in results[section].items()
        if isinstance(figures, dict)
    ]
    rows += [(f"paced {name}", figures) for name, figures in results["paced"]["cpu"].items()]

    def pct(figures: Results, *names: str) -> float:
        return sum(float(figures.get(f"{name}_cpu_pct", 0.0)) for name in names)

    other, load = f"other{SUT_CPU}", ("upstream", "client", "redis", f"other{LOAD_CPU}")
    others = (other, f"other{LOAD_CPU}")
    disturbed = [
        f"{row} {pct(f, others[0]):.0f}% + {pct(f, others[1]):.0f}%"
        for row, f in rows
        if pct(f, *others) > 10
    ]
    saturating = [
        (row, f)
        for row, f in rows
        if "sut_cpu_pct" in f and not row.startswith(("latency", "paced"))
    ]
    idle = [
        f"{row} ({pct(f, 'sut', other):.0f}%)" for row, f in saturating if pct(f, "sut", other) < 85
    ]
    full = [f"{row} ({pct(f, *load):.0f}%)" for row, f in saturating if pct(f, *load) >= 90]
    found = []
    if disturbed:
        found.append(
            f"other busy time (CPU {SUT_CPU} + CPU {LOAD_CPU}, percent of a core): "
            f"{'; '.join(disturbed)}. Something else ran on the machine: rerun to confirm."
        )
    if idle:
        found.append(
            f"CPU {SUT_CPU} had idle time: {'; '.join(idle)}: the load side on CPU {LOAD_CPU} "
            "(fake upstream + wrk) was the limit there, not the SUT."
        )
    if full:
        found.append(
            f"CPU {LOAD_CPU} was full: {'; '.join(full)}: the fake upstream and wrk bound these "
            "figures as much as the SUT does (compare the direct rows)."
        )
    return found


# --- entry point -----------------------------------------------------------------------------


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every ``running``: servers are stopped


def _git() -> Results:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter measurements (~50 s)")
    parser.add_argument(
        "--failover", action="store_true", help="only the failover rows (section 6)"
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    output = RESULTS.with_name("failover.json") if args.failover else RESULTS
    run = measure_failover if args.failover else measure
    signal.signal(signal.SIGTERM, _terminate)
    os.sched_setaffinity(0, {LOAD_CPU})  # wrk and the client inherit it
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # 1,000 streams: 2 fds each, x2
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 16384)), hard))
    results: Results = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "plan": vars(plan) | {"quick": args.quick, "failover_only": args.failover},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "git": _git(),
    }
    before = busy_seconds()
    time.sleep(1)
    busy = {cpu: round(100 * (t - before[cpu]), 1) for cpu, t in busy_seconds().items()}
    results["machine"]["busy_before_pct"] = busy
    if max(busy.values()) > 10:
        print(
            f"warning: the machine is busy before the run (percent per CPU: {busy})",
            file=sys.stderr,
        )
    began = time.monotonic()
    failed: str | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="gateway-bench-") as work:
            run(plan, Path(work), results)
    except (ServerFailed, RuntimeError) as exc:
        failed = str(exc)
        results["error"] = failed
    except KeyboardInterrupt:
        print("interrupted; every server is stopped", file=sys.stderr)
        return 130
    results["elapsed_s"] = round(time.monotonic() - began, 1)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    if failed is not None:
        print(f"benchmark failed: {failed}", file=sys.stderr)
        return 1
    if args.failover:
        found = failover_checks(results)
        print(f"{failover_report(results)}\n\n{check_table(found)}")
    else:
        found = checks(results)
        print(report(results))
    results["checks"] = [vars(c) | {"passed": c.passed} for c in found]
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{results['elapsed_s']} s; results in {output.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
