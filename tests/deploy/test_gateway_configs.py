"""Every gateway config embedded anywhere in deploy/ passes ``gateway check`` once an admin has
pasted a key hash over the placeholder (which, as shipped, ``gateway check`` refuses on purpose:
tests/deploy/test_shipped_keys.py) and the environment variables it names are set."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.cli import main
from tests.deploy.deployfiles import (
    EmbeddedConfig,
    embedded_configs,
    fill_in_a_key,
    required_variables,
)

CONFIGS = list(embedded_configs())
EXPECTED = {
    "deploy/gateway.yaml",
    "deploy/compose/gateway.yaml",
    "deploy/kubernetes/gateway.yaml: ConfigMap llm-gateway gateway.yaml",
}


def test_every_shipped_config_is_found() -> None:
    """The search below finds the configs we know of (and checks any added later too)."""
    assert {config.where for config in CONFIGS} >= EXPECTED


@pytest.mark.parametrize("config", CONFIGS, ids=lambda config: config.where)
def test_config_passes_gateway_check_once_a_key_is_filled_in(
    config: EmbeddedConfig,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in required_variables(config.text):
        monkeypatch.setenv(name, f"test-value-for-{name.lower()}")
    filled = tmp_path / "gateway.yaml"
    filled.write_text(fill_in_a_key(config.text))
    status = main(["check", str(filled)])
    captured = capsys.readouterr()
    assert status == 0, f"{config.where}:\n{captured.err}"
    assert f"{filled}: OK" in captured.out


@pytest.mark.parametrize("config", CONFIGS, ids=lambda config: config.where)
def test_config_sets_its_shutdown_timing_explicitly(config: EmbeddedConfig) -> None:
    """The container platform's grace period is set against these two numbers (the tests of
    each platform compare them), so they are written out rather than left to defaults."""
    server = yaml.safe_load(config.text)["server"]
    assert server["drain_delay"] > 0
    assert server["graceful_timeout"] > 0
    # In a container the gateway listens on every interface of its own network namespace.
    assert server["host"] == "0.0.0.0"
