"""The Python kustomize renderer: its merge rules, and agreement with `kubectl kustomize` where kubectl exists."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_helpers import K8S_DIR, Overlay
from kustomize_render import RenderError, config_map_hash, json_merge, render, split_image, strategic_merge

EXPECTED_KINDS = {
    "ConfigMap": 1,
    "ServiceAccount": 1,
    "StatefulSet": 1,
    "Service": 2,
    "ServiceMonitor": 1,
    "PodDisruptionBudget": 1,
    "NetworkPolicy": 1,
    "Job": 1,
    "ScaledObject": 1,
}


def _by_kind_and_name(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects}


def _statefulset(containers: list[dict]) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "s"},
        "spec": {"template": {"spec": {"containers": containers}}},
    }


def test_overlay_renders_expected_kinds(overlay: Overlay) -> None:
    counts = {kind: len(overlay.all(kind)) for kind in EXPECTED_KINDS}

    assert counts == EXPECTED_KINDS
    assert len(overlay.objects) == sum(EXPECTED_KINDS.values())


def test_overlay_sets_namespace(overlay: Overlay) -> None:
    namespaces = {obj["metadata"].get("namespace") for obj in overlay.objects}

    assert namespaces == {"streamrec-dev" if overlay.name == "dev" else "streamrec"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
@pytest.mark.parametrize("directory", ["base", "overlays/dev", "overlays/prod"])
def test_renderer_matches_kubectl_kustomize(directory: str) -> None:
    # `kubectl kustomize` reads local files only; nothing contacts a cluster.
    completed = subprocess.run(
        ["kubectl", "kustomize", str(K8S_DIR / directory)], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    theirs = _by_kind_and_name([obj for obj in yaml.safe_load_all(completed.stdout) if obj])

    ours = _by_kind_and_name(render(K8S_DIR / directory))

    assert sorted(ours) == sorted(theirs)
    for key, obj in ours.items():
        assert obj == theirs[key], f"{key} differs from kubectl kustomize"


def test_config_map_hash_matches_kustomize() -> None:
    # kubectl kustomize (kustomize v5.5.0) named a ConfigMap generated from A=1 "c-89g4tffbfk".
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"A": "1"}}

    assert config_map_hash(body) == "89g4tffbfk"


def test_keyed_list_merged_patch_order_first() -> None:
    original = _statefulset([{"name": "first", "image": "f:1"}, {"name": "w", "image": "x:1", "env": [
        {"name": "A", "value": "1"}, {"name": "B", "value": "2"}, {"name": "C", "value": "3"}]}])
    patch = _statefulset([{"name": "w", "env": [
        {"name": "C", "value": "c"}, {"name": "B", "value": "3"}, {"name": "D", "value": "d"}]}, {"name": "new", "image": "y:2"}])

    merged = strategic_merge(original, patch, "StatefulSet")
    containers = merged["spec"]["template"]["spec"]["containers"]

    assert [c["name"] for c in containers] == ["w", "new", "first"]
    assert containers[0]["image"] == "x:1"
    assert containers[0]["env"] == [
        {"name": "C", "value": "c"}, {"name": "B", "value": "3"}, {"name": "D", "value": "d"}, {"name": "A", "value": "1"}]


def test_atomic_list_replaced_whole() -> None:
    original = _statefulset([{"name": "w", "command": ["a", "b"]}])
    patch = _statefulset([{"name": "w", "command": ["c"]}])

    merged = strategic_merge(original, patch, "StatefulSet")

    assert merged["spec"]["template"]["spec"]["containers"][0]["command"] == ["c"]


def test_null_in_patch_deletes_key() -> None:
    original = _statefulset([{"name": "w", "image": "x:1", "workingDir": "/srv"}])
    patch = _statefulset([{"name": "w", "workingDir": None}])

    merged = strategic_merge(original, patch, "StatefulSet")

    assert merged["spec"]["template"]["spec"]["containers"][0] == {"name": "w", "image": "x:1"}


def test_unknown_list_strategy_raises() -> None:
    original = _statefulset([{"name": "w"}])
    original["spec"]["template"]["spec"]["hostAliases"] = [{"ip": "10.0.0.1", "hostnames": ["a"]}]
    patch = {"kind": "StatefulSet", "spec": {"template": {"spec": {"hostAliases": []}}}}

    with pytest.raises(RenderError, match="hostAliases: this renderer does not know the list's merge strategy"):
        strategic_merge(original, patch, "StatefulSet")


def test_patch_directive_raises() -> None:
    with pytest.raises(RenderError, match="patch directives are not supported"):
        strategic_merge({"spec": {}}, {"spec": {"$patch": "replace"}}, "Service")


def test_json_merge_replaces_lists() -> None:
    target = {"spec": {"triggers": [{"type": "kafka", "metadata": {"a": "1", "b": "2"}}], "min": 1, "keep": True}}
    patch = {"spec": {"triggers": [{"type": "kafka", "metadata": {"a": "9"}}], "min": None}}

    assert json_merge(target, patch) == {"spec": {"triggers": [{"type": "kafka", "metadata": {"a": "9"}}], "keep": True}}


@pytest.mark.parametrize(
    ("image", "parts"),
    [
        ("busybox", ("busybox", None, None)),
        ("busybox:1.36.1", ("busybox", "1.36.1", None)),
        ("registry.example.com:5000/streamrec/worker", ("registry.example.com:5000/streamrec/worker", None, None)),
        ("registry.example.com:5000/streamrec/worker:0.1.0", ("registry.example.com:5000/streamrec/worker", "0.1.0", None)),
        ("r.example.com/w@sha256:abc", ("r.example.com/w", None, "sha256:abc")),
    ],
)
def test_split_image(image: str, parts: tuple) -> None:
    assert split_image(image) == parts


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_images_and_generator_rename(tmp_path: Path) -> None:
    _write(tmp_path / "base" / "kustomization.yaml", "resources: [job.yaml]\nconfigMapGenerator:\n- name: c\n  literals: [A=1]\n")
    _write(tmp_path / "base" / "job.yaml", """
