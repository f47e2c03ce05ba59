"""Benchmark: the same gateway with limits in Redis, once per Redis client, in interleaved pairs.

How to run (needs ``wrk``, ``taskset`` and ``redis-server`` on PATH, the gateway installed)::

    python bench/redis_clients.py              # 3 pairs, 10 s each: about 2 minutes
    python bench/redis_clients.py --pairs 5 --seconds 20

Each pair measures non-streaming requests/s at 64 connections (wrk, ``bench/post.lua``) through
``gateway serve`` with its limits in a local ``redis-server`` (``redis://``), first with the
client ``build_limiter`` picks for ``redis://`` ("default"), then with redis-py's asyncio client
("redis-py", chosen through the benchmark-only ``GATEWAY_BENCH_REDIS_CLIENT``). A fresh gateway
per measurement, warmed up first; one Redis and one fake upstream for the whole run. The
gateway is pinned to CPU 0; Redis, the fake upstream and wrk to CPU 1, as in ``bench/run.py``.

``--reference`` adds a third measurement to each round: the same gateway with its limits kept
in the process (no Redis), what a Redis client's cost is measured against.

Pairs, not one long run each: the machine's speed drifts over minutes, so each pair's ratio is
the figure that holds, and the spread of the ratios says how far to trust it. A measurement in
which the limiter degraded (a Redis error, a timeout, the breaker) is reported as such: it did
not measure the client. Results go to ``bench/results/redis_clients.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from run import (
    CHAT,
    LOAD_CPU,
    NONSTREAM_64,
    RESULTS,
    Plan,
    chat,
    gateway_config,
    limiter_stats,
    rate,
    start_gateway,
    start_redis,
    start_upstream,
    step,
)

from gateway.limits.redis_limiter import CLIENT_OVERRIDE_ENV

CLIENTS = ("default", "redis-py")
LOCAL = "in-process limits"
OUTPUT = RESULTS.parent / "redis_clients.json"


def measure(pairs: int, plan: Plan, work: Path, reference: bool) -> list[dict[str, Any]]:
    rounds: list[dict[str, Any]] = []
    with start_upstream(work) as upstream, start_redis(work) as redis:
        config, local = work / "gateway.yaml", work / "gateway-local.yaml"
        url = f"redis://127.0.0.1:{redis.port}"
        gateway_config(config, upstream, access_log=True, limits="redis", redis_url=url)
        gateway_config(local, upstream, access_log=True, limits="local")
        runs = [(client, config) for client in CLIENTS]
        runs += [(LOCAL, local)] if reference else []
        for number in range(1, pairs + 1):
            figures: dict[str, Any] = {}
            for name, path in runs:
                env = {CLIENT_OVERRIDE_ENV: name}
                with start_gateway(path, f"gateway-{name}", work, env) as gateway:
                    chat(gateway.url(CHAT))  # connected, script loaded
                    step(f"pair {number}/{pairs}: {name}")
                    cpu = {"sut": gateway, "upstream": upstream, "redis": redis}
                    result = rate(gateway.url(CHAT), plan, cpu, NONSTREAM_64)
                    result["limiter"] = limiter_stats(gateway)
                figures[name] = result
            rounds.append(figures)
    return rounds


def report(rounds: Sequence[dict[str, Any]]) -> str:
    lines = [
        "Non-streaming req/s at 64 connections, limits in Redis (redis://), gateway on CPU 0, "
        f"Redis + fake upstream + wrk on CPU {LOAD_CPU}",
        f"{'pair':<6}{'default':>10}{'redis-py':>10}{'ratio':>8}"
        f"{'us/req default':>16}{'us/req redis-py':>17}  degraded",
    ]
    ratios = []
    for number, figures in enumerate(rounds, 1):
        a, b = (figures[c] for c in CLIENTS)
        ratio = a["rate"] / b["rate"] if b["rate"] else 0.0
        ratios.append(ratio)
        degraded = [c for c in CLIENTS if figures[c]["limiter"].get("degraded_decisions")]
        disturbed = max(f[key] for f in figures.values() for key in f if key.startswith("other"))
        local = figures.get(LOCAL)
        lines.append(
            f"{number:<6}{a['rate']:>10,.0f}{b['rate']:>10,.0f}{ratio:>8.3f}"
            f"{a.get('sut_cpu_us_per_request', 0):>16}{b.get('sut_cpu_us_per_request', 0):>17}"
            f"  {', '.join(degraded) or 'none'}; other CPU up to {disturbed:.0f}%"
            + (
                ""
                if local is None
                else f"; in-process limits {local['rate']:,.0f} "
                f"({local.get('sut_cpu_us_per_request', 0)} us/req)"
            )
        )
    medians = [statistics.median(f[c]["rate"] for f in rounds) for c in CLIENTS]
    lines.append(
        f"median: default {medians[0]:,.0f}, redis-py {medians[1]:,.0f}; default / redis-py "
        f"per pair {min(ratios):.3f}-{max(ratios):.3f} (median {statistics.median(ratios):.3f})"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="interleaved pairs (default 3)")
    parser.add_argument("--seconds", type=int, default=10, help="each measurement (default 10)")
    parser.add_argument(
        "--reference", action="store_true", help="also measure in-process limits in each round"
    )
    args = parser.parse_args(argv)
    plan = Plan(
        seconds=args.seconds, warmup=2, paced_seconds=0.0, variants=False, failover_rounds=0
    )
    os.sched_setaffinity(0, {LOAD_CPU})  # wrk inherits it
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gateway-bench-redis-") as work:
        rounds = measure(args.pairs, plan, Path(work), args.reference)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(
        json.dumps({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pairs": rounds}, indent=2)
        + "\n"
    )
    print(report(rounds))
    print(f"\n{time.monotonic() - began:.0f} s; results in {OUTPUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
