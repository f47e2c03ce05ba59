"""The gateway's own log lines: text by default, one JSON object per line when asked."""

from __future__ import annotations

import logging
import sys
import time

import httpx
import orjson
import pytest

from gateway.observability.logs import JsonFormatter, logging_config
from tests.conftest import UPSTREAM_KEY, gateway_config
from tests.support.fakeupstream import FakeUpstream
from tests.support.gatewayproc import GatewayProcess


def test_a_json_line_has_time_level_logger_message_and_the_traceback() -> None:
    try:
        raise ValueError("broken")
    except ValueError:
        record = logging.getLogger("gateway.test").makeRecord(
            "gateway.test", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info()
        )
    line = orjson.loads(JsonFormatter().format(record))
    assert line["level"] == "error"
    assert line["logger"] == "gateway.test"
    assert line["message"] == "failed here"
    assert "ValueError: broken" in line["exc"]
    assert isinstance(line["ts"], float)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_level_applies_to_the_gateway_and_uvicorn_loggers(log_format: str) -> None:
    config = logging_config("warning", log_format)  # type: ignore[arg-type]
    assert config["loggers"]["gateway"]["level"] == "WARNING"
    assert config["loggers"]["uvicorn"]["level"] == "WARNING"


def test_with_log_format_json_every_line_the_gateway_writes_is_json(
    upstream: FakeUpstream,
) -> None:
    config = gateway_config(upstream.base_url).replace(
        "server:\n", "server:\n  log_format: json\n  log_level: debug\n", 1
    )
    with GatewayProcess(config, env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as process:
        assert httpx.get(process.url + "/v1/models").status_code == 401
        deadline = time.monotonic() + 5
        while '"request_id"' not in (logs := process.logs()):  # access lines are batched
            assert time.monotonic() < deadline
            time.sleep(0.05)
    lines = [line for line in logs.splitlines() if line.strip()]
    assert len(lines) >= 3  # uvicorn's start-up lines, the gateway's, the access line
    kinds = set()
    for line in lines:
        record = orjson.loads(line)
        kinds.add("access" if "request_id" in record else record["logger"].split(".")[0])
    assert {"access", "uvicorn"} <= kinds
