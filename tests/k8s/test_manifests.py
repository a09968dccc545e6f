"""Structural checks of the rendered manifests: what an SRE team's review would ask of
every Deployment, Service, autoscaler and policy, for both installs."""

from __future__ import annotations

import re

import pytest

from tests.k8s.rendering import (
    OVERLAYS,
    Workload,
    named,
    of_kind,
    rendered,
    rendered_text,
    selects,
    service_selects,
    workloads,
)

SERVICES = ("gateway", "detection", "embedding", "search", "ingest")  # gRPC
WEB_SERVICES = ("console",)  # HTTPS, probed on /healthz
AUTOSCALED = ("gateway", "detection", "embedding", "ingest", "console")
# Secrets made by hand (README); everything else mounted comes from cert-manager in
# production.
HAND_MADE_SECRETS = {"facegrid-credentials", "facegrid-audit", "facegrid-console-session"}
IMAGE = re.compile(r"^[\w./-]+(:(?!latest$)[\w.-]+|@sha256:[0-9a-f]{64})$")


def all_workloads() -> list[Workload]:
    return [workload for target in OVERLAYS for workload in workloads(target)]


def ids(workload: Workload) -> str:
    return f"{workload.target}-{workload.name}"


@pytest.mark.parametrize("target", OVERLAYS)
def test_every_part_of_the_system_is_deployed(target: str) -> None:
    assert {workload.name for workload in workloads(target)} == {
        *SERVICES,
        *WEB_SERVICES,
        "triton",
    }
    assert {
        doc["metadata"]["namespace"] for doc in rendered(target) if doc["kind"] != "Namespace"
    } == {"facegrid"}


@pytest.mark.parametrize("workload", all_workloads(), ids=ids)
def test_pods_run_unprivileged(workload: Workload) -> None:
    pod = workload.pod
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] >= 10000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == workload.name
    for container in workload.all_containers:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["privileged"] is False, container["name"]
        assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert "hostPort" not in str(container.get("ports", []))
    assert not {"hostNetwork", "hostPID", "hostIPC"} & pod.keys()


