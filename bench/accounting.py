"""What usage accounting and budgets cost per request, in process, with and without Redis.

The whole pipeline (lifecycle, admission, failover, relay, settlement) against a stand-in
upstream, one request at a time, best of several repeats (``bench/pipeline_cost.py`` says why
in process). Two times per request: until the response's last byte was sent (what the client
waits for: admission is on this path) and until the request's task returned (settlement, after
the response, included). With Redis (a redis-server this script starts, the lean client), the
Redis round trips (script calls) per request are counted from ``INFO commandstats``.

    python bench/accounting.py                          # this tree
    PYTHONPATH=<other tree> python bench/accounting.py  # another tree (git archive HEAD)
    python bench/accounting.py --opcodes                # Python opcodes per request instead

Times on a busy two-core machine move by 10-20% between runs; ``--opcodes`` counts the Python
opcodes one request executes (``sys.settrace`` with opcode events, 100 requests, the local
store), which no other load changes: the figure to compare two trees by.

Variants, each a key of its own: ``plain`` (no limits), ``limits`` (requests and tokens per
minute), ``budget`` (limits and a daily budget, a priced model); and per variant ``usage on`` (the
default) and ``usage off`` (``usage: {enabled: false}``). A tree without accounting runs ``usage
off`` rows only, its config having no such section.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import MutableMapping
from typing import Any

import orjson
import redis

from gateway.app import Gateway
from gateway.auth import hash_key
from gateway.config.loader import parse_config_text
from tests.support.standin import StandInUpstream, json_answer

REQUESTS = int(os.environ.get("BENCH_REQUESTS", "2000"))
# BENCH_METRICS=1: with the metrics on (the default in a config; they read every response's usage
# too, so the tap is then paid for either way).
METRICS = os.environ.get("BENCH_METRICS") == "1"
REPEATS = int(os.environ.get("BENCH_REPEATS", "5"))
KEYS = {
    "plain": "",
    "limits": "limits: {requests_per_minute: 100000000, tokens_per_minute: 1000000000}",
    "budget": (
        "limits: {requests_per_minute: 100000000, tokens_per_minute: 1000000000,"
        " budget: {usd_per_day: 1000000}}"
    ),
}
BODY = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
USAGE = {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}
ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [], "usage": USAGE}


def secret(variant: str) -> str:
    return f"sk-gw-bench-accounting-{variant}"


def config(redis_url: str | None, usage: bool | None) -> str:
    keys = "".join(
        f"  - {{name: {name}, hash: {hash_key(secret(name))}"
        + (f", {limits}" if limits else "")
        + "}\n"
        for name, limits in KEYS.items()
        if usage is not None or name != "budget"
    )
    text = f"""
server: {{access_log: false}}
metrics: {{enabled: {"true" if METRICS else "false"}}}
upstreams:
  main: {{base_url: "http://a.test/v1"}}
routes:
  - {{name: chat, path: /v1/chat/completions, upstream: main}}
allow_unlisted_models: true
keys:
{keys}"""
    if redis_url is not None:
        text += f"redis: {{url: {redis_url}, timeout_ms: 1000}}\n"
    if usage is not None:
        text += f"usage: {{enabled: {'true' if usage else 'false'}}}\n"
        text += "prices: {models: {gpt-4o: {input: 2.5, output: 10}}}\n"
    return text


async def one(app: Gateway, variant: str) -> tuple[float, float]:
    """One request: seconds until its response's last byte was sent, and until it returned."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"gateway.test"),
            (b"authorization", f"Bearer {secret(variant)}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }
    sent = False
    answered = 0.0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal answered
        if message["type"] == "http.response.start":
            assert message["status"] == 200, message
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            answered = time.perf_counter()

    started = time.perf_counter()
    await app(scope, receive, send)
    return answered - started, time.perf_counter() - started


async def measure(redis_url: str | None, usage: bool | None, variant: str) -> tuple[float, float]:
    upstream = StandInUpstream(lambda request: json_answer(ANSWER))
    app = Gateway(
        parse_config_text(config(redis_url, usage), env={}), client_factory=upstream.factory
    )
    await app.startup()
    best = (float("inf"), float("inf"))
    try:
        for _ in range(200):
            await one(app, variant)
        for _ in range(REPEATS):
            upstream.requests.clear()
            upstream.responses.clear()
            answered = total = 0.0
            for _ in range(REQUESTS):
                a, t = await one(app, variant)
                answered += a
                total += t
            if total < best[1]:
                best = (answered / REQUESTS, total / REQUESTS)
    finally:
        await app.shutdown()
    return best[0] * 1e6, best[1] * 1e6


async def opcodes(usage: bool | None, variant: str, requests: int = 100) -> float:
    """Python opcodes per request, the local store (deterministic: no sockets, no clock waits)."""
    upstream = StandInUpstream(lambda request: json_answer(ANSWER))
    app = Gateway(parse_config_text(config(None, usage), env={}), client_factory=upstream.factory)
    await app.startup()
    count = 0

    def trace(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        frame.f_trace_opcodes = True
        if event == "opcode":
            count += 1
        return trace

    try:
        for _ in range(200):
            await one(app, variant)
        sys.settrace(trace)
        try:
            for _ in range(requests):
                await one(app, variant)
        finally:
            sys.settrace(None)
    finally:
        await app.shutdown()
    return count / requests


def round_trips(client: redis.Redis) -> int:
    """Script calls Redis has run: the limiter's round trips (the commands inside a script are
    counted apart)."""
    stats = client.info("commandstats")
    return sum(
        int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval")
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def main() -> int:
    try:
        parse_config_text(config(None, True), env={})
        usages: list[bool | None] = [True, False]
    except Exception:  # a tree without accounting
        usages = [None]
    if "--opcodes" in sys.argv[1:]:
        print(f"{'usage':5} {'key':7} {'opcodes/request':>16}")
        for usage in usages:
            for variant in KEYS:
                if usage is None and variant == "budget":
                    continue
                label = {True: "on", False: "off", None: "-"}[usage]
                print(f"{label:5} {variant:7} {asyncio.run(opcodes(usage, variant)):16.0f}")
        return 0
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="bench-accounting-")
    process = subprocess.Popen(
        [server, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        head = f"{'store':6} {'usage':5} {'key':7} {'response µs':>12} {'returned µs':>12}"
        print(head + f" {'calls/req':>9}")
        for store in ("local", "redis"):
            url = f"redis://127.0.0.1:{port}" if store == "redis" else None
            for usage in usages:
                for variant in KEYS:
                    if usage is None and variant == "budget":
                        continue
                    before = round_trips(client)
                    answered, total = asyncio.run(measure(url, usage, variant))
                    per = (round_trips(client) - before) / (REPEATS * REQUESTS + 200)
                    label = {True: "on", False: "off", None: "-"}[usage]
                    cmds = f"{per:9.2f}" if store == "redis" else f"{'':9}"
                    print(f"{store:6} {label:5} {variant:7} {answered:12.1f} {total:12.1f} {cmds}")
        client.close()
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
