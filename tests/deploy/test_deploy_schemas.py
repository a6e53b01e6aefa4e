"""Every rendered object against the Kubernetes schemas (kubernetes-validate, offline), and
the two custom resources against structural schemas written here.

kubernetes-validate ships the schemas of built-in kinds only. The ServiceMonitor and
ScaledObject schemas below cover the fields these manifests use, with the types and
required fields that the Prometheus Operator (monitoring.coreos.com/v1) and KEDA 2.x
(keda.sh/v1alpha1) document. They are not the CRDs' full OpenAPI schemas.
"""

from __future__ import annotations

import copy

import jsonschema
import kubernetes_validate
import pytest
from deploy_helpers import CUSTOM_KINDS, KUBERNETES_VERSIONS, Overlay, is_built_in, label_selector_matches, render_overlay

_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _LABELS, "annotations": _LABELS},
}
_HPA_RULES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["type", "value", "periodSeconds"],
                "properties": {
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {"type": "integer", "minimum": 1},
                    "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
                },
            },
        },
    },
}

SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {"type": "object"},
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "scalingModifiers": {"type": "object"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "behavior": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {"scaleUp": _HPA_RULES, "scaleDown": _HPA_RULES},
                                },
                            },
                        },
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {"type": "object", "required": ["name"]},
                            # KEDA reads every trigger setting as a string.
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                    },
                },
            },
        },
    },
}

# The kafka scaler's settings used here; KEDA rejects a kafka trigger without
# bootstrapServers or consumerGroup.
KAFKA_TRIGGER_METADATA_SCHEMA = {
    "type": "object",
    "required": ["bootstrapServers", "consumerGroup", "topic", "lagThreshold"],
    "properties": {
        "lagThreshold": {"type": "string", "pattern": "^[1-9][0-9]*$"},
        "activationLagThreshold": {"type": "string", "pattern": "^[0-9]+$"},
        "offsetResetPolicy": {"enum": ["earliest", "latest"]},
        "allowIdleConsumers": {"enum": ["true", "false"]},
    },
}

SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": _LABELS, "matchExpressions": {"type": "array"}},
                },
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            # Prometheus durations such as 15s or 1m.
                            "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                        },
                    },
                },
            },
        },
    },
}


def _duration_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    raise ValueError(f"not a duration: {text}")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_built_in_objects_match_kubernetes_schema(overlay: Overlay, version: str) -> None:
    failures = []
    for obj in overlay.objects:
        if not is_built_in(obj):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}")

    assert failures == []


def test_strict_validation_rejects_misspelled_field() -> None:
    # Guards the test above: strict schemas must reject an unknown field.
    statefulset = copy.deepcopy(render_overlay("prod").one("StatefulSet"))
    statefulset["spec"]["template"]["spec"]["securityContxt"] = {}

    with pytest.raises(kubernetes_validate.ValidationError, match="securityContxt"):
        kubernetes_validate.validate(statefulset, KUBERNETES_VERSIONS[0], strict=True)


def test_only_known_custom_resources(overlay: Overlay) -> None:
    custom = {(obj["apiVersion"], obj["kind"]) for obj in overlay.objects if not is_built_in(obj)}

    assert custom == CUSTOM_KINDS


def test_scaled_object_structure(overlay: Overlay) -> None:
    scaled_object = overlay.one("ScaledObject")

    jsonschema.validate(scaled_object, SCALED_OBJECT_SCHEMA)
    for trigger in scaled_object["spec"]["triggers"]:
        assert trigger["type"] == "kafka"
        jsonschema.validate(trigger["metadata"], KAFKA_TRIGGER_METADATA_SCHEMA)


def test_scaled_object_schema_rejects_unknown_field() -> None:
    scaled_object = copy.deepcopy(render_overlay("prod").one("ScaledObject"))
    scaled_object["spec"]["maxReplicas"] = 3

    with pytest.raises(jsonschema.ValidationError, match="maxReplicas"):
        jsonschema.validate(scaled_object, SCALED_OBJECT_SCHEMA)


def test_scaled_object_targets_statefulset(overlay: Overlay) -> None:
    target = overlay.one("ScaledObject")["spec"]["scaleTargetRef"]
    statefulset = overlay.one("StatefulSet")

    assert target == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": statefulset["metadata"]["name"]}


def test_statefulset_leaves_replicas_to_keda(overlay: Overlay) -> None:
    assert "replicas" not in overlay.one("StatefulSet")["spec"]


def test_service_monitor_structure(overlay: Overlay) -> None:
    monitor = overlay.one("ServiceMonitor")

    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    for endpoint in monitor["spec"]["endpoints"]:
        assert _duration_seconds(endpoint["scrapeTimeout"]) < _duration_seconds(endpoint["interval"])


def test_service_monitor_selects_metrics_service(overlay: Overlay) -> None:
    monitor = overlay.one("ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]

    selected = [s for s in overlay.all("Service") if label_selector_matches(selector, s["metadata"].get("labels", {}))]

    assert [s["metadata"]["name"] for s in selected] == ["streamrec-metrics"], "exactly one Service, or pods are scraped twice"
    port_names = {port["name"] for port in selected[0]["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"


def test_services_select_worker_pods(overlay: Overlay) -> None:
    statefulset = overlay.one("StatefulSet")
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    headless = overlay.one("Service", statefulset["spec"]["serviceName"])

    assert headless["spec"]["clusterIP"] == "None"
    for service in overlay.all("Service"):
        assert label_selector_matches(service["spec"]["selector"], pod_labels), service["metadata"]["name"]


def test_selectors_match_pod_template(overlay: Overlay) -> None:
    statefulset = overlay.one("StatefulSet")
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    budget = overlay.one("PodDisruptionBudget")

    assert label_selector_matches(statefulset["spec"]["selector"]["matchLabels"], pod_labels)
    assert label_selector_matches(budget["spec"]["selector"]["matchLabels"], pod_labels)


def test_network_policy_selects_every_pod(overlay: Overlay) -> None:
    selector = overlay.one("NetworkPolicy")["spec"]["podSelector"]["matchLabels"]
    worker_labels = overlay.one("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    job_labels = overlay.one("Job")["spec"]["template"]["metadata"]["labels"]

    assert label_selector_matches(selector, worker_labels)
    assert label_selector_matches(selector, job_labels)
