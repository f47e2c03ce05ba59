"""Reading what ``deploy/`` ships: the Kubernetes manifests, the Compose file, the Dockerfile, and
every gateway config embedded in any of them, the way an operator fills them in."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.auth import hash_key, new_key

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
PLACEHOLDER = "REPLACE_WITH_OUTPUT_OF_gateway_keys_new"

# ${NAME} (required) or ${NAME:-default} (optional), as gateway/config/environment.py reads them.
_REFERENCE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")


def fill_in_a_key(text: str) -> str:
    """What the admin does before deploying: paste the hash 'gateway keys new NAME' printed."""
    assert text.count(PLACEHOLDER) == 1
    return text.replace(PLACEHOLDER, hash_key(new_key()))


def _strings(data: object) -> Iterator[str]:
    if isinstance(data, str):
        yield data
    elif isinstance(data, dict):
        for value in data.values():
            yield from _strings(value)
    elif isinstance(data, list):
        for item in data:
            yield from _strings(item)


def required_variables(config_text: str) -> set[str]:
    """The environment variables a gateway config's values name without a default (comments
    may mention ${NAME} too: they are not read)."""
    return {
        name
        for value in _strings(yaml.safe_load(config_text))
        for name, default in _REFERENCE.findall(value)
        if not default
    }


# --- Kubernetes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    file: Path
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        kind: str = self.doc["kind"]
        return kind

    @property
    def id(self) -> str:
        return f"{self.file.name}:{self.kind}"


def manifests() -> list[Manifest]:
    """Every document of every file in deploy/kubernetes/."""
    found = []
    for file in sorted(KUBERNETES.glob("*.y*ml")):
        for doc in yaml.safe_load_all(file.read_text()):
            if doc is not None:
                found.append(Manifest(file, doc))
    return found


def documents() -> dict[str, Any]:
    """The manifests by kind (each kind once)."""
    by_kind: dict[str, Any] = {}
    for manifest in manifests():
        assert manifest.kind not in by_kind, f"two {manifest.kind} manifests"
        by_kind[manifest.kind] = manifest.doc
    return by_kind


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = documents()["Deployment"]["spec"]["template"]["spec"]
    return spec


def gateway_container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


# --- Compose --------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


def compose_config_file(name: str) -> Path:
    """The file behind a top-level Compose ``configs`` entry."""
    file: str = compose()["configs"][name]["file"]
    return (COMPOSE_DIR / file).resolve()


def compose_mounted_config(service: str, target: str) -> Path:
    """The file a Compose service sees at ``target`` (through ``configs``)."""
    for entry in compose()["services"][service].get("configs", []):
        if entry["target"] == target:
            return compose_config_file(entry["source"])
    raise AssertionError(f"{service} has no config at {target}")


# --- Dockerfile -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    stage: int  # 0 for the first FROM's stage

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form CMD/ENTRYPOINT (after any --options)."""
        text = self.arguments
        while text.startswith("--"):
            text = text.split(maxsplit=1)[1]
        text = text.removeprefix("CMD").strip()
        value = json.loads(text)
        assert isinstance(value, list), f"{self.keyword} is not in exec form: {self.arguments}"
        return [str(item) for item in value]


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue  # Docker drops comment lines inside a continued instruction too
        if stripped.endswith("\\"):
            pending += stripped.removesuffix("\\").strip() + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(keyword.upper(), arguments.strip(), stage))
    return instructions


def final_stage() -> list[Instruction]:
    instructions = dockerfile()
    last = max(instruction.stage for instruction in instructions)
    return [instruction for instruction in instructions if instruction.stage == last]


def one(instructions: Sequence[Instruction], keyword: str) -> Instruction:
    found = [instruction for instruction in instructions if instruction.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


# --- The gateway's command line and its shutdown budget ------------------------------------


def option(args: Sequence[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in ``args``, if given."""
    for index, arg in enumerate(args):
        if arg == name:
            return args[index + 1]
        if arg.startswith(name + "="):
            return arg.partition("=")[2]
    return None


def shutdown_seconds(config_text: str, args: Sequence[str]) -> float:
    """How long ``gateway serve ARGS`` with this config may take to exit after SIGTERM: the
    drain delay plus the grace period for open requests (``--drain-delay`` and
    ``--graceful-timeout`` override the config's). The shipped configs set both explicitly
    (tests/deploy/test_gateway_configs.py)."""
    server = yaml.safe_load(config_text).get("server") or {}
    total = 0.0
    for setting in ("drain_delay", "graceful_timeout"):
        override = option(args, "--" + setting.replace("_", "-"))
        total += float(server[setting] if override is None else override)
    return total


def serve_args(command: Sequence[str]) -> list[str]:
    """``gateway serve ...`` from a container's command, checked to be that command."""
    assert list(command[:2]) == ["gateway", "serve"], shlex.join(command)
    return list(command[2:])


# --- Every gateway config embedded anywhere in deploy/ -------------------------------------


@dataclass(frozen=True)
class EmbeddedConfig:
    where: str
    text: str


def _is_gateway_config(data: object) -> bool:
    return isinstance(data, dict) and "routes" in data and "upstreams" in data


def embedded_configs() -> Iterator[EmbeddedConfig]:
    """Each gateway config in deploy/: a YAML file that is one, a ConfigMap value, or the inline
    ``content`` of a Compose config."""
    for file in sorted(DEPLOY.rglob("*.y*ml")):
        relative = file.relative_to(ROOT)
        text = file.read_text()
        for doc in yaml.safe_load_all(text):
            if _is_gateway_config(doc):
                yield EmbeddedConfig(str(relative), text)
            elif isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
                for key, value in (doc.get("data") or {}).items():
                    if _is_gateway_config(yaml.safe_load(value)):
                        name = doc["metadata"]["name"]
                        yield EmbeddedConfig(f"{relative}: ConfigMap {name} {key}", value)
            elif isinstance(doc, dict) and "services" in doc:
                for name, entry in (doc.get("configs") or {}).items():
                    content = entry.get("content")
                    if content is not None and _is_gateway_config(yaml.safe_load(content)):
                        yield EmbeddedConfig(f"{relative}: configs {name}", content)