apiVersion: batch/v1
kind: Job
metadata: {name: j}
spec:
  template:
    spec:
      containers:
        - name: x
          image: registry.example.com/x:1
          envFrom: [{configMapRef: {name: c}}]
""")
    _write(tmp_path / "overlay" / "kustomization.yaml", """
namespace: ns
resources: [../base]
configMapGenerator:
- {name: c, behavior: merge, literals: [B=2]}
images:
- {name: registry.example.com/x, newTag: "2"}
""")

    objects = _by_kind_and_name(render(tmp_path / "overlay"))
    config_maps = [obj for (kind, _), obj in objects.items() if kind == "ConfigMap"]
    job_container = objects[("Job", "j")]["spec"]["template"]["spec"]["containers"][0]

    assert len(config_maps) == 1
    assert config_maps[0]["data"] == {"A": "1", "B": "2"}
    assert config_maps[0]["metadata"]["name"] == f"c-{config_map_hash(config_maps[0])}"
    assert job_container["envFrom"][0]["configMapRef"]["name"] == config_maps[0]["metadata"]["name"]
    assert job_container["image"] == "registry.example.com/x:2"
    assert {obj["metadata"]["namespace"] for obj in objects.values()} == {"ns"}


def test_unsupported_field_raises(tmp_path: Path) -> None:
    _write(tmp_path / "kustomization.yaml", "namePrefix: x-\nresources: []\n")

    with pytest.raises(RenderError, match=r"fields \['namePrefix'\] are not supported"):
        render(tmp_path)


def test_patch_without_target_raises(tmp_path: Path) -> None:
    _write(tmp_path / "kustomization.yaml", "resources: []\npatches:\n- path: p.yaml\n")
    _write(tmp_path / "p.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: missing}\n")

    with pytest.raises(RenderError, match="patch for Service/missing matches 0 resources"):
        render(tmp_path)
