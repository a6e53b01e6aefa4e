"""Render a kustomization directory in Python, for the subset of kustomize that deploy/k8s uses.

No kustomize binary is needed. Supported kustomization fields:

- `resources`: YAML files, and directories that hold a kustomization.yaml (rendered first);
- `namespace`: set on every resource;
- `images`: `name` with `newName`, `newTag` or `digest`, applied to every container and
  initContainer image;
- `configMapGenerator`: `literals` only, `behavior` create or merge, with kustomize's
  content-hash name suffix and the ConfigMap references in pod specs renamed to match;
- `patches`: `path` only, targeted by the patch's kind and metadata.name. Built-in kinds get
  a strategic-merge patch, custom resources a JSON merge patch (RFC 7386), as kustomize
  v5.5 does.

Anything else (another field, `$patch` directives, a patch on a list whose merge strategy
`_POD_SPEC_LISTS` and `_OBJECT_LISTS` do not name) raises RenderError, so an unsupported feature fails a test
instead of rendering something kustomize would not. The merge order of keyed lists and the
hash suffix were compared with `kubectl kustomize` (kustomize v5.5.0).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "configMapGenerator", "patches"}
BUILT_IN_GROUPS = {"", "apps", "batch", "policy", "networking.k8s.io", "autoscaling", "rbac.authorization.k8s.io"}

# Replace the whole list, as strategic merge does for lists without a patchMergeKey.
ATOMIC = "atomic"

_POD_SPEC_PREFIXES = {
    "StatefulSet": ("spec", "template", "spec"),
    "Deployment": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
    "Pod": ("spec",),
}

# Merge keys of the lists below a pod spec, from the Kubernetes API's patchMergeKey tags.
# "[]" stands for "any element of the list above".
_POD_SPEC_LISTS = {
    ("containers",): "name",
    ("initContainers",): "name",
    ("volumes",): "name",
    ("tolerations",): ATOMIC,
    ("imagePullSecrets",): "name",
}
for _field in ("containers", "initContainers"):
    _POD_SPEC_LISTS.update(
        {
            (_field, "[]", "env"): "name",
            (_field, "[]", "ports"): "containerPort",
            (_field, "[]", "volumeMounts"): "mountPath",
            (_field, "[]", "envFrom"): ATOMIC,
            (_field, "[]", "command"): ATOMIC,
            (_field, "[]", "args"): ATOMIC,
            (_field, "[]", "securityContext", "capabilities", "add"): ATOMIC,
            (_field, "[]", "securityContext", "capabilities", "drop"): ATOMIC,
        }
    )

# Lists outside pod specs, per kind.
_OBJECT_LISTS = {
    ("StatefulSet", ("spec", "volumeClaimTemplates")): ATOMIC,
    ("NetworkPolicy", ("spec", "ingress")): ATOMIC,
    ("NetworkPolicy", ("spec", "egress")): ATOMIC,
    ("NetworkPolicy", ("spec", "policyTypes")): ATOMIC,
    ("Service", ("spec", "ports")): "port",
}


class RenderError(ValueError):
    """The kustomization uses a feature this renderer does not implement, or is invalid."""


@dataclass
class _Resource:
    body: dict[str, Any]
    # Set for generated ConfigMaps: the name before the hash suffix.
    generated_name: str | None = None


def render(directory: Path) -> list[dict[str, Any]]:
    """Render the kustomization in `directory` and return its resources."""
    resources = _build(Path(directory))
    _add_hash_suffixes(resources)
    return [resource.body for resource in resources]


def _build(directory: Path) -> list[_Resource]:
    kustomization = _load_kustomization(directory)

    resources: list[_Resource] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            resources.extend(_build(path))
        elif path.is_file():
            resources.extend(_Resource(body) for body in _load_documents(path))
        else:
            raise RenderError(f"{directory}: resource {entry!r} not found")

    for generator in kustomization.get("configMapGenerator", []):
        _generate_config_map(resources, generator, directory)
    for patch in kustomization.get("patches", []):
        _apply_patch(resources, patch, directory)
    for image in kustomization.get("images", []):
        _set_image(resources, image)
    if "namespace" in kustomization:
        for resource in resources:
            resource.body.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
    return resources


def _load_kustomization(directory: Path) -> dict[str, Any]:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise RenderError(f"{directory}: no kustomization.yaml")
    kustomization = yaml.safe_load(path.read_text()) or {}
    unsupported = sorted(set(kustomization) - SUPPORTED_FIELDS)
    if unsupported:
        raise RenderError(f"{path}: fields {unsupported} are not supported by this renderer. Supported fields: {sorted(SUPPORTED_FIELDS)}")
    return kustomization


def _load_documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def _generate_config_map(resources: list[_Resource], generator: dict[str, Any], directory: Path) -> None:
    unsupported = sorted(set(generator) - {"name", "behavior", "literals"})
    if unsupported:
        raise RenderError(f"{directory}: configMapGenerator fields {unsupported} are not supported")
    name = generator["name"]
    data = dict(_parse_literal(literal, directory) for literal in generator.get("literals", []))
    behavior = generator.get("behavior", "create")
    existing = [r for r in resources if r.generated_name == name]

    if behavior == "create":
        if existing:
            raise RenderError(f"{directory}: ConfigMap {name!r} is generated twice. Use behavior: merge in the overlay.")
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}
        resources.append(_Resource(body, generated_name=name))
    elif behavior == "merge":
        if len(existing) != 1:
            raise RenderError(f"{directory}: behavior merge needs one generated ConfigMap {name!r}, found {len(existing)}")
        existing[0].body["data"].update(data)
    else:
        raise RenderError(f"{directory}: configMapGenerator behavior {behavior!r} is not supported")


def _parse_literal(literal: str, directory: Path) -> tuple[str, str]:
    key, separator, value = literal.partition("=")
    if not separator or not key:
        raise RenderError(f"{directory}: literal {literal!r} is not KEY=VALUE")
    return key, value


def _apply_patch(resources: list[_Resource], patch: dict[str, Any], directory: Path) -> None:
    if set(patch) != {"path"}:
        raise RenderError(f"{directory}: only patches given by path are supported, got {sorted(patch)}")
    documents = _load_documents(directory / patch["path"])
    if len(documents) != 1:
        raise RenderError(f"{directory / patch['path']}: expected one patch document, found {len(documents)}")
    document = documents[0]
    kind, name = document["kind"], document["metadata"]["name"]

    targets = [r for r in resources if r.body["kind"] == kind and _original_name(r) == name]
    if len(targets) != 1:
        raise RenderError(f"{directory / patch['path']}: patch for {kind}/{name} matches {len(targets)} resources")
    target = targets[0]

    if _group(document["apiVersion"]) in BUILT_IN_GROUPS:
        target.body = strategic_merge(target.body, document, kind)
    else:
        target.body = json_merge(target.body, document)


def _original_name(resource: _Resource) -> str:
    return resource.generated_name or resource.body["metadata"]["name"]


def _group(api_version: str) -> str:
    return api_version.rpartition("/")[0]


def strategic_merge(original: dict[str, Any], patch: dict[str, Any], kind: str, path: tuple[str, ...] = ()) -> dict[str, Any]:
    """Apply a strategic-merge patch to a built-in object, for the lists named in `_POD_SPEC_LISTS` and `_OBJECT_LISTS`."""
    result = copy.deepcopy(original)
    for key, value in patch.items():
        if key.startswith("$"):
            raise RenderError(f"{kind} {'.'.join(path + (key,))}: patch directives are not supported")
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = strategic_merge(result[key], value, kind, path + (key,))
        elif isinstance(value, list):
            result[key] = _merge_list(result.get(key, []), value, kind, path + (key,))
        else:
            result[key] = copy.deepcopy(value)
    return result


def _merge_list(original: list[Any], patch: list[Any], kind: str, path: tuple[str, ...]) -> list[Any]:
    strategy = _list_strategy(kind, path)
    if strategy == ATOMIC:
        return copy.deepcopy(patch)

    # Patch elements come first, in patch order, then the original elements the patch does
    # not name, in their order (what kustomize v5.5.0 outputs).
    by_key = {element[strategy]: element for element in original}
    merged = []
    for element in patch:
        key = element[strategy]
        if key in by_key:
            merged.append(strategic_merge(by_key[key], element, kind, path + ("[]",)))
        else:
            merged.append(copy.deepcopy(element))
    named = {element[strategy] for element in patch}
    merged.extend(copy.deepcopy(element) for element in original if element[strategy] not in named)
    return merged


def _list_strategy(kind: str, path: tuple[str, ...]) -> str:
    prefix = _POD_SPEC_PREFIXES.get(kind)
    if prefix and path[: len(prefix)] == prefix and path[len(prefix):] in _POD_SPEC_LISTS:
        return _POD_SPEC_LISTS[path[len(prefix):]]
    if (kind, path) in _OBJECT_LISTS:
        return _OBJECT_LISTS[(kind, path)]
    raise RenderError(
        f"{kind} {'.'.join(path)}: this renderer does not know the list's merge strategy. Add it to _POD_SPEC_LISTS or _OBJECT_LISTS."
    )


def json_merge(target: Any, patch: Any) -> Any:
    """Apply a JSON merge patch (RFC 7386): maps merge, lists and scalars are replaced, null deletes."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = json_merge(result.get(key), value)
    return result


