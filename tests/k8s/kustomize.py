"""A small kustomize for the subset k8s/ uses, so that the manifests can be rendered and checked
where no kustomize binary is installed (CI needs nothing but Python).

Supported kustomization fields: `resources` (files and directories holding a kustomization),
`namespace`, `labels` (`pairs`, `includeSelectors: false`, `includeTemplates`), `images`
(`name`, `newName`, `newTag`) and `patches` (`path` or inline `patch`, optionally a `target` by
group/version/kind/name) as strategic-merge patches: maps merge recursively, `null` deletes a key,
lists of built-in kinds merge by their patch merge key (containers, initContainers, volumes, env,
volumeMounts by name/mountPath), every other list — and every list of a custom resource, which
kustomize merges as a JSON merge patch — is replaced. Anything else is refused with an error, never
ignored. tests/k8s/test_manifests.py compares this renderer's output with `kustomize build` /
`kubectl kustomize` when either is installed, so the two cannot drift apart unnoticed.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}
PATCH_FIELDS = {"path", "patch", "target"}
TARGET_FIELDS = {"group", "version", "kind", "name"}
LABEL_FIELDS = {"pairs", "includeSelectors", "includeTemplates"}
IMAGE_FIELDS = {"name", "newName", "newTag"}

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "CustomResourceDefinition", "PriorityClass", "IngressClass"}
BUILTIN_GROUPS = {"", "apps", "batch", "autoscaling", "policy", "networking.k8s.io", "rbac.authorization.k8s.io"}
# Strategic-merge keys of the built-in list fields used here (k8s.io/api's patchMergeKey).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
              "volumeMounts": "mountPath", "imagePullSecrets": "name"}
TEMPLATED_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


class KustomizeError(ValueError):
    pass


def group_of(api_version: str) -> str:
    return api_version.split("/")[0] if "/" in api_version else ""


def build(directory: str | Path) -> list[dict]:
    """Render the kustomization in `directory` into a list of objects."""
    directory = Path(directory)
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - KUSTOMIZATION_FIELDS
    if unknown:
        raise KustomizeError(f"{directory}: kustomization fields this renderer does not implement: {sorted(unknown)}")
    objects: list[dict] = []
    for resource in k.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir():
            objects += build(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch in k.get("patches", []):
        objects = _apply_patch(directory, patch, objects)
    if "namespace" in k:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = k["namespace"]
    for label in k.get("labels", []):
        _apply_labels(label, objects)
    for image in k.get("images", []):
        _apply_image(image, objects)
    _check_unique(directory, objects)
    return objects


def _check_unique(directory: Path, objects: list[dict]) -> None:
    seen = set()
    for obj in objects:
        key = (group_of(obj["apiVersion"]), obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if key in seen:
            raise KustomizeError(f"{directory}: {key} defined twice")
        seen.add(key)


def _apply_patch(directory: Path, spec: dict, objects: list[dict]) -> list[dict]:
    unknown = set(spec) - PATCH_FIELDS
    if unknown or ("path" in spec) == ("patch" in spec):
        raise KustomizeError(f"{directory}: a patch needs exactly one of path/patch, and only {sorted(PATCH_FIELDS)}")
    text = (directory / spec["path"]).read_text() if "path" in spec else spec["patch"]
    target = spec.get("target")
    if target is not None and set(target) - TARGET_FIELDS:
        raise KustomizeError(f"{directory}: patch target fields beyond {sorted(TARGET_FIELDS)}")
    for doc in (d for d in yaml.safe_load_all(text) if d):
        if target is not None:
            matches = [o for o in objects if _matches_target(o, target)]
            doc = copy.deepcopy(doc)
            doc.get("metadata", {}).pop("name", None)  # with a target, the patch's own name is not used
        else:
            matches = [o for o in objects if o["kind"] == doc["kind"]
                       and group_of(o["apiVersion"]) == group_of(doc["apiVersion"])
                       and o["metadata"]["name"] == doc["metadata"]["name"]]
        if not matches:
            raise KustomizeError(f"{directory}: patch {spec} matches no object ({doc.get('kind')})")
        for obj in matches:
            builtin = group_of(obj["apiVersion"]) in BUILTIN_GROUPS
            patched = merge(obj, {k: v for k, v in doc.items() if k not in ("apiVersion", "kind")}, builtin)
            objects = [patched if o is obj else o for o in objects]
    return objects


def _matches_target(obj: dict, target: dict) -> bool:
    api = obj["apiVersion"]
    return (target.get("kind", obj["kind"]) == obj["kind"]
            and target.get("name", obj["metadata"]["name"]) == obj["metadata"]["name"]
            and target.get("group", group_of(api)) == group_of(api)
            and target.get("version", api.split("/")[-1]) == api.split("/")[-1])


def merge(base, patch, builtin: bool, field: str | None = None):
    """Strategic-merge `patch` into `base` (a new object; neither argument is changed)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = merge(out[key], value, builtin, key)
            else:
                out[key] = copy.deepcopy(_strip_nulls(value))
        return out
    if isinstance(base, list) and isinstance(patch, list) and builtin and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        out = copy.deepcopy(base)
        for item in patch:
            index = next((i for i, b in enumerate(out) if b.get(key) == item.get(key)), None)
            if index is None:
                out.append(copy.deepcopy(_strip_nulls(item)))
            else:
                out[index] = merge(out[index], item, builtin, None)
        return out
    return copy.deepcopy(_strip_nulls(patch))


def _strip_nulls(value):
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


def _apply_labels(spec: dict, objects: list[dict]) -> None:
    if set(spec) - LABEL_FIELDS:
        raise KustomizeError(f"labels fields beyond {sorted(LABEL_FIELDS)}")
    if spec.get("includeSelectors"):
        raise KustomizeError("labels with includeSelectors: true are not implemented (selectors are immutable)")
    pairs = spec["pairs"]
    for obj in objects:
        obj["metadata"].setdefault("labels", {}).update(pairs)
        if spec.get("includeTemplates") and obj["kind"] in TEMPLATED_KINDS:
            obj["spec"]["template"].setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
            for claim in obj["spec"].get("volumeClaimTemplates", []):
                claim.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)


def _apply_image(spec: dict, objects: list[dict]) -> None:
    if set(spec) - IMAGE_FIELDS:
        raise KustomizeError(f"images fields beyond {sorted(IMAGE_FIELDS)}")
    for obj in objects:
        for container in pod_containers(obj, init=True):
            image = container.get("image", "")
            name = image.split("@")[0]
            name = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
            if name != spec["name"]:
                continue
            tag = image[len(name):]
            new = spec.get("newName", name) + (f":{spec['newTag']}" if "newTag" in spec else tag)
            container["image"] = new


def pod_spec(obj: dict) -> dict | None:
    if obj["kind"] in TEMPLATED_KINDS:
        return obj["spec"]["template"]["spec"]
    if obj["kind"] == "Pod":
        return obj["spec"]
    return None


def pod_containers(obj: dict, init: bool = False) -> list[dict]:
    spec = pod_spec(obj)
    if spec is None:
        return []
    return list(spec.get("containers", [])) + (list(spec.get("initContainers", [])) if init else [])
