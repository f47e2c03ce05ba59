"""What request rules (a route's ``validate:``) cost per request, and what the alternatives would.

How to run (from the repository root; msgspec is measured when it is installed, it is not a
dependency)::

    python bench/validation.py            # about 5 s
    python bench/validation.py --quick    # about 1 s (noisier)
    taskset -c 1 python bench/validation.py   # pinned to one core, as the figures quoted in
                                              # gateway/policies/validation.py were taken

Figures, in µs per request (the best of several rounds, so the machine's noise is left out):

1. **The gateway's checks** (``gateway/policies/validation.py``) with the full rule set, on a
   typical chat body (10 messages, tools, stop, sampling parameters) and on one of 200
   messages, from the dict orjson parsed (admission parses the body once; the checks read it).
2. **The same rules as a pydantic model** (``model_validate`` on the dict, strict types, a model
   validator for what a type cannot say: the total of all messages' text) and as msgspec
   structs (``msgspec.convert`` on the dict, the same extra check). The model and the
   structs accept these bodies, as the gateway's checks do; neither gives OpenAI's ``param`` and
   ``code`` without a translation of its errors, which is not measured.
3. **A route without rules**: what admission adds to it, one attribute test
   (``route.rules is not None``), in nanoseconds.
4. **The whole pipeline in process** (``tests/support/standin.py``: admission, the relay, a
   stand-in upstream; access log off): a request to a route without rules and to one with the
   full rule set, for scale.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.auth import hash_key  # noqa: E402
from gateway.config.loader import parse_config_text  # noqa: E402
from gateway.config.request_rules import RequestRules, Shape  # noqa: E402
from gateway.policies.validation import compile_rules  # noqa: E402
from tests.support.standin import StandInUpstream, call, in_process_gateway, json_answer  # noqa: E402

KEY = "sk-bench-validation"
# The full rule set, with limits a deployment might set: every rule runs, and the bodies below
# keep them all.
FULL = {
    "max_messages": 500,
    "min_messages": 1,
    "roles": ["system", "developer", "user", "assistant", "tool"],
    "system_messages": True,
    "max_message_chars": 100_000,
    "max_total_chars": 1_000_000,
    "max_output_tokens": {"min": 1, "max": 4096},
    "temperature": {"min": 0, "max": 2},
    "top_p": {"min": 0, "max": 1},
    "max_stop": 4,
    "max_stop_chars": 100,
    "max_n": 4,
    "model_pattern": "gpt-4o(-mini)?(-[0-9-]+)?",
    "max_tools": 16,
}
TEXT = "Please summarise the following paragraph in two sentences. " * 4  # ~240 characters


def chat_body(messages: int) -> dict[str, Any]:
    history: list[dict[str, Any]] = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(messages - 1):
        if i % 2 == 0:
            history.append({"role": "user", "content": [{"type": "text", "text": TEXT}]})
        else:
            history.append({"role": "assistant", "content": TEXT})
    return {
        "model": "gpt-4o-mini",
        "messages": history,
        "max_tokens": 512,
        "temperature": 0.7,
        "top_p": 0.9,
        "stop": ["\n\n", "END"],
        "n": 1,
        "tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(3)],
    }


# --- pydantic: the same rules as a model ---------------------------------------------------------

_Role = Literal["system", "developer", "user", "assistant", "tool"]
_Tokens = Annotated[int, Field(strict=True, ge=1, le=4096)]
_Decimal = Annotated[float, Field(ge=0)]


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: Annotated[str, Field(strict=True)] | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: _Role
    content: Annotated[str, Field(strict=True, max_length=100_000)] | list[_Part] | None = None


class _Chat(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Annotated[
        str, Field(strict=True, max_length=256, pattern=r"^gpt-4o(-mini)?(-[0-9-]+)?$")
    ]
    messages: Annotated[list[_Message], Field(min_length=1, max_length=500)]
    max_tokens: _Tokens | None = None
    max_completion_tokens: _Tokens | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    stop: (
        Annotated[str, Field(strict=True, max_length=100)]
        | Annotated[list[Annotated[str, Field(strict=True, max_length=100)]], Field(max_length=4)]
        | None
    ) = None
    n: Annotated[int, Field(strict=True, le=4)] | None = None
    tools: Annotated[list[Any], Field(max_length=16)] | None = None
    functions: Annotated[list[Any], Field(max_length=16)] | None = None

    @model_validator(mode="after")
    def _text(self) -> _Chat:
        total = 0
        for message in self.messages:
            content = message.content
            if isinstance(content, list):
                length = sum(len(part.text) for part in content if part.text is not None)
                if length > 100_000:
                    raise ValueError("message too long")
            else:
                length = len(content or "")
            total += length
        if total > 1_000_000:
            raise ValueError("messages too long")
        return self


def pydantic_check(document: dict[str, Any]) -> None:
    _Chat.model_validate(document)


# --- msgspec, when installed: the same rules as structs -----------------------------------------


def msgspec_check() -> Callable[[dict[str, Any]], None] | None:
    try:
        msgspec: Any = importlib.import_module("msgspec")
    except ImportError:
        return None
    meta = msgspec.Meta
    text = Annotated[str, meta(max_length=100_000)]
    part = msgspec.defstruct("Part", [("type", str), ("text", str | None, None)])
    message = msgspec.defstruct(
        "Message",
        [("role", _Role), ("content", text | list[part] | None, None)],  # type: ignore[valid-type]
    )
    tokens = Annotated[int, meta(ge=1, le=4096)] | None
    stop = Annotated[str, meta(max_length=100)]
    chat = msgspec.defstruct(
        "Chat",
        [
            ("model", Annotated[str, meta(max_length=256, pattern=r"^gpt-4o(-mini)?(-[0-9-]+)?$")]),
            ("messages", Annotated[list[message], meta(min_length=1, max_length=500)]),  # type: ignore[valid-type]
            ("max_tokens", tokens, None),
            ("max_completion_tokens", tokens, None),
            ("temperature", Annotated[float, meta(ge=0, le=2)] | None, None),
            ("top_p", Annotated[float, meta(ge=0, le=1)] | None, None),
            ("stop", stop | Annotated[list[stop], meta(max_length=4)] | None, None),
            ("n", Annotated[int, meta(le=4)] | None, None),
            ("tools", Annotated[list[Any], meta(max_length=16)] | None, None),
            ("functions", Annotated[list[Any], meta(max_length=16)] | None, None),
        ],
        kw_only=True,
    )

    def check(document: dict[str, Any]) -> None:
        converted = msgspec.convert(document, chat)
        total = 0
        for m in converted.messages:
            content = m.content
            if isinstance(content, list):
                length = sum(len(p.text) for p in content if p.text is not None)
                if length > 100_000:
                    raise ValueError("message too long")
            else:
                length = len(content or "")
            total += length
        if total > 1_000_000:
            raise ValueError("messages too long")

    return check


# --- measurement -------------------------------------------------------------------------------


def best_us(function: Callable[[], object], rounds: int, per_round: int) -> float:
    """The best round's µs per call: the least disturbed by anything else on the machine."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(per_round):
            function()
        best = min(best, (time.perf_counter_ns() - start) / per_round / 1000)
    return best