@pytest.mark.parametrize("workload", all_workloads(), ids=ids)
def test_every_container_has_requests_limits_and_a_pinned_image(workload: Workload) -> None:
    for container in workload.all_containers:
        resources = container["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= resources[kind].keys(), (container["name"], kind)
        assert IMAGE.match(container["image"]), container["image"]


@pytest.mark.parametrize("workload", all_workloads(), ids=ids)
def test_every_container_has_startup_readiness_and_liveness_probes(workload: Workload) -> None:
    health_port = int(
        named(workload.target, "ConfigMap", "facegrid")["data"]["FACEGRID_SERVER__HEALTH_PORT"]
    )
    for container in workload.containers:
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in container, (container["name"], probe)
            if workload.name in SERVICES:
                # Native gRPC probes on the plaintext health port (grpc.health.v1).
                assert container[probe]["grpc"] == {"port": health_port}, probe
            if workload.name in WEB_SERVICES:
                # Its own HTTPS port: /healthz answers 503 while it drains.
                assert container[probe]["httpGet"] == {
                    "path": "/healthz",
                    "port": "https",
                    "scheme": "HTTPS",
                }, probe
        ports = workload.container_ports()
        assert health_port in ports or workload.name in ("triton", *WEB_SERVICES)


@pytest.mark.parametrize("workload", all_workloads(), ids=ids)
def test_termination_grace_covers_the_services_drain(workload: Workload) -> None:
    config = named(workload.target, "ConfigMap", "facegrid")["data"]
    drain = float(config["FACEGRID_SERVER__DRAIN_S"]) + float(
        config["FACEGRID_SERVER__GRACE_PERIOD_S"]
    )
    grace = workload.pod["terminationGracePeriodSeconds"]
    if workload.name in (*SERVICES, *WEB_SERVICES):
        assert grace >= drain + 5
    else:  # Triton: --exit-timeout-secs, then kubelet's SIGKILL
        timeout = next(arg for arg in workload.containers[0]["args"] if "exit-timeout" in arg)
        assert grace > int(timeout.split("=")[1])


@pytest.mark.parametrize("workload", all_workloads(), ids=ids)
def test_every_deployment_has_a_disruption_budget(workload: Workload) -> None:
    budgets = [
        budget
        for budget in of_kind(workload.target, "PodDisruptionBudget")
        if selects(budget["spec"]["selector"], workload.pod_labels)
    ]
    assert len(budgets) == 1
    # maxUnavailable 1 lets a node drain even with one replica (minAvailable would not).
    assert budgets[0]["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("target", OVERLAYS)
def test_autoscalers_target_real_deployments(target: str) -> None:
    deployments = {workload.name: workload for workload in workloads(target)}
    scaled = {}
    for autoscaler in of_kind(target, "HorizontalPodAutoscaler"):
        ref = autoscaler["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment"
        assert ref["name"] in deployments
        assert autoscaler["spec"]["minReplicas"] <= autoscaler["spec"]["maxReplicas"]
        scaled[ref["name"]] = autoscaler
    assert set(AUTOSCALED) <= scaled.keys()
    assert scaled["gateway"]["spec"]["minReplicas"] >= 2
    if target == "production":
        queue = scaled["triton"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
        assert queue == "triton_queue_us_per_request"
        gateway_metrics = [
            m.get("pods", {}).get("metric", {}).get("name")
            for m in scaled["gateway"]["spec"]["metrics"]
        ]
        assert "facegrid_rpc_in_flight" in gateway_metrics


@pytest.mark.parametrize("target", OVERLAYS)
def test_an_autoscaled_deployment_leaves_its_replicas_to_the_autoscaler(target: str) -> None:
    """With spec.replicas set, every apply would reset the count the autoscaler chose."""
    scaled = {
        hpa["spec"]["scaleTargetRef"]["name"] for hpa in of_kind(target, "HorizontalPodAutoscaler")
    }
    for workload in workloads(target):
        assert ("replicas" in workload.manifest["spec"]) == (workload.name not in scaled), (
            workload.name
        )


@pytest.mark.parametrize("target", OVERLAYS)
def test_the_gateway_rolls_without_downtime(target: str) -> None:
    gateway = named(target, "Deployment", "gateway")["spec"]
    assert named(target, "HorizontalPodAutoscaler", "gateway")["spec"]["minReplicas"] >= 2
    assert gateway["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }


@pytest.mark.parametrize("target", OVERLAYS)
def test_every_service_port_exists_in_its_pods(target: str) -> None:
    pods = workloads(target)
    for service in of_kind(target, "Service"):
        selector = service["spec"]["selector"]
        backing = [workload for workload in pods if service_selects(selector, workload.pod_labels)]
        assert backing, service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            for workload in backing:
                assert port["targetPort"] in workload.container_ports(), (
                    service["metadata"]["name"],
                    port,
                )


def test_triton_runs_on_gpu_nodes_in_production() -> None:
    pod = named("production", "Deployment", "triton")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    triton = pod["containers"][0]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    startup = triton["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # model loading
    build = pod["initContainers"][0]
    assert build["args"][:2] == ["models", "build"]
    mounts = {mount["name"]: mount for mount in triton["volumeMounts"]}
    assert mounts["models"]["readOnly"] is True


def test_the_small_install_runs_triton_on_the_cpu() -> None:
    pod = named("small", "Deployment", "triton")["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod
    assert "tolerations" not in pod
    assert "nvidia.com/gpu" not in str(pod["containers"][0]["resources"])


@pytest.mark.parametrize("target", OVERLAYS)
def test_network_policies_deny_by_default(target: str) -> None:
    policies = {
        policy["metadata"]["name"]: policy["spec"] for policy in of_kind(target, "NetworkPolicy")
    }
    assert policies["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    # Only the gateway and ingest take calls from outside the namespace's services.
    public = policies["callers-to-public-services"]
    assert public["podSelector"]["matchExpressions"][0]["values"] == ["gateway", "ingest"]
    internal = policies["internal-services-ingress"]["ingress"][0]["from"][0]["podSelector"]
    assert internal["matchExpressions"][0]["values"] == ["gateway", "ingest"]


@pytest.mark.parametrize("target", OVERLAYS)
def test_secrets_are_never_in_config_maps_or_the_manifests(target: str) -> None:
    assert not of_kind(target, "Secret")
    text = rendered_text(target)
    assert "BEGIN" not in text
    assert "PRIVATE KEY" not in text
    for config_map in of_kind(target, "ConfigMap"):
        for key, value in config_map["data"].items():
            assert not re.search(r"(?i)password|secret|token=", f"{key}={value}"), key
    for workload in workloads(target):
        for container in workload.all_containers:
            # Secrets as files, never environment variables (which leak into logs and /proc).
            assert "secretKeyRef" not in str(container.get("env", [])), container["name"]


def test_production_certificates_cover_every_mounted_secret() -> None:
    mounted = {
        volume["secret"]["secretName"]
        for workload in workloads("production")
        for volume in workload.pod.get("volumes", [])
        if "secret" in volume
    }
    issued = {
        certificate["spec"]["secretName"] for certificate in of_kind("production", "Certificate")
    }
    assert mounted - issued == HAND_MADE_SECRETS


def test_the_dependencies_admit_only_facegrid_services() -> None:
    policies = of_kind("dependencies", "NetworkPolicy")
    namespaces = {
        namespace["metadata"]["name"] for namespace in of_kind("dependencies", "Namespace")
    }
    assert namespaces == {"milvus", "nats", "facegrid-db", "observability"}
    for namespace in namespaces:
        deny = [
            p
            for p in policies
            if p["metadata"]["namespace"] == namespace
            and p["metadata"]["name"] == "default-deny-ingress"
        ]
        assert deny
        assert deny[0]["spec"]["podSelector"] == {}
    admitted = {
        p["metadata"]["namespace"]: p["spec"]["ingress"][0]["from"][0]["podSelector"][
            "matchExpressions"
        ][0]["values"]
        for p in policies
        if p["metadata"]["name"].startswith("from-")
        and "podSelector" in p["spec"]["ingress"][0]["from"][0]
    }
    assert admitted == {
        "milvus": ["search"],
        "nats": ["ingest"],
        "facegrid-db": ["gateway", "ingest"],
    }