def _set_image(resources: list[_Resource], image: dict[str, Any]) -> None:
    unsupported = sorted(set(image) - {"name", "newName", "newTag", "digest"})
    if unsupported:
        raise RenderError(f"images entry {image.get('name')!r}: fields {unsupported} are not supported")
    for resource in resources:
        for container in _containers(resource.body):
            name, tag, digest = split_image(container["image"])
            if name != image["name"]:
                continue
            name = image.get("newName", name)
            digest = image.get("digest", digest)
            tag = image.get("newTag", tag)
            if "digest" in image or (digest and "newTag" not in image):
                container["image"] = f"{name}@{digest}"
            elif tag:
                container["image"] = f"{name}:{tag}"
            else:
                container["image"] = name


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """Split `name[:tag][@digest]` into its parts. A registry port is part of the name."""
    name, _, digest = image.partition("@")
    last_segment = name.rsplit("/", 1)[-1]
    if ":" in last_segment:
        name, _, tag = name.rpartition(":")
        return name, tag, digest or None
    return name, None, digest or None


def pod_spec(body: dict[str, Any]) -> dict[str, Any] | None:
    """Return the pod spec inside a workload object, or None for other kinds."""
    prefix = _POD_SPEC_PREFIXES.get(body.get("kind", ""))
    if prefix is None or _group(body.get("apiVersion", "")) not in BUILT_IN_GROUPS:
        return None
    node: Any = body
    for key in prefix:
        node = node.get(key, {})
    return node


