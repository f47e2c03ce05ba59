"""The admin's tools: gateway check, keys, schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.auth import hash_key
from gateway.cli import demo_key_refusal, main
from gateway.config.loader import load_config, parse_config_text
from gateway.config.model import GatewayConfig
from tests.support.ports import free_port

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


@pytest.mark.parametrize(
    ("name", "team"),
    [
        ("alice", None),
        ("yes", "no"),  # YAML 1.1 booleans
        ("on", "off"),
        ("null", None),
        ("007", "1.5"),  # numbers
        ("0x1F", "1e3"),
        ("2026-01-01", None),  # a date
        ("a:b", "x.y"),
    ],
)
def test_keys_new_prints_yaml_the_loader_reads_back_as_the_same_names(
    name: str, team: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "new", name, *(["--team", team] if team else [])]) == 0
    out = capsys.readouterr().out.splitlines()
    key, entry = out[0], "\n".join(out[1:])
    config = parse_config_text("keys:\n" + entry + "\n")
    (loaded,) = config.keys
    assert (loaded.name, loaded.team, loaded.hash) == (name, team, hash_key(key))


@pytest.mark.parametrize("name", ["bad name", "~", "_under", "x" * 129, "caf\u00e9"])
def test_keys_new_refuses_names_the_config_refuses(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "new", name]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # no key is made for an entry that could not be used
    assert captured.err.startswith("name: ")


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


def test_check_never_prints_a_secret_with_a_trailing_newline_used_in_another_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # As exported by OPENAI_API_KEY=$(cat key.txt): the model strips the newline, so the
    # stripped key is what an error about another field would quote.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-abc123secret\n")
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "upstreams:\n"
        '  openai: {base_url: "https://api.openai.com/v1", auth: {key: "${OPENAI_API_KEY}"}}\n'
        "routes:\n"
        '  - {name: chat, path: /v1/chat/completions, upstream: "${OPENAI_API_KEY}"}\n'
    )
    assert main(["check", str(config)]) == 1
    captured = capsys.readouterr()
    assert "sk-abc123secret" not in captured.out + captured.err
    assert f"{config}:4: routes[0].upstream: unknown upstream '${{OPENAI_API_KEY}}'" in captured.err


def example_config() -> GatewayConfig:
    return load_config(ROOT / "config/gateway.yaml", env={})


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.1.2.3", "gateway.internal"])
def test_demo_key_is_refused_on_an_address_others_can_reach(host: str) -> None:
    refusal = demo_key_refusal(example_config(), host, demo=False)
    assert refusal is not None
    assert "'demo' is the published demo key 'sk-gw-demo'" in refusal
    assert "gateway keys new NAME" in refusal
    assert "--demo" in refusal
    assert "\n" not in refusal


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"])
def test_demo_key_is_allowed_on_loopback_addresses(host: str) -> None:
    assert demo_key_refusal(example_config(), host, demo=False) is None


def test_demo_flag_serves_the_demo_key_on_any_address() -> None:
    assert demo_key_refusal(example_config(), "0.0.0.0", demo=True) is None


def test_a_config_without_the_demo_key_may_listen_anywhere() -> None:
    config = example_config()
    real = config.keys[0].model_copy(update={"hash": hash_key("sk-gw-someone-else")})
    assert demo_key_refusal(config.model_copy(update={"keys": (real,)}), "0.0.0.0", False) is None


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--port", str(free_port()), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_serve_refuses_the_demo_key_on_a_public_host_flag_in_one_line_without_starting() -> None:
    config = str(ROOT / "config/gateway.yaml")
    result = serve("--config", config, "--host", "0.0.0.0")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"{config}: refusing to listen on '0.0.0.0': key 'demo'")


def test_serve_refuses_the_demo_key_on_a_public_server_host(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    text = (ROOT / "config/gateway.yaml").read_text()
    config.write_text(text.replace("host: 127.0.0.1", "host: 0.0.0.0", 1))
    result = serve("--config", str(config))
    assert result.returncode == 1
    assert "refusing to listen on '0.0.0.0'" in result.stderr


def test_check_and_serve_report_an_unexpected_loader_failure_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The loader raises ValueError from realpath for a NUL in a path: not a ConfigError.
    config = tmp_path / "nul.yaml"
    config.write_text('include: ["a\\0b.yaml"]\n')
    expected = f"{config}: cannot load: ValueError: embedded null byte"
    assert main(["check", str(config)]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [expected]
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [expected]
