"""The Kubernetes manifests are valid for the API server and serve what the gateway answers.

Every document is validated offline against the Kubernetes OpenAPI schemas that
kubernetes-validate bundles, strictly (an unknown or misspelled field is an error), for the
oldest and the newest Kubernetes version named below. The ServiceMonitor is a CRD of the
Prometheus Operator, whose schema no offline package ships: it is checked against the subset of
monitoring.coreos.com/v1 it uses, written out below, and against the Service it selects."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from gateway.app import LIVE_PATHS, READY_PATHS
from gateway.cli import parser
from gateway.config.checks import RESERVED_PATHS
from gateway.config.loader import parse_config_text
from tests.deploy.deployfiles import (
    Manifest,
    documents,
    fill_in_a_key,
    final_stage,
    gateway_container,
    manifests,
    one,
    option,
    pod_spec,
    required_variables,
    serve_args,
    shutdown_seconds,
)

# Pinned: the oldest Kubernetes release these manifests claim, and the newest one bundled.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
ENV = {"REDIS_URL": "redis://redis:6379/0", "OPENAI_API_KEY": "sk-test"}
METRICS_PATH = "/metrics"


def configmap_config() -> str:
    text: str = documents()["ConfigMap"]["data"]["gateway.yaml"]
    return text


def deployment_args() -> list[str]:
    return serve_args(gateway_container()["args"])


def container_port(name_or_number: str | int) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(name_or_number, int):
        return name_or_number
    ports = {port["name"]: port["containerPort"] for port in gateway_container()["ports"]}
    number: int = ports[name_or_number]
    return number


# --- Validity -------------------------------------------------------------------------------


def test_the_manifests_are_what_the_readme_lists() -> None:
    kinds = sorted(manifest.kind for manifest in manifests())
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "Secret",
            "Service",
            "ServiceMonitor",
        ]
    )


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    "manifest",
    [manifest for manifest in manifests() if manifest.kind != "ServiceMonitor"],
    ids=lambda manifest: manifest.id,
)
def test_manifest_is_valid_against_the_kubernetes_schema(manifest: Manifest, version: str) -> None:
    try:
        kubernetes_validate.validate(manifest.doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(part) for part in exc.path)
        pytest.fail(f"{manifest.id} (Kubernetes {version}) at {path}: {exc.message}")


def test_the_schema_check_would_catch_a_misspelled_field_or_a_wrong_type() -> None:
    """The validation above is not vacuous: strict mode refuses what the API server would."""
    misspelled = copy.deepcopy(documents()["Deployment"])
    spec = misspelled["spec"]["template"]["spec"]
    spec["terminationGracePeriod"] = spec.pop("terminationGracePeriodSeconds")
    wrong_type = copy.deepcopy(documents()["Deployment"])
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    for bad in (misspelled, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)


# The part of the Prometheus Operator's ServiceMonitor (monitoring.coreos.com/v1) this
# repository uses, with its field names and types; anything else is refused, so a misspelling
# fails here rather than being ignored by the operator.
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _LABELS},
    "additionalProperties": False,
}
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
SERVICEMONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "properties": {"matchLabels": _LABELS},
                    "additionalProperties": False,
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                        },
                        "additionalProperties": False,
                    },
                },
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}


def test_servicemonitor_matches_the_operator_fields_and_selects_the_gateway_service() -> None:
    monitor = documents()["ServiceMonitor"]
    jsonschema.validate(monitor, SERVICEMONITOR_SCHEMA)
    service = documents()["Service"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    service_ports = {port["name"]: port for port in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == METRICS_PATH
        port = service_ports[endpoint["port"]]
        assert container_port(port["targetPort"]) == int(option(deployment_args(), "--port") or 0)
        scrape_timeout = int(endpoint["scrapeTimeout"].removesuffix("s"))
        assert scrape_timeout <= int(endpoint["interval"].removesuffix("s"))


def test_metrics_path_is_the_gateways() -> None:
    # The gateway reserves /metrics for itself (no route may take it); the pod annotations point
    # there too. tests/deploy/test_served_endpoints.py GETs it from a running gateway.
    assert METRICS_PATH in RESERVED_PATHS
    annotations = documents()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == METRICS_PATH
    assert int(annotations["prometheus.io/port"]) == container_port("http")


# --- The gateway's config, command line and endpoints --------------------------------------


def test_configmap_holds_a_valid_gateway_config_once_a_key_is_filled_in() -> None:
    config = parse_config_text(fill_in_a_key(configmap_config()), "configmap:gateway.yaml", ENV)
    assert config.redis.url == "redis://redis:6379/0"
    assert config.server.port == 8080


def test_the_container_command_is_one_the_gateway_cli_accepts() -> None:
    container = gateway_container()
    # `args` only: the image's ENTRYPOINT (tini as PID 1, which passes SIGTERM on) stays.
    assert "command" not in container
    args = parser().parse_args(["serve", *deployment_args()])
    assert args.workers >= 1
    assert args.host == "0.0.0.0"


def test_probes_and_ports_match_the_gateway() -> None:
    container = gateway_container()
    args = deployment_args()
    assert container["livenessProbe"]["httpGet"]["path"] in LIVE_PATHS
    assert container["readinessProbe"]["httpGet"]["path"] in READY_PATHS
    port = int(option(args, "--port") or 0)
    for probe in ("livenessProbe", "readinessProbe"):
        assert container_port(container[probe]["httpGet"]["port"]) == port
    assert [p["containerPort"] for p in container["ports"]] == [port]
    config = parse_config_text(fill_in_a_key(configmap_config()), "configmap:gateway.yaml", ENV)
    assert config.server.port == port
    service = documents()["Service"]
    assert [container_port(p["targetPort"]) for p in service["spec"]["ports"]] == [port]


def test_the_config_file_is_the_configmap_mounted_where_the_command_reads_it() -> None:
    container = gateway_container()
    config_path = Path(option(deployment_args(), "--config") or "")
    mounts = {Path(mount["mountPath"]): mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod_spec()["volumes"]}
    volume = volumes[mounts[config_path.parent]]
    assert volume["configMap"]["name"] == documents()["ConfigMap"]["metadata"]["name"]
    assert config_path.name in documents()["ConfigMap"]["data"]


def test_grace_period_outlasts_the_drain() -> None:
    """The kubelet's SIGKILL comes after terminationGracePeriodSeconds: the gateway's drain
    (drain_delay, then graceful_timeout for open streams) must end before it."""
    grace = pod_spec()["terminationGracePeriodSeconds"]
    drain = shutdown_seconds(configmap_config(), deployment_args())
    # No preStop hook: it would run before SIGTERM and count against the same grace period.
    assert "lifecycle" not in gateway_container()
    assert grace > drain, f"terminationGracePeriodSeconds {grace} <= drain {drain}"


def test_pod_runs_as_the_images_non_root_user_on_a_read_only_root_with_a_writable_tmp() -> None:
    spec = pod_spec()
    container = gateway_container()
    user, _, group = one(final_stage(), "USER").arguments.partition(":")
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == int(user) != 0
    assert spec["securityContext"]["runAsGroup"] == int(group)
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # With --workers N the gateway keeps its metric files under /tmp: the one writable mount.
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert "PROMETHEUS_MULTIPROC_DIR" not in {env["name"] for env in container.get("env", [])}


def test_resources_are_requested_and_memory_is_limited() -> None:
    resources = gateway_container()["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]


def test_image_is_a_tagged_release_not_latest() -> None:
    image = gateway_container()["image"]
    name, _, tag = image.rpartition(":")
    assert name
    assert tag not in ("", "latest")
    assert "/" not in tag


# --- The objects around the Deployment -----------------------------------------------------


def test_service_autoscaler_and_disruption_budget_select_the_deployments_pods() -> None:
    deployment = documents()["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert documents()["Service"]["spec"]["selector"].items() <= pod_labels.items()
    budget = documents()["PodDisruptionBudget"]["spec"]
    assert budget["selector"]["matchLabels"] == selector
    autoscaler = documents()["HorizontalPodAutoscaler"]["spec"]
    assert autoscaler["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    # The autoscaler owns the replica count; one fixed here would be reset by every apply.
    assert "replicas" not in deployment["spec"]
    # A node drain never takes the last pod: fewer may be unavailable than the minimum.
    assert budget["maxUnavailable"] < autoscaler["minReplicas"]
    # The autoscaler's CPU target is a share of the request, so there must be one.
    assert "cpu" in gateway_container()["resources"]["requests"]
    rollout = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rollout["maxUnavailable"] == 0


def test_every_variable_the_config_needs_comes_from_the_pod_env_or_the_secret() -> None:
    container = gateway_container()
    secret = documents()["Secret"]
    secret_refs = [source["secretRef"]["name"] for source in container["envFrom"]]
    assert secret_refs == [secret["metadata"]["name"]]
    provided = {env["name"] for env in container.get("env", [])}
    provided |= {*secret.get("stringData", {}), *secret.get("data", {})}
    needed = required_variables(configmap_config())
    assert needed, "the config names its upstream key as ${...}"
    assert needed <= provided, f"not provided: {sorted(needed - provided)}"