def check_us(check: Callable[[Any], object], body: bytes, rounds: int, per_round: int) -> float:
    """µs per check of a document parsed just before, as in a request (a document checked over
    and over is faster: its strings' hashes are cached), less the parse."""
    parse = best_us(functools.partial(orjson.loads, body), rounds, per_round)
    both = best_us(lambda: check(orjson.loads(body)), rounds, per_round)
    return both - parse


def pipeline_us(rounds: int, per_round: int) -> tuple[float, float]:
    """µs per request through the in-process gateway: a route without rules, one with them."""
    rules = "\n".join(f"    {k}: {orjson.dumps(v).decode()}" for k, v in FULL.items())
    config = f"""
server: {{access_log: false}}
upstreams: {{main: {{base_url: "http://upstream.test/v1"}}}}
request_rules:
  full:
{rules}
routes:
  - {{name: open, path: /open/chat/completions, upstream: main, upstream_path: /chat/completions}}
  - {{name: checked, path: /v1/chat/completions, upstream: main, validate: full}}
allow_unlisted_models: true
keys: [{{name: bench, hash: {hash_key(KEY)}}}]
"""
    body = orjson.dumps(chat_body(10))
    headers = [("authorization", f"Bearer {KEY}"), ("content-type", "application/json")]
    upstream = StandInUpstream(lambda request: json_answer({"id": "x"}))

    async def measure() -> tuple[float, float]:
        async with in_process_gateway(config, upstream) as app:
            results = []
            for path in ("/open/chat/completions", "/v1/chat/completions"):
                best = float("inf")
                for _ in range(rounds):
                    start = time.perf_counter_ns()
                    for _ in range(per_round):
                        response = await call(app, "POST", path, headers=headers, body=body)
                        assert response.status == 200, response.body
                    best = min(best, (time.perf_counter_ns() - start) / per_round / 1000)
                    upstream.requests.clear()
                    upstream.responses.clear()
                results.append(best)
            return results[0], results[1]

    return asyncio.run(measure())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (noisier)")
    args = parser.parse_args()
    rounds, per_round = (5, 500) if args.quick else (15, 2000)

    rules = RequestRules.model_validate(FULL)
    validator = compile_rules(rules, Shape.CHAT, "bench")
    converted = msgspec_check()
    config = parse_config_text(
        "upstreams: {u: {base_url: 'http://u'}}\n"
        "routes: [{name: r, path: /v1/chat/completions, upstream: u}]\n",
        env={},
    )
    route = config.routes[0]

    print(f"{'body':<22}{'gateway checks':>16}{'pydantic':>12}{'msgspec':>12}   (µs/request)")
    for messages in (10, 200):
        body = orjson.dumps(chat_body(messages))
        document = orjson.loads(body)
        validator.check(document)  # all three accept the body
        pydantic_check(document)
        n = per_round if messages == 10 else max(per_round // 10, 50)
        ours = check_us(validator.check, body, rounds, n)
        theirs = check_us(pydantic_check, body, rounds, n)
        if converted is not None:
            converted(document)
            spec = f"{check_us(converted, body, rounds, n):>12.1f}"
        else:
            spec = f"{'(absent)':>12}"
        print(f"{f'chat, {messages} messages':<22}{ours:>16.1f}{theirs:>12.1f}{spec}")

    no_rules = best_us(lambda: route.rules is not None, rounds, per_round * 10)
    empty = best_us(lambda: None, rounds, per_round * 10)
    print(f"no rules: one attribute test, {max(no_rules - empty, 0.0) * 1000:.0f} ns")
    open_us, checked_us = pipeline_us(rounds, per_round // 4)
    print(
        f"pipeline in process, 10-message chat: no rules {open_us:.1f} µs, full rule set "
        f"{checked_us:.1f} µs per request"
    )


if __name__ == "__main__":
    main()
