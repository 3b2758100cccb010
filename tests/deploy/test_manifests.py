"""The Kubernetes deployment, rendered as an operator would apply it, checked for what an
operator would notice: pods that run as root or with a writable root, probes on the wrong
path, a grace period that cuts a record short, credentials in plain text, GPUs where they
do not belong, a fetcher that can reach the metadata service, autoscalers on the wrong
topic, a dashboard that queries metrics the workers do not serve, a model canary that
differs from stable detect in more than its image, and Prometheus Operator objects that
scrape the wrong thing or alert on series nobody serves (or never alert).

The tools (kustomize, the KEDA and Prometheus Operator CRDs, promtool) come from
scripts/validate-k8s, which builds or downloads them once into .tools/; the overlays are
rendered once per module.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from pydantic import BaseModel, SecretStr

from synthwatch.pipeline.settings import ModelSettings, Settings
from tests.deploy import manifests as m

Obj = dict[str, Any]

ROLES = ("fetch", "detect", "decide")
CANARY = "detect-canary"
"""Component label of the model canary (k8s/components/detect-canary): a detect worker."""
ROLES_BY_RENDER = {
    "cpu": ROLES,
    "gpu": ROLES,
    "cpu+alert-sink": (*ROLES, "sink"),
    "cpu+detect-canary": (*ROLES, CANARY),
    "gpu+detect-canary": (*ROLES, CANARY),
    "cpu+prometheus-operator": ROLES,
}
CANARY_RENDERS = [name for name, roles in ROLES_BY_RENDER.items() if CANARY in roles]
PROMETHEUS_OPERATOR = "k8s/components/prometheus-operator"
OPERATOR_RENDERS = [name for name, (_, c) in m.RENDERS.items() if PROMETHEUS_OPERATOR in c]
UID = 10001
WEB_PORT = 6066
DASHBOARD = m.K8S / "grafana" / "synthwatch-dashboard.json"
METRICS = m.K8S / "metrics.txt"
TOPOLOGY = m.ROOT / "synthwatch" / "pipeline" / "topology.py"
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|USERNAME|CREDENTIAL|API_KEY")


# -- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tools() -> m.Tools:
    try:
        found = m.obtain_tools()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"deployment tools unavailable: {exc}")
    if not found.kustomize:
        pytest.skip(f"no kustomize could be obtained: {found.errors[-500:]}")
    return found


@pytest.fixture(scope="module")
def rendered(tools: m.Tools) -> dict[str, list[Obj]]:
    return {name: m.render(tools.kustomize, name) for name in m.RENDERS}


@pytest.fixture(scope="module")
def keda_crds(tools: m.Tools) -> Path:
    if not tools.keda_crds:
        pytest.skip(f"KEDA CRDs could not be obtained: {tools.errors[-500:]}")
    return Path(tools.keda_crds)


@pytest.fixture(scope="module")
def prometheus_operator_crds(tools: m.Tools) -> Path:
    if not tools.prometheus_operator_crds:
        pytest.skip(f"Prometheus Operator CRDs could not be obtained: {tools.errors[-500:]}")
    return Path(tools.prometheus_operator_crds)


@pytest.fixture(scope="module")
def promtool(tools: m.Tools) -> str:
    if not tools.promtool:
        pytest.skip(f"promtool could not be built: {tools.errors[-500:]}")
    return tools.promtool


# -- helpers --------------------------------------------------------------------------


def of_kind(objs: Sequence[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def role_of(obj: Mapping[str, Any]) -> str:
    return str(obj["metadata"]["labels"]["app.kubernetes.io/component"])


def worker_role(role: str) -> str:
    """The `--role` a Deployment's worker runs: the canary is a detect worker."""
    return "detect" if role == CANARY else role


def workers(objs: Sequence[Obj]) -> dict[str, Obj]:
    return {role_of(d): d for d in of_kind(objs, "Deployment")}


def pod_spec(deployment: Mapping[str, Any]) -> Obj:
    spec: Obj = deployment["spec"]["template"]["spec"]
    return spec


def worker_container(deployment: Mapping[str, Any]) -> Obj:
    containers: list[Obj] = pod_spec(deployment)["containers"]
    (container,) = containers
    return container


def all_containers(objs: Sequence[Obj]) -> Iterator[tuple[Obj, Obj]]:
    for d in of_kind(objs, "Deployment"):
        for c in m.containers(d):
            yield d, c


