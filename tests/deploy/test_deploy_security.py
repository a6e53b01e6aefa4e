"""Security and reliability rules for the rendered manifests and the Dockerfile.

The rules are checked twice. Explicit checks here always run. checkov runs when it is
installed, which takes its own virtual environment (deploy_helpers.find_checkov). Every
check that checkov skips must carry a reason in the manifests and appear in the README's
table of exceptions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from deploy_helpers import K8S_DIR, REPO_ROOT, Overlay, all_containers, find_checkov, workloads
from kustomize_render import split_image

README = K8S_DIR / "README.md"
SKIP_ANNOTATION = re.compile(r"^checkov\.io/skip\d+$")


def _pod_rules() -> dict[str, Callable[[dict[str, Any], dict[str, Any]], bool]]:
    """Rules on a pod spec; each returns True when the spec complies."""
    return {
        "service account token not mounted": lambda spec, service_account: spec.get("automountServiceAccountToken") is False,
        "dedicated service account": lambda spec, service_account: spec.get("serviceAccountName") == service_account["metadata"]["name"],
        "runs as non-root": lambda spec, service_account: spec["securityContext"].get("runAsNonRoot") is True,
        "runs as a high UID": lambda spec, service_account: spec["securityContext"].get("runAsUser", 0) >= 10000,
        "seccomp RuntimeDefault": lambda spec, service_account: spec["securityContext"].get("seccompProfile") == {"type": "RuntimeDefault"},
        "no host namespaces": lambda spec, service_account: not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")),
        "no hostPath volumes": lambda spec, service_account: not any("hostPath" in v for v in spec.get("volumes", [])),
        "no service links": lambda spec, service_account: spec.get("enableServiceLinks") is False,
    }


def _container_rules() -> dict[str, Callable[[dict[str, Any]], bool]]:
    """Rules on one container or initContainer; each returns True when it complies."""

    def resources_set(c: dict[str, Any]) -> bool:
        resources = c.get("resources", {})
        return all(r in resources.get(part, {}) for part in ("requests", "limits") for r in ("cpu", "memory"))

    def image_pinned(c: dict[str, Any]) -> bool:
        _, tag, digest = split_image(c["image"])
        return bool(digest) or (tag is not None and tag != "latest")

    return {
        "no privilege escalation": lambda c: c["securityContext"].get("allowPrivilegeEscalation") is False,
        "not privileged": lambda c: c["securityContext"].get("privileged", False) is False,
        "read-only root filesystem": lambda c: c["securityContext"].get("readOnlyRootFilesystem") is True,
        "drops all capabilities": lambda c: c["securityContext"].get("capabilities", {}).get("drop") == ["ALL"],
        "adds no capabilities": lambda c: not c["securityContext"].get("capabilities", {}).get("add"),
        "cpu and memory requests and limits": resources_set,
        "image tag pinned": image_pinned,
        "image pulled on every start": lambda c: c.get("imagePullPolicy") == "Always",
    }


@pytest.mark.parametrize("rule", sorted(_pod_rules()))
def test_pod_rule(overlay: Overlay, rule: str) -> None:
    check = _pod_rules()[rule]
    service_account = overlay.one("ServiceAccount")

    violations = [obj["metadata"]["name"] for obj, spec in workloads(overlay) if not check(spec, service_account)]

    assert violations == []


@pytest.mark.parametrize("rule", sorted(_container_rules()))
def test_container_rule(overlay: Overlay, rule: str) -> None:
    check = _container_rules()[rule]

    violations = [
        f"{obj['metadata']['name']}/{c['name']}" for obj, spec in workloads(overlay) for c in all_containers(spec) if not check(c)
    ]

    assert violations == []


def test_service_account_token_off(overlay: Overlay) -> None:
    assert overlay.one("ServiceAccount")["automountServiceAccountToken"] is False


def test_every_pod_has_network_policy(overlay: Overlay) -> None:
    selector = overlay.one("NetworkPolicy")["spec"]["podSelector"]["matchLabels"]
    policy_types = overlay.one("NetworkPolicy")["spec"]["policyTypes"]

    assert sorted(policy_types) == ["Egress", "Ingress"]
    for obj, _ in workloads(overlay):
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in selector.items()), obj["metadata"]["name"]


def test_disruption_budget_allows_one(overlay: Overlay) -> None:
    budget = overlay.one("PodDisruptionBudget")["spec"]

    assert budget["maxUnavailable"] == 1
    assert budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def _skip_annotations(overlay: Overlay) -> dict[str, list[str]]:
    """Map each skipped check id to the reasons given for it."""
    skipped: dict[str, list[str]] = {}
    for obj in overlay.objects:
        for key, value in obj["metadata"].get("annotations", {}).items():
            if SKIP_ANNOTATION.match(key):
                check_id, _, reason = value.partition("=")
                skipped.setdefault(check_id, []).append(reason)
    return skipped


def test_skipped_checks_have_reasons(overlay: Overlay) -> None:
    skipped = _skip_annotations(overlay)

    assert skipped, "expected the documented CKV_K8S_43 exception"
    for check_id, reasons in skipped.items():
        assert re.fullmatch(r"CKV2?_K8S_\d+", check_id), check_id
        assert all(len(reason.split()) >= 5 for reason in reasons), f"{check_id} needs a reason"


def test_skipped_checks_listed_in_readme(overlay: Overlay) -> None:
    readme = README.read_text()

    for check_id in _skip_annotations(overlay):
        assert f"`{check_id}`" in readme, f"{check_id} is skipped in the manifests but not listed in {README.name}"


def _run_checkov(arguments: list[str]) -> dict[str, Any]:
    checkov = find_checkov()
    if checkov is None:
        message = "checkov is not installed: run `make install`, or python -m venv .venv/tools/checkov && .venv/tools/checkov/bin/pip install checkov==3.3.30"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    # --skip-download: no calls to Prisma Cloud for guidelines or custom policies.
    completed = subprocess.run(
        [checkov, *arguments, "--skip-download", "--output", "json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    # checkov exits 1 when a check fails; anything else is a crash.
    assert completed.returncode in (0, 1), completed.stderr[-2000:]
    report = json.loads(completed.stdout)
    assert isinstance(report, dict), "expected one framework in the report"
    return report


def _failed(report: dict[str, Any]) -> list[str]:
    return [f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in report.get("results", {}).get("failed_checks", [])]


def test_checkov_passes_manifests(overlay: Overlay, tmp_path: Path) -> None:
    manifest = tmp_path / f"{overlay.name}.yaml"
    manifest.write_text(yaml.safe_dump_all(overlay.objects, sort_keys=False))

    report = _run_checkov(["--file", str(manifest), "--framework", "kubernetes"])
    skipped = {c["check_id"] for c in report["results"]["skipped_checks"]}

    assert _failed(report) == []
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["passed"] > 0
    assert skipped == set(_skip_annotations(overlay))


def test_checkov_passes_dockerfile() -> None:
    report = _run_checkov(["--file", str(REPO_ROOT / "Dockerfile"), "--framework", "dockerfile"])

    assert _failed(report) == []
    assert report["summary"]["passed"] > 0
    assert report["results"]["skipped_checks"] == []
