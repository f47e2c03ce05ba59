"""Python opcodes (or machine instructions) executed per request, in process: the deterministic
twin of ``bench/pipeline_cost.py`` (same gateway, same stand-in upstream, same variants).

Time per request on a shared machine moves by several percent between runs; the work the
gateway does for a request does not. By default this counts every opcode of every Python frame
(``sys.settrace`` with ``f_trace_opcodes``) over a batch of requests made after a warm-up, and
divides. ``--callgrind`` counts machine instructions instead, C included (orjson, the event
loop, the interpreter itself): ``pipeline_cost.py`` runs under ``valgrind --tool=callgrind``
once with no measured requests and once with ``--requests``, and the difference is divided by
them, so start-up and warm-up cancel out. It sets PYTHONHASHSEED=0: with random string hashes
the figures move by about 1% between runs, with a fixed seed they repeat to a few instructions.

    PYTHONPATH=. python bench/opcodes.py               # single, three, one_dead: opcodes/request
    PYTHONPATH=. python bench/opcodes.py single three  # some variants; the first is the baseline
    PYTHONPATH=. python bench/opcodes.py --top 25 single three
        # also the functions whose opcodes per request differ most from the baseline's
    PYTHONPATH=. python bench/opcodes.py --callgrind --requests 1000 single three  # ~2 min

Run it from the repository's root; ``PYTHONPATH=<tree>`` measures another tree, as with
``pipeline_cost.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline_cost import AUTH, BODY, UPSTREAMS, config, stand_in

import gateway
from tests.support.standin import call, in_process_gateway

WARMUP = 200

Where = tuple[str, int, str]  # file, first line, function


class OpcodeCounter:
    """Counts opcodes by function while installed (``sys.settrace``)."""

    def __init__(self) -> None:
        self.counts: Counter[Where] = Counter()

    def _global(self, frame: FrameType, event: str, arg: Any) -> Any:
        # Called for each new frame, and again each time a coroutine or generator resumes:
        # the frame keeps f_trace_opcodes, but needs its local trace function back.
        frame.f_trace_opcodes = True
        return self._local

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            code = frame.f_code
            self.counts[(code.co_filename, code.co_firstlineno, code.co_name)] += 1
        return self._local

    def __enter__(self) -> OpcodeCounter:
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)


async def count(variant: str, requests: int) -> Counter[Where]:
    upstream = stand_in(variant)
    async with in_process_gateway(config(UPSTREAMS[variant]), upstream) as gateway:
        for _ in range(WARMUP):  # caches filled; one_dead: the dead target is ejected
            await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=BODY)
        with OpcodeCounter() as counter:
            for _ in range(requests):
                await call(gateway, "POST", "/v1/chat/completions", headers=AUTH, body=BODY)
    return counter.counts


def instructions(variant: str, requests: int) -> float:
    """Machine instructions per request (callgrind), ``requests`` requests minus none."""

    def collected(count: int) -> int:
        env = {**os.environ, "BENCH_REQUESTS": str(count), "BENCH_REPEATS": "1"}
        env["PYTHONHASHSEED"] = "0"
        argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
        argv += [sys.executable, str(Path(__file__).with_name("pipeline_cost.py")), variant]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
        found = re.search(r"Collected : (\d+)", done.stderr)
        if found is None:
            raise RuntimeError(f"no instruction count from callgrind: {done.stderr[-500:]}")
        return int(found.group(1))

    return (collected(requests) - collected(0)) / requests


def _name(where: Where) -> str:
    """``gateway/...py:line function`` for the gateway's code, the file's name for the rest."""
    path, line, function = where
    tree = Path(gateway.__file__).resolve().parent.parent
    file = Path(path).resolve()
    short = file.relative_to(tree).as_posix() if file.is_relative_to(tree) else file.name
    return f"{short}:{line} {function}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", help=f"of {', '.join(UPSTREAMS)} (all)")
    parser.add_argument("--requests", type=int, default=100, help="requests counted (100)")
    parser.add_argument(
        "--top", type=int, default=0, help="list the N functions differing most from the first"
    )
    parser.add_argument(
        "--callgrind", action="store_true", help="machine instructions (valgrind) instead"
    )
    args = parser.parse_args(argv)
    variants: list[str] = args.variants or list(UPSTREAMS)
    unknown = [v for v in variants if v not in UPSTREAMS]
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(unknown)}")
    if args.callgrind:
        figures = {variant: instructions(variant, args.requests) for variant in variants}
        for variant, figure in figures.items():
            share = figure / figures[variants[0]] - 1
            print(f"{variant:10} {figure:11,.0f} instructions/request  {share:+7.2%}")
        return 0
    per_request: dict[str, dict[Where, float]] = {}
    for variant in variants:
        counts = asyncio.run(count(variant, args.requests))
        per_request[variant] = {k: v / args.requests for k, v in counts.items()}
    base_name = variants[0]
    base_total = sum(per_request[base_name].values())
    for variant in variants:
        total = sum(per_request[variant].values())
        print(f"{variant:10} {total:9,.1f} opcodes/request  {total / base_total - 1:+7.2%}")
    if args.top:
        base = per_request[base_name]
        for variant in variants[1:]:
            other = per_request[variant]
            diff = {k: other.get(k, 0.0) - base.get(k, 0.0) for k in {*base, *other}}
            print(f"\n{variant} - {base_name}, per request, by function:")
            for where, delta in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[: args.top]:
                print(f"  {delta:+8.1f}  {_name(where)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