def _containers(body: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(body)
    if spec is None:
        return []
    return spec.get("initContainers", []) + spec.get("containers", [])


def _add_hash_suffixes(resources: list[_Resource]) -> None:
    renamed = {}
    for resource in resources:
        if resource.generated_name is None:
            continue
        new_name = f"{resource.generated_name}-{config_map_hash(resource.body)}"
        resource.body["metadata"]["name"] = new_name
        renamed[resource.generated_name] = new_name

    for resource in resources:
        spec = pod_spec(resource.body)
        if spec is not None:
            _rename_config_map_references(spec, renamed)


def config_map_hash(body: dict[str, Any]) -> str:
    """Return kustomize's 10-character name suffix for a ConfigMap.

    kustomize hashes the JSON document {"data", "kind", "name"} (keys sorted, no spaces,
    as Go's encoding/json writes it), takes the first 10 hex digits of its SHA-256 and
    replaces 0, 1, 3, a and e with g, h, k, m and t. The name is always empty: kustomize
    v5.5.0 looks it up as a single field called "metadata/name", which no ConfigMap has
    (api/hasher/hasher.go; confirmed against `kubectl kustomize` output).
    """
    if body.get("binaryData"):
        raise RenderError("ConfigMaps with binaryData are not supported")
    document = {"data": body.get("data", {}), "kind": "ConfigMap", "name": ""}
    encoded = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # Go's encoder escapes these characters; Python's does not.
    for character, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        encoded = encoded.replace(character, escaped)
    digest = hashlib.sha256(encoded.encode("utf-8")).hexdigest()[:10]
    return digest.translate(str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}))


def _rename_config_map_references(spec: dict[str, Any], renamed: dict[str, str]) -> None:
    for container in spec.get("initContainers", []) + spec.get("containers", []):
        for source in container.get("envFrom", []):
            reference = source.get("configMapRef")
            if reference and reference.get("name") in renamed:
                reference["name"] = renamed[reference["name"]]
        for variable in container.get("env", []):
            reference = variable.get("valueFrom", {}).get("configMapKeyRef")
            if reference and reference.get("name") in renamed:
                reference["name"] = renamed[reference["name"]]
    for volume in spec.get("volumes", []):
        reference = volume.get("configMap")
        if reference and reference.get("name") in renamed:
            reference["name"] = renamed[reference["name"]]
