"""Nothing shipped accepts a published key: the deploy configs carry a placeholder that
``gateway check`` and ``gateway serve`` refuse, saying what to run, until an admin fills in a
hash of their own; and the README's demo key is refused wherever others could reach it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.auth import hash_key
from gateway.cli import DEMO_KEY, demo_key_refusal, main
from gateway.config.loader import parse_config_text
from tests.deploy.deployfiles import (
    COMPOSE_DIR,
    DEPLOY,
    PLACEHOLDER,
    documents,
    fill_in_a_key,
)

ENV = {"REDIS_URL": "redis://redis:6379/0", "OPENAI_API_KEY": "sk-test"}


def image_config() -> Path:
    """The file the Dockerfile copies to the config path the image serves."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    match = re.search(r"^COPY (\S+) /etc/gateway/gateway\.yaml$", dockerfile, re.MULTILINE)
    assert match is not None, "the Dockerfile copies a config to /etc/gateway/gateway.yaml"
    return DEPLOY.parent / match.group(1)


def shipped_configs(tmp_path: Path) -> dict[str, Path]:
    configmap = tmp_path / "configmap-gateway.yaml"
    configmap.write_text(documents()["ConfigMap"]["data"]["gateway.yaml"])
    return {
        "image": image_config(),
        "configmap": configmap,
        "compose": COMPOSE_DIR / "gateway.yaml",
    }


def test_no_deploy_file_holds_the_demo_key_hash() -> None:
    demo_hash = hash_key(DEMO_KEY).removeprefix("sha256:")
    holding = [
        str(path.relative_to(DEPLOY))
        for path in DEPLOY.rglob("*")
        if path.is_file() and demo_hash in path.read_text(errors="replace")
    ]
    assert holding == []
    assert PLACEHOLDER in image_config().read_text()


@pytest.mark.parametrize("shipped", ["image", "configmap", "compose"])
def test_shipped_config_fails_check_with_the_placeholder_line_and_what_to_run(
    shipped: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    path = shipped_configs(tmp_path)[shipped]
    line = path.read_text().splitlines().index(f"{' ' * 4}hash: {PLACEHOLDER}") + 1
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"{path}: 1 error(s)"
    assert err[1].startswith(f"  {path}:{line}: keys[0].hash: must be the key's hash")
    assert "run 'gateway keys new NAME'" in err[1]
    assert PLACEHOLDER not in err[1]  # a pasted key would be echoed the same way


@pytest.mark.parametrize("shipped", ["image", "configmap", "compose"])
def test_shipped_config_passes_check_and_may_listen_anywhere_once_a_real_hash_is_filled_in(
    shipped: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    filled = tmp_path / "filled.yaml"
    filled.write_text(fill_in_a_key(shipped_configs(tmp_path)[shipped].read_text()))
    assert main(["check", str(filled)]) == 0
    assert f"{filled}: OK" in capsys.readouterr().out
    config = parse_config_text(filled.read_text(), str(filled), ENV)
    assert demo_key_refusal(config, "0.0.0.0", demo=False) is None
    # As shipped, one key cannot hold the whole upstream pool.
    assert config.limits.default.max_concurrent is not None


def test_shipped_config_with_the_demo_key_pasted_in_is_refused_on_the_image_host() -> None:
    text = image_config().read_text().replace(PLACEHOLDER, hash_key(DEMO_KEY))
    config = parse_config_text(text, "image-gateway.yaml", ENV)
    assert demo_key_refusal(config, config.server.host, demo=False) is not None
