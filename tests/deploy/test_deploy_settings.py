"""The manifests agree with the worker: settings it understands, its ports, paths and topics."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest
from deploy_helpers import Overlay, all_containers, container, render_overlay

from worker.config import Settings


def _settings(overlay: Overlay) -> Settings:
    return Settings.from_env(overlay.config)


def _worker(overlay: Overlay) -> dict:
    return container(overlay.one("StatefulSet")["spec"]["template"]["spec"], "worker")


def _broker_ports(settings: Settings) -> set[int]:
    return {int(address.rpartition(":")[2]) for address in settings.bootstrap_servers.split(",")}


def test_config_keys_are_worker_settings(overlay: Overlay) -> None:
    unknown = sorted(set(overlay.config) - set(Settings.env_names()))

    assert unknown == [], "the worker ignores these keys; python -m worker --settings lists the valid ones"


def test_config_parses_as_valid_settings(overlay: Overlay) -> None:
    settings = _settings(overlay)

    assert settings.partitions >= 1


def test_config_has_pod_settings(overlay: Overlay) -> None:
    config = overlay.config

    assert config["STREAMREC_WEB_HOST"] == "0.0.0.0"
    assert config["STREAMREC_CREATE_TOPICS"] == "false", "the topic-setup Job creates the topics"
    assert config["STREAMREC_LOG_FORMAT"] == "json"
    assert config["STREAMREC_BROKER"].startswith("kafka://")


def test_shutdown_ends_before_the_grace_period(overlay: Overlay) -> None:
    grace_s = overlay.one("StatefulSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]

    assert _settings(overlay).shutdown_timeout_s < grace_s, "the kubelet would SIGKILL a worker that is still shutting down"


def test_keda_max_replicas_equals_partitions(overlay: Overlay) -> None:
    spec = overlay.one("ScaledObject")["spec"]

    assert spec["maxReplicaCount"] == _settings(overlay).partitions


def test_keda_min_replicas_at_most_max(overlay: Overlay) -> None:
    spec = overlay.one("ScaledObject")["spec"]

    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]


def test_keda_trigger_matches_settings(overlay: Overlay) -> None:
    settings = _settings(overlay)
    (trigger,) = overlay.one("ScaledObject")["spec"]["triggers"]
    metadata = trigger["metadata"]

    assert metadata["consumerGroup"] == settings.app_id
    assert metadata["topic"] == settings.events_topic
    assert metadata["bootstrapServers"] == settings.bootstrap_servers
    assert metadata["allowIdleConsumers"] == "false"


def test_pods_read_generated_config_map(overlay: Overlay) -> None:
    config_map_name = overlay.one("ConfigMap")["metadata"]["name"]
    job_container = container(overlay.one("Job")["spec"]["template"]["spec"], "create-topics")

    assert _worker(overlay)["envFrom"] == [{"configMapRef": {"name": config_map_name}}]
    assert job_container["envFrom"] == [{"configMapRef": {"name": config_map_name}}]


def test_ports_match_web_port(overlay: Overlay) -> None:
    web_port = _settings(overlay).web_port
    worker = _worker(overlay)
    ingress = overlay.one("NetworkPolicy")["spec"]["ingress"]

    assert worker["ports"] == [{"name": "http", "containerPort": web_port, "protocol": "TCP"}]
    for service in overlay.all("Service"):
        assert service["spec"]["ports"] == [{"name": "http", "port": web_port, "targetPort": "http", "protocol": "TCP"}]
    assert ingress == [{"ports": [{"port": web_port, "protocol": "TCP"}]}]


@pytest.mark.parametrize(
    ("probe", "path"), [("startupProbe", "/readyz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]
)
def test_probe_uses_worker_endpoint(overlay: Overlay, probe: str, path: str) -> None:
    assert _worker(overlay)[probe]["httpGet"] == {"path": path, "port": "http"}


def test_startup_probe_allows_two_minutes(overlay: Overlay) -> None:
    probe = _worker(overlay)["startupProbe"]

    assert probe["periodSeconds"] * probe["failureThreshold"] >= 120


def test_state_dir_on_persistent_volume(overlay: Overlay) -> None:
    statefulset = overlay.one("StatefulSet")
    state_dir = str(_settings(overlay).state_dir)
    mounts = {m["mountPath"]: m for m in _worker(overlay)["volumeMounts"]}
    claim_names = [t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]]

    assert mounts[state_dir]["name"] in claim_names
    assert not mounts[state_dir].get("readOnly", False)


def test_bundle_dir_filled_by_init_container(overlay: Overlay) -> None:
    spec = overlay.one("StatefulSet")["spec"]["template"]["spec"]
    bundle_dir = str(_settings(overlay).bundle_dir)
    worker_mounts = {m["mountPath"]: m for m in _worker(overlay)["volumeMounts"]}
    copy_bundle = container(spec, "copy-bundle")
    copy_mounts = {m["name"]: m["mountPath"] for m in copy_bundle["volumeMounts"]}
    volume = worker_mounts[bundle_dir]["name"]

    assert worker_mounts[bundle_dir]["readOnly"] is True
    assert "emptyDir" in {v["name"]: v for v in spec["volumes"]}[volume]
    # cp -R SOURCE/. TARGET copies the bundle's files into the volume the worker reads.
    assert copy_bundle["command"][:2] == ["cp", "-R"]
    assert PurePosixPath(copy_bundle["command"][-1]) == PurePosixPath(copy_mounts[volume])


def test_python_containers_have_writable_tmp(overlay: Overlay) -> None:
    # The image sets HOME=/tmp, and onnxruntime writes a cache below $HOME.
    for obj in (overlay.one("StatefulSet"), overlay.one("Job")):
        spec = obj["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in all_containers(spec):
            if c["command"][0] != "python":
                continue
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1, f"{obj['kind']} container {c['name']} has no /tmp volume"
            assert "emptyDir" in volumes[tmp[0]["name"]]


def test_worker_waits_for_topics(overlay: Overlay) -> None:
    spec = overlay.one("StatefulSet")["spec"]["template"]["spec"]
    wait = container(spec, "wait-for-topics")

    assert wait in spec["initContainers"]
    assert wait["command"][:4] == ["python", "-m", "worker.create_topics", "--check"]
    assert wait["image"] == _worker(overlay)["image"]
    assert wait["envFrom"] == _worker(overlay)["envFrom"]


def test_job_runs_create_topics(overlay: Overlay) -> None:
    job = overlay.one("Job")
    spec = job["spec"]["template"]["spec"]
    create_topics = container(spec, "create-topics")

    assert create_topics["command"][:3] == ["python", "-m", "worker.create_topics"]
    assert create_topics["image"] == _worker(overlay)["image"]
    assert spec["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] >= 1


def test_network_policy_allows_dns_and_kafka(overlay: Overlay) -> None:
    egress = overlay.one("NetworkPolicy")["spec"]["egress"]
    allowed = {(port["protocol"], port["port"]) for rule in egress for port in rule["ports"]}

    assert {("UDP", 53), ("TCP", 53)} <= allowed
    for port in _broker_ports(_settings(overlay)):
        assert ("TCP", port) in allowed


def test_statefulset_keeps_state_per_pod(overlay: Overlay) -> None:
    spec = overlay.one("StatefulSet")["spec"]

    assert spec["podManagementPolicy"] == "Parallel"
    assert [t["metadata"]["name"] for t in spec["volumeClaimTemplates"]] == ["data"]
    assert spec["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] >= 30
    assert spec["updateStrategy"]["type"] == "RollingUpdate"


def test_prod_uses_strimzi_bootstrap() -> None:
    settings = _settings(render_overlay("prod"))

    assert settings.bootstrap_servers == "my-cluster-kafka-bootstrap.kafka.svc:9092"
    assert settings.replication_factor == 3


def test_overlays_differ_in_size() -> None:
    dev, prod = render_overlay("dev"), render_overlay("prod")

    assert _settings(dev).partitions < _settings(prod).partitions
    assert _settings(dev).bootstrap_servers != _settings(prod).bootstrap_servers
    assert dev.one("ScaledObject")["spec"]["minReplicaCount"] < prod.one("ScaledObject")["spec"]["minReplicaCount"]
    assert _worker(dev)["resources"] != _worker(prod)["resources"]
