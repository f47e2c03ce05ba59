"""The admin's tools: gateway check, keys, schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.auth import hash_key
from gateway.cli import main
from gateway.config.loader import load_config
from gateway.config.model import GatewayConfig

ROOT = Path(__file__).resolve().parent.parent


def test_check_prints_every_path_alias_deprecation_and_target(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check", str(ROOT / "config/gateway.yaml")]) == 0
    out = capsys.readouterr().out
    assert "OK" in out
    assert "/openai/v1/chat/completions" in out
    assert "deprecated since 2026-01-01; sunset 2027-06-30; successor /v1/chat/completions" in out
    assert "https://api.openai.com/v1/chat/completions" in out
    assert "fast -> openai:gpt-4o-mini" in out


def test_check_reports_every_error_with_file_line_and_key_path_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(
        "upstreams:\n  o: {base_url: 'ftp://x'}\nroutes:\n  - {name: a, path: nope, upstream: o}\n"
    )
    assert main(["check", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{config}:2: upstreams.o.base_url:" in err
    assert f"{config}:4: routes[0].path: must start with '/'" in err


def test_keys_new_prints_a_key_once_and_its_hash_entry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "new", "alice", "--team", "ml"]) == 0
    out = capsys.readouterr().out.splitlines()
    key = out[0]
    assert key.startswith("sk-gw-")
    entry = "\n".join(out[1:])
    assert f"hash: {hash_key(key)}" in entry
    assert "name: alice" in entry
    assert "team: ml" in entry


def test_committed_json_schema_is_current() -> None:
    committed = json.loads((ROOT / "config/gateway.schema.json").read_text())
    assert committed == GatewayConfig.model_json_schema(), (
        "run: gateway schema > config/gateway.schema.json"
    )


def test_example_config_loads_and_is_schema_valid() -> None:
    config = load_config(ROOT / "config/gateway.yaml", env={})
    assert config.upstreams["openai"].base_url == "https://api.openai.com/v1"
    assert config.keys[0].hash == hash_key("sk-gw-demo")


def test_serve_refuses_an_invalid_config_without_starting(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("routes: 3\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "routes" in result.stderr
