"""The gateway's own CPU cost per request, in process: the whole pipeline (lifecycle, admission,
failover, relay) against a stand-in upstream behind the seam, no sockets.

A load test through sockets (``bench/run.py``) on a busy two-core machine varies by 10-30%
between runs; this measures only the gateway's Python, so the best of several repeats is
stable to a few percent and can compare two trees (run it with ``PYTHONPATH=<tree>``):

    python bench/pipeline_cost.py            # microseconds per request, best of 7 repeats

Variants: ``single`` (one base_url), ``three`` (three healthy targets), ``one_dead`` (three
targets, one refusing connections and already ejected). Trees that predate targets run
``single`` only.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import orjson

from gateway.auth import hash_key
from tests.support.standin import StandInUpstream, call, in_process_gateway, json_answer

KEY = "sk-gw-bench-pipeline"
AUTH = [("authorization", f"Bearer {KEY}"), ("content-type", "application/json")]
BODY = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "choices": []}
# BENCH_REQUESTS and BENCH_REPEATS change these; under ``valgrind --tool=callgrind`` run it with
# 0 and with N requests (one repeat): the difference of the two instruction counts over N is
# the instructions per request, which no other load on the machine changes.
REQUESTS = int(os.environ.get("BENCH_REQUESTS", "2000"))
REPEATS = int(os.environ.get("BENCH_REPEATS", "7"))

UPSTREAMS = {
    "single": '  main: {base_url: "http://a.test/v1"}\n',
    "three": (
        "  main:\n    targets:\n"
        '      - {name: a, base_url: "http://a.test/v1"}\n'
        '      - {name: b, base_url: "http://b.test/v1"}\n'
        '      - {name: c, base_url: "http://c.test/v1"}\n'
    ),
}
UPSTREAMS["one_dead"] = UPSTREAMS["three"] + "    outlier: {consecutive_failures: 1}\n"


def config(upstreams: str) -> str:
    return f"""
server: {{access_log: false}}
metrics: {{enabled: false}}
upstreams:
{upstreams}
routes:
  - {{name: chat, path: /v1/chat/completions, upstream: main}}
allow_unlisted_models: true
keys:
  - {{name: demo, hash: {hash_key(KEY)}}}
"""


def stand_in(variant: str) -> StandInUpstream:
    """The upstream of ``variant``: every target answers, but one_dead's ``c`` refuses."""
    answer = json_answer(ANSWER)
    if variant == "one_dead":
        from gateway.upstream.seam import UpstreamConnectError
        from tests.support.standin import Scripted

        refused = Scripted(fault=UpstreamConnectError("refused"))
        return StandInUpstream(lambda r: refused if "//c." in r.url else answer)
    return StandInUpstream(lambda r: answer)


async def measure(variant: str) -> float:
    upstream = stand_in(variant)
    best = float("inf")
    async with in_process_gateway(config(UPSTREAMS[variant]), upstream) as gateway:
        for _ in range(200):  # warm-up (and, one_dead: the dead target is ejected)
            await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=BODY)
        for _ in range(REPEATS):
            upstream.requests.clear()
            upstream.responses.clear()
            started = time.perf_counter()
            for _ in range(REQUESTS):
                await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=BODY)
            best = min(best, (time.perf_counter() - started) / max(REQUESTS, 1))
    return best * 1e6


def main() -> int:
    variants = sys.argv[1:] or ["single", "three", "one_dead"]
    for variant in variants:
        try:
            cost = asyncio.run(measure(variant))
        except Exception as exc:  # an older tree without targets
            print(f"{variant:10} n/a ({type(exc).__name__})")
            continue
        print(f"{variant:10} {cost:7.1f} us/request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
