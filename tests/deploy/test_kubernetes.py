"""The Kubernetes manifest and the container image serve what the gateway really answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gateway.app import OWN_PATHS
from gateway.auth import hash_key, new_key
from gateway.config.loader import parse_config_text

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PLACEHOLDER = "REPLACE_WITH_OUTPUT_OF_gateway_keys_new"


def documents() -> dict[str, Any]:
    text = (DEPLOY / "kubernetes/gateway.yaml").read_text()
    return {doc["kind"]: doc for doc in yaml.safe_load_all(text)}


def fill_in_a_key(text: str) -> str:
    """What the admin does before deploying: paste the hash 'gateway keys new NAME' printed."""
    assert text.count(PLACEHOLDER) == 1
    return text.replace(PLACEHOLDER, hash_key(new_key()))


def test_configmap_holds_a_valid_gateway_config_once_a_key_is_filled_in() -> None:
    embedded = documents()["ConfigMap"]["data"]["gateway.yaml"]
    env = {"REDIS_URL": "redis://redis:6379/0", "OPENAI_API_KEY": "sk-test"}
    config = parse_config_text(fill_in_a_key(embedded), "configmap:gateway.yaml", env)
    assert config.redis.url == "redis://redis:6379/0"
    assert config.server.port == 8080


def test_probes_and_ports_match_the_gateway() -> None:
    container = documents()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] in OWN_PATHS
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["ports"][0]["containerPort"] == 8080
    args = container["args"]
    assert args[args.index("--port") + 1] == "8080"
    assert args[args.index("--config") + 1].startswith(
        documents()["Deployment"]["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0][
            "mountPath"
        ]
    )


def test_dockerfile_serves_the_same_port_and_config_path() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "EXPOSE 8080" in dockerfile
    assert '"--config", "/etc/gateway/gateway.yaml"' in dockerfile