def effective_env(objs: Sequence[Obj], container: Mapping[str, Any]) -> dict[str, str]:
    """Literal environment of a container: its ConfigMaps, then its `value` entries.
    Entries from Secrets or the downward API are left out (no literal value)."""
    maps = {c["metadata"]["name"]: c.get("data", {}) for c in of_kind(objs, "ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        assert ref in maps, f"envFrom names ConfigMap {ref}, which is not rendered"
        env.update(maps[ref])
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
        else:
            env.pop(entry["name"], None)
    return env


def settings_for(env: Mapping[str, str], mp: pytest.MonkeyPatch) -> Settings:
    """Settings as the worker would build them from this environment."""
    for name in list(os.environ):
        if name.startswith("SYNTHWATCH_"):
            mp.delenv(name)
    for name, value in env.items():
        mp.setenv(name, value)
    return Settings()


def secret_setting_envs() -> set[str]:
    """Environment names of every SecretStr setting."""

    def is_secret(annotation: Any) -> bool:
        return annotation is SecretStr or SecretStr in get_args(annotation)

    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        if is_secret(field.annotation):
            names.add(f"SYNTHWATCH_{name.upper()}")
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            for sub, subfield in field.annotation.model_fields.items():
                if is_secret(subfield.annotation):
                    names.add(f"SYNTHWATCH_{name.upper()}__{sub.upper()}")
    return names


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def policies_for(objs: Sequence[Obj], labels: Mapping[str, str], kind: str) -> list[Obj]:
    return [
        p
        for p in of_kind(objs, "NetworkPolicy")
        if kind in p["spec"].get("policyTypes", []) and selects(p["spec"]["podSelector"], labels)
    ]


def egress_allows_ip(policies: Sequence[Obj], ip: str) -> bool:
    """Whether any egress rule lets the pods reach this address by ipBlock (or allows all)."""
    address = ipaddress.ip_address(ip)
    for policy in policies:
        for rule in policy["spec"].get("egress", []):
            if not rule.get("to"):
                return True
            for peer in rule["to"]:
                block = peer.get("ipBlock")
                if block is None:
                    continue
                net = ipaddress.ip_network(block["cidr"])
                if address.version != net.version or address not in net:
                    continue
                if not any(
                    address in ipaddress.ip_network(e)
                    for e in block.get("except", [])
                    if ipaddress.ip_network(e).version == address.version
                ):
                    return True
    return False


def namespaces_reached(policies: Sequence[Obj]) -> set[str]:
    reached: set[str] = set()
    for policy in policies:
        for rule in policy["spec"].get("egress", []):
            for peer in rule.get("to", []):
                name = peer.get("namespaceSelector", {}).get("matchLabels", {})
                if "kubernetes.io/metadata.name" in name:
                    reached.add(name["kubernetes.io/metadata.name"])
    return reached


QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def quantity(value: Any) -> float:
    match = QUANTITY.match(str(value))
    assert match and match.group(2) in UNITS, f"unparsed quantity {value!r}"
    return float(match.group(1)) * UNITS[match.group(2)]


def commit_interval_s() -> float:
    """faust's offset-commit interval, set in the topology (not a setting)."""
    match = re.search(r"broker_commit_interval=([0-9.]+)", TOPOLOGY.read_text())
    assert match, "topology.py no longer sets broker_commit_interval: update the grace bound"
    return float(match.group(1))


def record_bound_s(role: str, s: Settings) -> float:
    """Longest one record can hold a worker of this role, its offset commit included, from
    the caps in the settings (the arithmetic the Deployments state in comments)."""
    commit = commit_interval_s()
    if role == "fetch":
        return s.fetch.timeout_s + commit
    if role == "detect":
        return s.sample.max_decode_s + s.models.max_delay_ms / 1000 + commit
    if role == "decide":
        return s.sample.max_decode_s + commit
    if role == "sink":
        k = s.sink
        waits = sum(min(k.backoff_max_s, k.backoff_s * 2.0**i) for i in range(k.max_attempts - 1))
        return k.max_attempts * k.timeout_s + waits + commit
    raise AssertionError(f"no bound for role {role}")


def metric_catalogue() -> dict[str, str]:
    """k8s/metrics.txt: name -> type."""
    return {name: metric.kind for name, metric in m.metric_catalogue(METRICS).items()}


def dashboard_exprs(dashboard: Mapping[str, Any]) -> Iterator[tuple[Obj, str]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel, target["expr"]


# -- what renders -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(m.RENDERS))
def test_each_role_runs_as_its_own_worker_deployment(
    rendered: dict[str, list[Obj]], name: str
) -> None:
    deployments = workers(rendered[name])
    assert sorted(deployments) == sorted(ROLES_BY_RENDER[name])
    for role, deployment in deployments.items():
        container = worker_container(deployment)
        command = [*container.get("command", []), *container.get("args", [])]
        assert command == ["synthwatch", "worker", "--role", worker_role(role)]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "synthwatch"
        assert labels["app.kubernetes.io/component"] == role
    namespaced = [o for o in rendered[name] if o["kind"] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"synthwatch"}


@pytest.mark.parametrize("name", list(m.RENDERS))
def test_core_objects_pass_kubernetes_validate_strict(
    rendered: dict[str, list[Obj]], tools: m.Tools, name: str
) -> None:
    core = [o for o in rendered[name] if not m.is_custom(o)]
    assert core
    errors = [e for o in core for e in m.validate_core(o, tools.kubernetes_version)]
    assert not errors, "\n".join(errors)


# -- pods -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(m.RENDERS))
def test_every_container_runs_unprivileged_on_a_read_only_root(
    rendered: dict[str, list[Obj]], name: str
) -> None:
    for deployment, container in all_containers(rendered[name]):
        pod = pod_spec(deployment)
        pod_sc, sc = pod.get("securityContext", {}), container.get("securityContext", {})
        where = f"{deployment['metadata']['name']}/{container['name']}"
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
        assert sc.get("runAsUser", pod_sc.get("runAsUser")) == UID, where
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("privileged", False) is False, where
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not sc.get("capabilities", {}).get("add"), where
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
        assert seccomp.get("type") == "RuntimeDefault", where
        assert pod.get("automountServiceAccountToken") is False, where
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
        # The only writable place is an emptyDir at /tmp, where HOME and the work dir are.
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        tmp = [v for v in container.get("volumeMounts", []) if v["mountPath"] == "/tmp"]
        assert tmp and "emptyDir" in volumes[tmp[0]["name"]], where
        assert effective_env(rendered[name], container)["SYNTHWATCH_WORK_DIR"].startswith("/tmp")


def test_pods_run_as_the_images_user() -> None:
    users = re.findall(r"^USER\s+(\S+)", (m.ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert users == [f"{UID}:{UID}"]


@pytest.mark.parametrize("name", list(m.RENDERS))
def test_probes_hit_the_health_endpoints_on_the_metrics_port(
    rendered: dict[str, list[Obj]], name: str
) -> None:
    for deployment, container in all_containers(rendered[name]):
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": WEB_PORT}
        expected = {
            "livenessProbe": "/health/live",
            "readinessProbe": "/health/ready",
            "startupProbe": "/health/live",
        }
        for probe, path in expected.items():
            get = container[probe]["httpGet"]
            assert get["path"] == path, (deployment["metadata"]["name"], probe)
            assert ports.get(get["port"], get["port"]) == WEB_PORT
        env = effective_env(rendered[name], container)
        # The worker must listen where the kubelet and Prometheus connect.
        assert env["SYNTHWATCH_WEB_HOST"] == "0.0.0.0"
        assert int(env["SYNTHWATCH_WEB_PORT"]) == WEB_PORT
    (service,) = of_kind(rendered[name], "Service")
    assert service["spec"]["ports"] == [
        {"name": "http", "port": WEB_PORT, "targetPort": "http", "protocol": "TCP"}
    ]
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(WEB_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"
    for deployment in of_kind(rendered[name], "Deployment"):
        assert selects(
            {"matchLabels": service["spec"]["selector"]},
            deployment["spec"]["template"]["metadata"]["labels"],
        )


@pytest.mark.parametrize("name", list(m.RENDERS))
def test_every_container_has_requests_and_limits(rendered: dict[str, list[Obj]], name: str) -> None:
    for deployment, container in all_containers(rendered[name]):
        requests = container.get("resources", {}).get("requests", {})
        limits = container.get("resources", {}).get("limits", {})
        where = deployment["metadata"]["name"]
        for resource in ("cpu", "memory", "ephemeral-storage"):
            assert resource in requests and resource in limits, (where, resource)
            assert 0 < quantity(requests[resource]) <= quantity(limits[resource]), (where, resource)
        # The emptyDir at /tmp fits in the container's ephemeral-storage limit.
        for volume in pod_spec(deployment)["volumes"]:
            size = volume.get("emptyDir", {}).get("sizeLimit")
            if size is not None:
                assert quantity(size) <= quantity(limits["ephemeral-storage"]), where


@pytest.mark.parametrize("name", list(m.RENDERS))
def test_grace_period_outlasts_a_record_and_its_commit(
    rendered: dict[str, list[Obj]], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for role, deployment in workers(rendered[name]).items():
        env = effective_env(rendered[name], worker_container(deployment))
        with monkeypatch.context() as mp:
            bound = record_bound_s(worker_role(role), settings_for(env, mp))
        grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
        assert grace > bound, f"{role}: grace {grace} s <= longest record {bound} s"


@pytest.mark.parametrize("name", list(m.RENDERS))
def test_group_instance_id_is_the_pod_name(rendered: dict[str, list[Obj]], name: str) -> None:
    for deployment in of_kind(rendered[name], "Deployment"):
        env = {e["name"]: e for e in worker_container(deployment)["env"]}
        source = env["SYNTHWATCH_KAFKA__GROUP_INSTANCE_ID"]["valueFrom"]
        assert source == {"fieldRef": {"fieldPath": "metadata.name"}}


@pytest.mark.parametrize("name", list(m.RENDERS))
def test_rollouts_and_drains_never_stall_on_partitions(
    rendered: dict[str, list[Obj]], name: str
) -> None:
    objs = rendered[name]
    budgets = of_kind(objs, "PodDisruptionBudget")
    for role, deployment in workers(objs).items():
        # A surge pod above the partition count never gets a partition, so never turns
        # ready.
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, role
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        matching = [b for b in budgets if selects(b["spec"]["selector"], labels)]
        if role == CANARY:
            # One pod: a budget allowing one eviction allows all, one forbidding it would
            # block every drain (test_canary_is_one_pod_that_keda_does_not_scale).
            assert not matching, role
            continue
        # KEDA owns the replica count.
        assert "replicas" not in deployment["spec"], role
        (budget,) = matching
        # At one replica, minAvailable 1 would forbid every node drain.
        assert budget["spec"].get("maxUnavailable") == 1, role
        assert "minAvailable" not in budget["spec"], role


# -- secrets --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(m.RENDERS))
def test_credentials_come_only_from_secret_references(
    rendered: dict[str, list[Obj]], name: str
) -> None:
    objs = rendered[name]
    assert not of_kind(objs, "Secret"), "a Secret with values is shipped in the manifests"
    secret_envs = secret_setting_envs()
    assert "SYNTHWATCH_KAFKA__SASL_PASSWORD" in secret_envs  # the walk finds nested fields
    for config in of_kind(objs, "ConfigMap"):
        for key, value in config.get("data", {}).items():
            assert key not in secret_envs and not SECRETISH.search(key), key
            assert not re.search(r"://[^/\s@]+@", str(value)), f"credentials in {key}"
    for deployment, container in all_containers(objs):
        for entry in container.get("env", []):
            if entry["name"] in secret_envs or SECRETISH.search(entry["name"]):
                assert "value" not in entry, entry["name"]
                assert "secretKeyRef" in entry["valueFrom"], entry["name"]
        # The credentials the worker needs are all wired.
        env = {e["name"]: e for e in container.get("env", [])}
        s3 = ("SYNTHWATCH_S3__ACCESS_KEY_ID", "SYNTHWATCH_S3__SECRET_ACCESS_KEY")
        kafka = ("SYNTHWATCH_KAFKA__SASL_USERNAME", "SYNTHWATCH_KAFKA__SASL_PASSWORD")
        uses_store = deployment["metadata"]["name"] != "synthwatch-sink"
        for needed in (*kafka, *s3) if uses_store else kafka:
            assert "secretKeyRef" in env[needed]["valueFrom"], (deployment, needed)
        if not uses_store:  # least privilege: the sink never touches the object store
            assert not set(s3) & set(env), deployment["metadata"]["name"]


def test_only_the_decide_workers_hold_the_evidence_signing_key(
    rendered: dict[str, list[Obj]],
) -> None:
    """Every decide pod signs manifests with the one key of the Secret; the stages that
    write no evidence never see it."""
    for name, deployment in workers(rendered["cpu+alert-sink"]).items():
        env = {e["name"]: e for e in worker_container(deployment).get("env", [])}
        if name != "decide":
            assert "SYNTHWATCH_SIGNING__KEY" not in env, name
            continue
        ref = env["SYNTHWATCH_SIGNING__KEY"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("synthwatch-signing", "key.pem")


def test_alert_sink_reads_its_keys_from_the_sink_secret(
    rendered: dict[str, list[Obj]],
) -> None:
    sink = workers(rendered["cpu+alert-sink"])["sink"]
    env = {e["name"]: e for e in worker_container(sink)["env"]}
    for name, key in (
        ("SYNTHWATCH_SINK__SECRET", "secret"),
        ("SYNTHWATCH_SINK__SPLUNK_TOKEN", "splunk_token"),
    ):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("synthwatch-sink", key)
    literal = effective_env(rendered["cpu+alert-sink"], worker_container(sink))
    assert literal["SYNTHWATCH_SINK__URL"].startswith("https://")
    assert literal["SYNTHWATCH_SINK__FORMAT"] in ("native", "ocsf", "splunk_hec")


# -- GPU ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(m.RENDERS))
def test_gpus_go_to_detect_only_and_only_in_the_gpu_overlay(
    rendered: dict[str, list[Obj]], name: str
) -> None:
    for role, deployment in workers(rendered[name]).items():
        pod, container = pod_spec(deployment), worker_container(deployment)
        gpu_limit = container["resources"]["limits"].get("nvidia.com/gpu")
        tolerates = [t for t in pod.get("tolerations", []) if t.get("key") == "nvidia.com/gpu"]
        on_gpu = m.RENDERS[name][0] == "k8s/overlays/gpu" and worker_role(role) == "detect"
        if on_gpu:
            assert str(gpu_limit) == "1"
            assert tolerates and tolerates[0]["effect"] == "NoSchedule"
            assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert container["image"].endswith("-gpu")
            env = effective_env(rendered[name], container)
            assert env["SYNTHWATCH_MODELS__BACKEND"] == "tensorrt"
            cpu_detect = worker_container(workers(rendered["cpu"])["detect"])
            cpu_batch = effective_env(rendered["cpu"], cpu_detect).get(
                "SYNTHWATCH_MODELS__MAX_BATCH", ModelSettings().max_batch
            )
            assert int(env["SYNTHWATCH_MODELS__MAX_BATCH"]) > int(cpu_batch)
        else:
            assert gpu_limit is None and not tolerates, (name, role)
            assert "nvidia.com/gpu.present" not in pod.get("nodeSelector", {}), (name, role)
            assert not container["image"].endswith("-gpu"), (name, role)


# -- network --------------------------------------------------------------------------

PRIVATE = [
    "169.254.169.254",  # cloud metadata
    "169.254.1.1",
    "10.0.0.1",
    "10.96.0.1",  # a typical Kubernetes API service address
    "172.16.0.1",
    "172.31.255.254",
    "192.168.1.1",
    "100.64.0.1",
    "127.0.0.1",
    "fd00:ec2::254",  # AWS metadata over IPv6
    "fe80::1",
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
]
PUBLIC = ["1.1.1.1", "151.101.1.69", "2606:4700:4700::1111", "2a00:1450:4001:82a::200e"]


@pytest.mark.parametrize("name", list(m.RENDERS))
def test_fetch_reaches_the_internet_but_no_private_or_metadata_address(
    rendered: dict[str, list[Obj]], name: str
) -> None:
    objs = rendered[name]
    labels = workers(objs)["fetch"]["spec"]["template"]["metadata"]["labels"]
    policies = policies_for(objs, labels, "Egress")
    assert policies, "fetch egress is not restricted"
    for ip in PRIVATE:
        assert not egress_allows_ip(policies, ip), ip
    for ip in PUBLIC:
        assert egress_allows_ip(policies, ip), ip
    assert {"kube-system", "kafka", "object-store"} <= namespaces_reached(policies)


@pytest.mark.parametrize("name", list(m.RENDERS))
def test_other_roles_reach_only_dns_kafka_s3_and_the_sink_target(
    rendered: dict[str, list[Obj]], name: str
) -> None:
    objs = rendered[name]
    for role, deployment in workers(objs).items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        policies = policies_for(objs, labels, "Egress")
        assert policies, f"{role}: egress is not restricted"
        reached = namespaces_reached(policies)
        assert {"kube-system", "kafka", "object-store"} <= reached, role
        # Every role resolves names through kube-dns, over UDP and TCP.
        dns = [
            {p["protocol"] for p in rule.get("ports", []) if p["port"] == 53}
            for policy in policies
            for rule in policy["spec"]["egress"]
            if any(
                peer.get("podSelector", {}).get("matchLabels", {}).get("k8s-app") == "kube-dns"
                for peer in rule.get("to", [])
            )
        ]
        assert {"UDP", "TCP"} in dns, role
        if role == "fetch":
            continue
        assert reached == {"kube-system", "kafka", "object-store"} | (
            {"splunk"} if role == "sink" else set()
        ), role
        for ip in PUBLIC + PRIVATE:
            assert not egress_allows_ip(policies, ip), (role, ip)


@pytest.mark.parametrize("name", list(m.RENDERS))
def test_egress_rules_keep_the_order_the_readme_patches(
    rendered: dict[str, list[Obj]], name: str
) -> None:
    # k8s/README.md retargets Kafka and S3 in every egress policy by rule index.
    for policy in of_kind(rendered[name], "NetworkPolicy"):
        rules = policy["spec"].get("egress")
        if rules is None:
            continue
        reached = [namespaces_reached([{"spec": {"egress": [rule]}}]) for rule in rules[:3]]
        assert reached == [{"kube-system"}, {"kafka"}, {"object-store"}], policy["metadata"]["name"]


@pytest.mark.parametrize("name", list(m.RENDERS))
def test_only_monitoring_reaches_the_metrics_port(
    rendered: dict[str, list[Obj]], name: str
) -> None:
    objs = rendered[name]
    for role, deployment in workers(objs).items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        policies = policies_for(objs, labels, "Ingress")
        assert policies, f"{role}: ingress is not restricted"
        for policy in policies:
            for rule in policy["spec"].get("ingress", []):
                assert [p["port"] for p in rule["ports"]] in (["http"], [WEB_PORT]), role
                assert rule["from"] == [
                    {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                        }
                    }
                ], role


# -- KEDA -----------------------------------------------------------------------------

TOPIC_SETTING = {
    "fetch": "topic_refs",
    "detect": "topic_fetched",
    "decide": "topic_verdicts",
    "sink": "topic_alerts",
}
SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}


@pytest.mark.parametrize("name", list(m.RENDERS))
def test_keda_objects_are_valid_against_the_crds(
    rendered: dict[str, list[Obj]], keda_crds: Path, tools: m.Tools, name: str
) -> None:
    keda = [o for o in rendered[name] if m.is_keda(o)]
    assert {o["kind"] for o in keda} == {"ScaledObject", "TriggerAuthentication"}
    errors = [e for o in keda for e in m.validate_keda(o, keda_crds, tools.kubernetes_version)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", list(m.RENDERS))
def test_each_role_scales_on_the_lag_of_its_own_topic(
    rendered: dict[str, list[Obj]], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objs = rendered[name]
    deployments = {d["metadata"]["name"]: d for d in of_kind(objs, "Deployment")}
    auths = {a["metadata"]["name"]: a for a in of_kind(objs, "TriggerAuthentication")}
    scaled = of_kind(objs, "ScaledObject")
    # Every role but the canary (one pod, test_canary_is_one_pod_that_keda_does_not_scale).
    assert sorted(s["spec"]["scaleTargetRef"]["name"] for s in scaled) == sorted(
        n for n, d in deployments.items() if role_of(d) != CANARY
    )
    for so in scaled:
        deployment = deployments[so["spec"]["scaleTargetRef"]["name"]]
        role = role_of(deployment)
        container = worker_container(deployment)
        env = effective_env(objs, container)
        with monkeypatch.context() as mp:
            s = settings_for(env, mp)
        spec = so["spec"]
        # One partition per consumer at most: more replicas than partitions would idle.
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= s.kafka.partitions, (
            f"{role}: replicas {spec['minReplicaCount']}..{spec['maxReplicaCount']}, "
            f"{s.kafka.partitions} partitions"
        )
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleUp"]["stabilizationWindowSeconds"] >= 0
        assert (
            behavior["scaleDown"]["stabilizationWindowSeconds"]
            > (behavior["scaleUp"]["stabilizationWindowSeconds"])
        )
        (trigger,) = spec["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "kafka"
        assert meta["topic"] == getattr(s.kafka, TOPIC_SETTING[role]), role
        assert meta["consumerGroup"] == s.kafka.app_id
        assert int(meta["lagThreshold"]) > 0
        assert env[meta["bootstrapServersFromEnv"]] == s.kafka.bootstrap_servers
        # KEDA talks to the same brokers the same way the workers do.
        assert meta["sasl"] == SASL[str(s.kafka.sasl_mechanism)]
        assert meta["tls"] == ("enable" if "SSL" in s.kafka.security_protocol else "disable")
        auth = auths[trigger["authenticationRef"]["name"]]
        refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
        worker_refs = {
            e["name"]: (
                e["valueFrom"]["secretKeyRef"]["name"],
                e["valueFrom"]["secretKeyRef"]["key"],
            )
            for e in container["env"]
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        assert refs == {
            "username": worker_refs["SYNTHWATCH_KAFKA__SASL_USERNAME"],
            "password": worker_refs["SYNTHWATCH_KAFKA__SASL_PASSWORD"],
        }


# -- model canary ---------------------------------------------------------------------


def canary_and_stable(objs: Sequence[Obj]) -> tuple[Obj, Obj]:
    deployments = workers(objs)
    return deployments[CANARY], deployments["detect"]


def template_labels(deployment: Mapping[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


@pytest.mark.parametrize("name", CANARY_RENDERS)
def test_canary_pods_are_not_stable_detect_pods(rendered: dict[str, list[Obj]], name: str) -> None:
    objs = rendered[name]
    canary, stable = canary_and_stable(objs)
    canary_labels, stable_labels = template_labels(canary), template_labels(stable)
    assert canary_labels["synthwatch.io/track"] == "canary"
    assert canary["metadata"]["labels"] == canary_labels
    # Neither Deployment adopts the other's pods.
    assert selects(canary["spec"]["selector"], canary_labels)
    assert not selects(stable["spec"]["selector"], canary_labels)
    assert not selects(canary["spec"]["selector"], stable_labels)
    # KEDA scales the stable Deployment, whose selector (what its HPA counts) leaves the
    # canary out; the stable budget does not count it either.
    targets = [s["spec"]["scaleTargetRef"]["name"] for s in of_kind(objs, "ScaledObject")]
    assert stable["metadata"]["name"] in targets
    for budget in of_kind(objs, "PodDisruptionBudget"):
        assert not selects(budget["spec"]["selector"], canary_labels), budget["metadata"]["name"]


@pytest.mark.parametrize("name", CANARY_RENDERS)
def test_canary_is_one_pod_that_keda_does_not_scale(
    rendered: dict[str, list[Obj]], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objs = rendered[name]
    canary, stable = canary_and_stable(objs)
    assert canary["spec"]["replicas"] == 1
    scalers = [o for o in objs if o["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")]
    by_target = {s["spec"]["scaleTargetRef"]["name"]: s for s in scalers}
    assert canary["metadata"]["name"] not in by_target
    # Stable detect at its ceiling plus the canary fit the partitions of media.fetched (a
    # member beyond them would get none and never turn ready), and the canary takes no
    # more than its own from the stable pods.
    with monkeypatch.context() as mp:
        s = settings_for(effective_env(objs, worker_container(stable)), mp)
    ceiling = by_target[stable["metadata"]["name"]]["spec"]["maxReplicaCount"]
    assert ceiling + canary["spec"]["replicas"] == s.kafka.partitions
    # The other roles' scaling is the overlay's.
    overlay = next(n for n, (o, c) in m.RENDERS.items() if not c and o == m.RENDERS[name][0])
    plain = {s["metadata"]["name"]: s for s in of_kind(rendered[overlay], "ScaledObject")}
    for target, scaler in by_target.items():
        if target != stable["metadata"]["name"]:
            assert scaler == plain[scaler["metadata"]["name"]], target


@pytest.mark.parametrize("name", CANARY_RENDERS)
def test_canary_runs_stable_detects_pod_spec_with_its_own_image(
    rendered: dict[str, list[Obj]], name: str
) -> None:
    objs = rendered[name]
    canary, stable = canary_and_stable(objs)
    canary_pod, stable_pod = copy.deepcopy(pod_spec(canary)), copy.deepcopy(pod_spec(stable))
    canary_image = canary_pod["containers"][0].pop("image")
    stable_image = stable_pod["containers"][0].pop("image")
    # Everything but the image: security contexts, probes, resources, environment,
    # volumes, grace period and, on GPU, the placement.
    assert canary_pod == stable_pod
    (mapping,) = m.IMAGES[name]
    assert canary_image == f"{mapping['newName']}:{mapping['newTag']}" != stable_image

    def rest(d: Mapping[str, Any]) -> Obj:
        return {k: v for k, v in d["spec"].items() if k not in ("replicas", "selector", "template")}

    assert rest(canary) == rest(stable)
    assert template_labels(canary) == {
        **template_labels(stable),
        "app.kubernetes.io/component": CANARY,
        "synthwatch.io/track": "canary",
    }
    # The stable Deployment is the overlay's, untouched.
    overlay = next(n for n, (o, c) in m.RENDERS.items() if not c and o == m.RENDERS[name][0])
    assert stable == workers(rendered[overlay])["detect"]


def test_canary_image_is_the_placeholder_until_mapped(tools: m.Tools) -> None:
    overlay, components = m.RENDERS["cpu+detect-canary"]
    objs = m.build(tools.kustomize, m.wrapper("cpu+detect-canary-unmapped", overlay, components))
    canary = workers(objs)[CANARY]
    assert worker_container(canary)["image"] == m.CANARY_IMAGE
    # Only the canary uses the placeholder, so mapping it changes nothing else.
    images = [c["image"] for _, c in all_containers(objs)]
    assert images.count(m.CANARY_IMAGE) == 1
    assert not any(i.startswith(m.CANARY_IMAGE) for i in images if i != m.CANARY_IMAGE)


@pytest.mark.parametrize("name", CANARY_RENDERS)
def test_canary_is_held_to_detects_network_policies(
    rendered: dict[str, list[Obj]], name: str
) -> None:
    objs = rendered[name]
    canary, stable = canary_and_stable(objs)
    for kind in ("Egress", "Ingress"):
        got = [p["metadata"]["name"] for p in policies_for(objs, template_labels(canary), kind)]
        want = [p["metadata"]["name"] for p in policies_for(objs, template_labels(stable), kind)]
        assert got and got == want, kind
    egress = policies_for(objs, template_labels(canary), "Egress")
    assert namespaces_reached(egress) == {"kube-system", "kafka", "object-store"}
    for ip in PUBLIC + PRIVATE:
        assert not egress_allows_ip(egress, ip), ip


def test_readme_canary_kustomization_is_the_tested_one(
    rendered: dict[str, list[Obj]], tools: m.Tools, tmp_path: Path
) -> None:
    # The kustomization k8s/README.md tells an operator to write, where it says to write
    # it, renders what the canary tests check.
    readme = (m.K8S / "README.md").read_text()
    section = readme.split("## Canary a model upgrade\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(
        r"cat > k8s/overlays/canary/kustomization.yaml <<'EOF'\n(.*?)\n *EOF\n", section, re.S
    )
    shutil.copytree(m.K8S, tmp_path / "k8s")
    here = tmp_path / "k8s" / "overlays" / "canary"
    here.mkdir()
    (here / "kustomization.yaml").write_text(textwrap.dedent(block))
    assert m.build(tools.kustomize, here) == rendered["cpu+detect-canary"]


# -- dashboard ------------------------------------------------------------------------


def test_metric_catalogue_is_well_formed() -> None:
    lines = [
        line.split("#", 1)[0].split()
        for line in METRICS.read_text().splitlines()
        if line.split("#", 1)[0].strip()
    ]
    names = [fields[0] for fields in lines]
    assert len(names) == len(set(names))
    for name, kind, *labels in lines:
        assert re.fullmatch(r"synthwatch_[a-z0-9_]+", name)
        assert kind in ("counter", "gauge", "histogram")
        assert (kind == "counter") == name.endswith("_total"), name
        assert len(labels) == 1 and all(
            re.fullmatch(r"[a-z0-9_]+", x) for x in labels[0].split(",")
        )


def test_dashboard_queries_only_metrics_the_workers_serve() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    catalogue = metric_catalogue()
    histograms = {n for n, kind in catalogue.items() if kind == "histogram"}
    unknown = set()
    queried = set()
    for panel, expr in dashboard_exprs(dashboard):
        for name in re.findall(r"\bsynthwatch_[a-z0-9_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if name in catalogue and name not in histograms:
                queried.add(name)
            elif base in histograms and base != name:
                queried.add(base)
            else:
                unknown.add(name)
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and re.search(r"by \([^)]*\ble\b", expr), panel["title"]
    assert not unknown, f"not in k8s/metrics.txt: {sorted(unknown)}"
    # Every metric is on the dashboard somewhere (build_info counts the running versions).
    assert queried == set(catalogue)


def test_dashboard_has_the_panels_an_operator_looks_for() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    exprs = [expr for _, expr in dashboard_exprs(dashboard)]

    def queried(pattern: str) -> list[str]:
        return [e for e in exprs if re.search(pattern, e)]

    assert queried(r"rate\(synthwatch_items_total.*by \(stage|by \(stage.*synthwatch_items_total")
    assert queried(r"by \(topic\).*synthwatch_consumer_lag")
    for metric in ("synthwatch_end_to_end_seconds", "synthwatch_stage_seconds"):
        quantiles = {
            q
            for e in queried(rf"{metric}_bucket")
            for q in re.findall(r"histogram_quantile\(([0-9.]+)", e)
        }
        assert {"0.5", "0.95", "0.99"} <= quantiles, metric
    assert queried(r"synthwatch_batch_fill_ratio")
    assert queried(r"by \((stage, )?reason\).*synthwatch_dlq_total")
    assert queried(r'synthwatch_verdicts_total\{[^}]*decision="flag"')
    assert queried(r"synthwatch_dependency_up")
    (models,) = [
        p for p in panels if any("synthwatch_model_info" in t["expr"] for t in p["targets"])
    ]
    assert models["type"] == "table"


@pytest.mark.parametrize("name", list(m.RENDERS))
def test_dashboard_ships_as_a_grafana_sidecar_configmap(
    rendered: dict[str, list[Obj]], name: str
) -> None:
    (config,) = [
        c
        for c in of_kind(rendered[name], "ConfigMap")
        if "synthwatch-dashboard.json" in c.get("data", {})
    ]
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config["data"]["synthwatch-dashboard.json"]) == json.loads(
        DASHBOARD.read_text()
    )


# -- Prometheus Operator --------------------------------------------------------------

OPERATIONS = m.ROOT / "docs" / "OPERATIONS.md"
JOB = "synthwatch"
"""The job label of every series scraped through the ServiceMonitor (its jobLabel)."""
SEVERITIES = ("critical", "warning", "info")
ALERTS = {
    "SynthwatchLagGrowingAtCeiling",
    "SynthwatchDeadLettersOurFault",
    "SynthwatchSinkDeadLettering",
    "SynthwatchDependencyDown",
    "SynthwatchDlqGuardTripped",
    "SynthwatchEndToEndLatencyHigh",
    "SynthwatchBatchFillLowUnderLoad",
    "SynthwatchInconclusiveShareHigh",
    "SynthwatchPipelineStalled",
    "SynthwatchRecordStuck",
    "SynthwatchTargetDown",
    "SynthwatchMetricsAbsent",
}
"""What an operator needs to be told about (docs/OPERATIONS.md, "Read the dashboard")."""
DURATION = re.compile(r"([0-9]+)(ms|s|m|h|d|w|y)")
SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def seconds(duration: str) -> float:
    parts = DURATION.findall(duration)
    assert "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(int(n) * SECONDS[u] for n, u in parts)


def monitoring_objects(objs: Sequence[Obj]) -> tuple[Obj, Obj]:
    (monitor,) = of_kind(objs, "ServiceMonitor")
    (rule,) = of_kind(objs, "PrometheusRule")
    return monitor, rule


def markdown_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (fenced code left out)."""
    anchors: set[str] = set()
    fenced = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"^#{1,6} (.+)$", line)):
            text = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def docs_base_url() -> str:
    """Where the repository's files are browsed: the image's source label, branch main."""
    (source,) = re.findall(
        r'org\.opencontainers\.image\.source="([^"]+)"', (m.ROOT / "Dockerfile").read_text()
    )
    return f"{source}/blob/main/"


@pytest.mark.parametrize("name", list(m.RENDERS))
def test_prometheus_operator_objects_come_only_with_the_component(
    rendered: dict[str, list[Obj]], name: str
) -> None:
    kinds = sorted(o["kind"] for o in rendered[name] if m.is_prometheus_operator(o))
    if name in OPERATOR_RENDERS:
        assert kinds == ["PrometheusRule", "ServiceMonitor"]
    else:
        # Opt-in: a cluster without the operator's CRDs would refuse them.
        assert kinds == []


@pytest.mark.parametrize("name", OPERATOR_RENDERS)
def test_prometheus_operator_objects_are_valid_against_the_crds(
    rendered: dict[str, list[Obj]], prometheus_operator_crds: Path, tools: m.Tools, name: str
) -> None:
    objs = [o for o in rendered[name] if m.is_prometheus_operator(o)]
    crds, version = prometheus_operator_crds, tools.kubernetes_version
    errors = [e for o in objs for e in m.validate_prometheus_operator(o, crds, version)]
    assert not errors, "\n".join(errors)
    # The validation is strict: a misspelt field is an error, as the API server's strict
    # field validation makes it.
    monitor = copy.deepcopy(monitoring_objects(rendered[name])[0])
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    assert m.validate_prometheus_operator(
        monitor, prometheus_operator_crds, tools.kubernetes_version
    )


@pytest.mark.parametrize("name", OPERATOR_RENDERS)
def test_service_monitor_scrapes_every_worker_through_the_metrics_service(
    rendered: dict[str, list[Obj]], name: str
) -> None:
    objs = rendered[name]
    monitor, rule = monitoring_objects(objs)
    (service,) = of_kind(objs, "Service")
    spec = monitor["spec"]
    # It selects the metrics Service, in its own namespace.
    assert "namespaceSelector" not in spec
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert selects(spec["selector"], service["metadata"]["labels"])
    # The job the rules query is the Service's jobLabel value.
    assert service["metadata"]["labels"][spec["jobLabel"]] == JOB
    annotations = service["metadata"]["annotations"]
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    (endpoint,) = spec["endpoints"]
    # The port by name, on the Service, where every worker serves /metrics.
    assert endpoint["port"] in ports
    assert ports[endpoint["port"]]["port"] == WEB_PORT
    assert endpoint["path"] == annotations["prometheus.io/path"] == "/metrics"
    assert endpoint.get("scheme", "http") == annotations["prometheus.io/scheme"]
    # Every worker (the sink and a canary too) is behind that Service, each with a role.
    for deployment in of_kind(objs, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selects({"matchLabels": service["spec"]["selector"]}, labels)
        assert labels["app.kubernetes.io/component"]
        ports_of = {p["name"] for p in worker_container(deployment)["ports"]}
        assert ports[endpoint["port"]]["targetPort"] in ports_of
    # Every series keeps the namespace and pod it came from, and the pod's role.
    relabeled = {
        r["targetLabel"]: r["sourceLabels"]
        for r in endpoint["relabelings"]
        if r.get("action", "replace") == "replace"
    }
    assert relabeled == {
        "namespace": ["__meta_kubernetes_namespace"],
        "pod": ["__meta_kubernetes_pod_name"],
        "role": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"],
    }
    assert endpoint.get("honorLabels", False) is False
    assert 0 < seconds(endpoint["scrapeTimeout"]) < seconds(endpoint["interval"]) <= 60
    # One Prometheus picks up both, by the same release label.
    assert monitor["metadata"]["labels"]["release"] == rule["metadata"]["labels"]["release"]


@pytest.mark.parametrize("name", OPERATOR_RENDERS)
def test_rules_query_only_served_metrics_with_their_labels(
    rendered: dict[str, list[Obj]], name: str
) -> None:
    monitor, rule = monitoring_objects(rendered[name])
    targets = m.target_labels(monitor)
    assert {"namespace", "pod", "role", "job"} <= targets
    errors = m.rule_name_errors(rule["spec"], m.metric_catalogue(METRICS), targets)
    assert not errors, "\n".join(errors)
    recorded = {r["record"] for r in m.rules(rule["spec"]) if "record" in r}
    for r in m.rules(rule["spec"]):
        for selector in m.promql_names(str(r["expr"])).selectors:
            # Scraped series only from the ServiceMonitor's job, not another job that
            # happens to serve a metric of the same name.
            if selector.name not in recorded:
                assert ("job", "=", JOB) in selector.matchers, (r.get("alert"), selector)


def test_rule_name_check_catches_unserved_metrics_and_labels() -> None:
    spec = {
        "groups": [
            {
                "name": "bad",
                "rules": [
                    {"record": "ns:x:sum", "expr": "sum by (namespace) (synthwatch_alerts_total)"},
                    {
                        "alert": "Bad",
                        "expr": 'sum by (topc) (synthwatch_consumer_lag{stage="x"})'
                        " + kube_pod_info + synthwatch_batch_size"
                        ' + ns:x:sum{decision="flag"} + ns:y:sum',
                    },
                ],
            }
        ]
    }
    errors = m.rule_name_errors(spec, m.metric_catalogue(METRICS), {"job", "namespace"})
    assert len(errors) == 6, errors
    for fragment in (
        "synthwatch_consumer_lag has no label 'stage'",
        "kube_pod_info is neither",
        "synthwatch_batch_size is neither",  # a histogram is served as _bucket/_sum/_count
        "ns:x:sum has no label 'decision'",
        "ns:y:sum is neither",
        "groups by 'topc'",
    ):
        assert any(fragment in e for e in errors), fragment


@pytest.mark.parametrize("name", OPERATOR_RENDERS)
def test_rules_pass_promtool_check_and_their_unit_tests(
    rendered: dict[str, list[Obj]], promtool: str, name: str
) -> None:
    _, rule = monitoring_objects(rendered[name])
    errors = m.promtool_errors(promtool, rule["spec"])
    assert not errors, "\n".join(errors)
    # promtool passes a test of an alert that does not exist as long as it expects no
    # alert: every alert tested must be a rule. promtool compares the whole set of firing
    # alerts at each eval_time, so the healthy series beside the crafted ones are shown
    # silent; these are shown firing.
    tests = yaml.safe_load(m.RULE_TESTS.read_text())
    alerts = {r["alert"] for r in m.rules(rule["spec"]) if "alert" in r}
    tested = [c for t in tests["tests"] for c in t.get("alert_rule_test", [])]
    assert {c["alertname"] for c in tested} <= alerts
    assert {c["alertname"] for c in tested if c.get("exp_alerts")} >= {
        "SynthwatchLagGrowingAtCeiling",
        "SynthwatchDeadLettersOurFault",
        "SynthwatchPipelineStalled",
        "SynthwatchDependencyDown",
        "SynthwatchEndToEndLatencyHigh",
        "SynthwatchRecordStuck",
    }
    assert tests["rule_files"] == [m.RULES_FILE]


def test_promtool_unit_tests_fail_on_a_broken_rule(
    rendered: dict[str, list[Obj]], promtool: str
) -> None:
    # The unit tests are not vacuous: without the `for`, a dependency that missed its
    # probes for 3 minutes pages, and the test says so.
    _, rule = monitoring_objects(rendered[OPERATOR_RENDERS[0]])
    spec = copy.deepcopy(rule["spec"])
    (down,) = [r for r in m.rules(spec) if r.get("alert") == "SynthwatchDependencyDown"]
    del down["for"]
    errors = m.promtool_errors(promtool, spec)
    assert len(errors) == 1 and "SynthwatchDependencyDown" in errors[0], errors


@pytest.mark.parametrize("name", OPERATOR_RENDERS)
def test_alerts_say_how_bad_what_happened_and_what_to_do(
    rendered: dict[str, list[Obj]], name: str
) -> None:
    _, rule = monitoring_objects(rendered[name])
    anchors = markdown_anchors(OPERATIONS)
    base = docs_base_url() + OPERATIONS.relative_to(m.ROOT).as_posix() + "#"
    alerts = [r for r in m.rules(rule["spec"]) if "alert" in r]
    assert {a["alert"] for a in alerts} == ALERTS
    for alert in alerts:
        where = alert["alert"]
        # Pending long enough to mean it, not a scrape's hiccup.
        assert seconds(alert["for"]) >= 60, where
        assert alert["labels"]["severity"] in SEVERITIES, where
        notes = alert["annotations"]
        assert set(notes) == {"summary", "description", "runbook_url"}, where
        assert notes["summary"].strip() and len(notes["description"]) > len(notes["summary"])
        assert notes["runbook_url"].startswith(base), where
        assert notes["runbook_url"].removeprefix(base) in anchors, where
    for record in (r for r in m.rules(rule["spec"]) if "record" in r):
        # level:metric:operations, and nothing only an alert may have.
        assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", record["record"]), record
        assert not {"for", "labels", "annotations"} & set(record), record["record"]


@pytest.mark.parametrize("name", OPERATOR_RENDERS)
def test_operations_md_lists_every_alert(rendered: dict[str, list[Obj]], name: str) -> None:
    _, rule = monitoring_objects(rendered[name])
    section = OPERATIONS.read_text().split("## Read the dashboard\n", 1)[1].split("\n## ", 1)[0]
    for alert in (r for r in m.rules(rule["spec"]) if "alert" in r):
        assert f"`{alert['alert']}`" in section, alert["alert"]
        assert f"({alert['labels']['severity']})" in section.split(f"`{alert['alert']}`")[1][:40]


def test_rule_topics_are_the_topics_the_roles_consume(
    rendered: dict[str, list[Obj]],
) -> None:
    # The rules name topics (as the ScaledObjects do): each role's pods must be counted
    # as consumers of the topic its ScaledObject scales on, in every render.
    _, rule = monitoring_objects(rendered[OPERATOR_RENDERS[0]])
    record = "namespace_topic:synthwatch_consumers:count"
    (consumers,) = [r for r in m.rules(rule["spec"]) if r.get("record") == record]
    pairs = re.findall(
        r'role(=~|=)"([^"]+)"\}\)\s*,\s*"topic"\s*,\s*"([^"]+)"', str(consumers["expr"])
    )
    assert len(pairs) == str(consumers["expr"]).count("label_replace")

    def topic_of(role: str) -> str | None:
        for op, value, topic in pairs:
            if (op == "=" and role == value) or (op == "=~" and re.fullmatch(value, role)):
                return topic
        return None

    consumed: set[str] = set()
    for name, objs in rendered.items():
        scaled = {
            s["spec"]["scaleTargetRef"]["name"]: s["spec"]["triggers"][0]["metadata"]["topic"]
            for s in of_kind(objs, "ScaledObject")
        }
        by_role = {role: scaled.get(d["metadata"]["name"]) for role, d in workers(objs).items()}
        for role in by_role:
            topic = by_role[role] or by_role[worker_role(role)]
            assert topic_of(role) == topic, (name, role)
            consumed.add(str(topic))
    # Every topic a rule names is one a role consumes, or the retry topic.
    retry = Settings().kafka.topic_retry
    for r in m.rules(rule["spec"]):
        for selector in m.promql_names(str(r["expr"])).selectors:
            for label, op, value in selector.matchers:
                if label == "topic":
                    names = value.split("|") if op in ("=~", "!~") else [value]
                    assert set(names) <= consumed | {retry}, (r.get("alert"), value)


def test_readme_prometheus_operator_section_is_the_tested_one(
    rendered: dict[str, list[Obj]], tools: m.Tools, tmp_path: Path
) -> None:
    # What k8s/README.md tells an operator to add to the overlay renders the tested
    # objects, with the release label of their kube-prometheus-stack.
    readme = (m.K8S / "README.md").read_text()
    section = readme.split("## Prometheus Operator (opt-in)\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    addition = yaml.safe_load(block)
    shutil.copytree(m.K8S, tmp_path / "k8s")
    overlay = tmp_path / "k8s" / "overlays" / "cpu" / "kustomization.yaml"
    kustomization = yaml.safe_load(overlay.read_text())
    assert not set(addition) & set(kustomization)
    overlay.write_text(yaml.safe_dump({**kustomization, **addition}, sort_keys=False))
    got = m.build(tools.kustomize, overlay.parent)
    want = copy.deepcopy(rendered["cpu+prometheus-operator"])
    (release,) = re.findall(r"value: (\S+)", block)
    for obj in want:
        if m.is_prometheus_operator(obj):
            assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"
            obj["metadata"]["labels"]["release"] = release

    def key(o: Obj) -> tuple[str, str]:
        return o["kind"], o["metadata"]["name"]

    assert sorted(got, key=key) == sorted(want, key=key)
    assert release != "kube-prometheus-stack"


# -- image ----------------------------------------------------------------------------


def test_dockerfile_passes_hadolint(tools: m.Tools) -> None:
    if not tools.hadolint:
        pytest.skip(f"hadolint unavailable: {tools.errors[-500:]}")
    proc = subprocess.run(
        [
            tools.hadolint,
            "--no-color",
            "--config",
            str(m.ROOT / ".hadolint.yaml"),
            str(m.ROOT / "Dockerfile"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_runs_the_worker_with_a_healthcheck_on_the_liveness_endpoint() -> None:
    text = (m.ROOT / "Dockerfile").read_text()
    instructions = re.sub(r"\\\n\s*", " ", text)
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", instructions, re.MULTILINE | re.IGNORECASE)
    assert {"cpu", "gpu"} <= set(stages)
    assert stages[-1] == "cpu"  # a plain `docker build .` gives the CPU image
    (health,) = re.findall(r"^HEALTHCHECK .*$", instructions, re.MULTILINE)
    assert "http://127.0.0.1:" in health and "/health/live" in health
    assert re.search(r'^ENTRYPOINT \["synthwatch"\]$', instructions, re.MULTILINE)
    assert re.search(r'^CMD \["worker", "--role", "all"\]$', instructions, re.MULTILINE)
    for env in ("HOME=/tmp", "SYNTHWATCH_WEB_HOST=0.0.0.0", "SYNTHWATCH_MODEL_DIR=/models"):
        assert env in instructions


def test_build_context_holds_only_what_the_image_installs() -> None:
    patterns = [
        line.strip()
        for line in (m.ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    copied = set(
        re.findall(r"^COPY (?!--from)(.+) \S+$", (m.ROOT / "Dockerfile").read_text(), re.MULTILINE)
    )
    sources = {s for line in copied for s in shlex.split(line)}
    for source in sources:
        assert f"!{source}" in patterns or f"!{source}/" in patterns, source
