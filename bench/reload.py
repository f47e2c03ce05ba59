"""What a big reload costs requests in flight (not a test).

How to run (from the repository root; needs ``wrk`` and ``taskset``)::

    python bench/reload.py                  # this checkout
    python bench/reload.py --source DIR     # another checkout, for a before/after

The gateway (pinned to CPU 0) serves a config of 1,000 routes and 10,000 keys
(``tests/config/bigconfig.py``) plus one route to the fake upstream (CPU 1). wrk sends a steady
load (16 connections, 8 s) twice: once undisturbed, once while the config file is rewritten
(one key renamed) three times, 2 s apart, each picked up by the file watcher. It prints p50,
p99 and max latency and requests/s of both runs, and how long each reload took by the log.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from load import wrk  # noqa: E402
from procs import free_port, running  # noqa: E402

from gateway.auth import hash_key  # noqa: E402
from tests.config.bigconfig import big_config  # noqa: E402

KEY = "sk-bench-reload"


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def config_text(upstream_port: int, generation: int) -> str:
    text = big_config()
    # The route and key the load uses, first so that they win over nothing they overlap.
    text = text.replace(
        "routes:\n",
        "routes:\n  - {name: bench, path: /v1/chat/completions, upstream: fake}\n",
        1,
    )
    text = text.replace(
        "upstreams:\n",
        f"upstreams:\n  fake: {{base_url: 'http://127.0.0.1:{upstream_port}/v1'}}\n",
        1,
    )
    text = text.replace(
        "keys:\n",
        f"keys:\n  - {{name: bench-{generation}, hash: '{hash_key(KEY)}', limits: {{}}}}\n",
        1,
    )
    return (
        "server:\n  reload_interval: 0.5\n  access_log: false\nallow_unlisted_models: true\n" + text
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=ROOT, help="checkout to run")
    args = parser.parse_args()
    source = args.source.resolve()
    with tempfile.TemporaryDirectory(prefix="bench-reload-") as tmp:
        work = Path(tmp)
        upstream_port, gateway_port = free_port(), free_port()
        config = work / "gateway.yaml"
        config.write_text(config_text(upstream_port, 0))
        env = {**os.environ, "PYTHONPATH": str(source)}
        fake = [sys.executable, "-m", "tests.support.fakeupstream", "--port", str(upstream_port)]
        gateway = [
            *(sys.executable, "-m", "gateway", "serve", "--config", str(config)),
            *("--port", str(gateway_port), "--log-level", "info"),
        ]
        with (
            running(
                "fake",
                fake,
                cpu=1,
                port=upstream_port,
                log=work / "fake.log",
                ready=lambda s: answers(s.url("/v1/models")),
                cwd=ROOT,
            ),
            running(
                "gateway",
                gateway,
                cpu=0,
                port=gateway_port,
                log=work / "gateway.log",
                ready=lambda s: answers(s.url("/healthz")),
                cwd=source,
                env=env,
                timeout=120,
            ) as server,
        ):
            url = server.url("/v1/chat/completions")
            wrk(url, connections=16, seconds=2, key=KEY)  # warm up
            quiet = wrk(url, connections=16, seconds=8, key=KEY)

            def rewrite() -> None:
                for generation in (1, 2, 3):
                    time.sleep(2)
                    config.write_text(config_text(upstream_port, generation))

            writer = threading.Thread(target=rewrite)
            writer.start()
            busy = wrk(url, connections=16, seconds=8, key=KEY)
            writer.join()
            time.sleep(1)
            log = (work / "gateway.log").read_text(errors="replace")
        reloads = log.count("config reloaded")
        print(f"gateway from {source}")
        for name, result in (("steady", quiet), ("3 reloads", busy)):
            print(
                f"  {name:10} {result.requests / result.seconds:8.0f} req/s  p50 "
                f"{result.p50_ms:6.2f} ms  p99 {result.p99_ms:7.2f} ms  max "
                f"{result.max_ms:7.2f} ms  errors {result.errors}"
            )
        print(f"  reloads applied: {reloads} of 3")


if __name__ == "__main__":
    main()
