"""Shared helpers for the deployment tests: paths, rendered overlays and pod specs."""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from kustomize_render import BUILT_IN_GROUPS, pod_spec, render

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "streamrec-dashboard.json"

# Kubernetes versions whose schemas every built-in object must pass: 1.30, the oldest
# release deploy/k8s/README.md supports, and a recent one.
KUBERNETES_VERSIONS = ("1.30", "1.33")

# The only custom resources the manifests may contain. kubernetes-validate has no schema
# for them, so test_deploy_schemas checks their structure itself.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}


@dataclass(frozen=True)
class Overlay:
    name: str
    objects: tuple[dict[str, Any], ...]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        """Return the single object of `kind` (and `name`, if given), failing unless exactly one exists."""
        matches = [obj for obj in self.all(kind) if name is None or obj["metadata"]["name"] == name]
        assert len(matches) == 1, f"{self.name}: expected one {kind} {name or ''}, found {len(matches)}"
        return matches[0]

    @property
    def config(self) -> dict[str, str]:
        """The data of the STREAMREC_* ConfigMap the pods read."""
        return self.one("ConfigMap")["data"]


@functools.lru_cache(maxsize=None)
def render_overlay(name: str) -> Overlay:
    return Overlay(name, tuple(render(K8S_DIR / "overlays" / name)))


def is_built_in(obj: dict[str, Any]) -> bool:
    return obj["apiVersion"].rpartition("/")[0] in BUILT_IN_GROUPS


def workloads(overlay: Overlay) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Yield (object, pod spec) for every object that runs pods."""
    for obj in overlay.objects:
        spec = pod_spec(obj)
        if spec is not None:
            yield obj, spec


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec.get("containers", [])


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    matches = [c for c in all_containers(spec) if c["name"] == name]
    assert len(matches) == 1, f"expected one container {name!r}, found {len(matches)}"
    return matches[0]


def label_selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def find_checkov() -> str | None:
    """Return the checkov executable: $CHECKOV, .venv/tools/checkov, then PATH.

    checkov 3.3.30 pins networkx<2.7 and packaging<24, which conflict with the project's
    constraints, so it lives in its own virtual environment below .venv.
    """
    candidates = [os.environ.get("CHECKOV"), str(REPO_ROOT / ".venv" / "tools" / "checkov" / "bin" / "checkov"), shutil.which("checkov")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None
