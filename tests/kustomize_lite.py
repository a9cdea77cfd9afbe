"""A small kustomize: renders k8s-job/'s overlays the way `kubectl kustomize` does, for the features they use.

CI has no kubectl (nothing installable offline ships a current kustomize), so the manifest tests render with
this. It does only what k8s-job/ needs (resources, namespace, images, configMapGenerator with merge and the
content-hash suffix, strategic-merge patches of maps) and refuses anything else, so that a new feature in
the manifests fails here instead of rendering wrongly. tests/test_manifests.py compares it with
`kubectl kustomize` wherever kubectl is installed.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import yaml

KNOWN_KEYS = {"apiVersion", "kind", "resources", "namespace", "images", "configMapGenerator", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "RuntimeClass", "PriorityClass", "CustomResourceDefinition"}  # fmt: skip


def render(directory: Path) -> list[dict]:
    """The objects `kubectl kustomize directory` prints (order aside)."""
    objects, generated = _build(Path(directory))
    renamed = {}
    for obj in objects:
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] in generated:
            old = obj["metadata"]["name"]
            obj["metadata"]["name"] = renamed[old] = f"{old}-{_config_map_hash(obj)}"
    for obj in objects:
        _rename_config_map_refs(obj, renamed)
    return objects


def _build(directory: Path) -> tuple[list[dict], set[str]]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - KNOWN_KEYS
    if unknown:
        raise NotImplementedError(f"{directory}: {sorted(unknown)} not supported by tests/kustomize_lite.py")
    objects, generated = [], set()
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            sub_objects, sub_generated = _build(path)
            objects += sub_objects
            generated |= sub_generated
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for generator in spec.get("configMapGenerator", []):
        _generate_config_map(objects, generated, generator)
    for patch in spec.get("patches", []):
        _apply_patch(objects, patch, directory)
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] == "Namespace":
                obj["metadata"]["name"] = spec["namespace"]
            elif obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    for image in spec.get("images", []):
        for obj in objects:
            _set_image(obj, image)
    return objects, generated


def _generate_config_map(objects: list[dict], generated: set[str], generator: dict) -> None:
    if set(generator) - {"name", "behavior", "literals", "options"}:
        raise NotImplementedError(f"configMapGenerator keys {sorted(generator)}")
    data = dict(literal.split("=", 1) for literal in generator.get("literals", []))
    name, behavior = generator["name"], generator.get("behavior", "create")
    if behavior == "merge":
        (existing,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name]
        existing.setdefault("data", {}).update(data)
        return
    if behavior != "create" or name in generated:
        raise NotImplementedError(f"configMapGenerator {name}: behavior {behavior}")
    metadata = {"name": name}
    options = generator.get("options", {})
    if set(options) - {"labels"}:
        raise NotImplementedError(f"configMapGenerator options {sorted(options)}")
    if "labels" in options:
        metadata["labels"] = dict(options["labels"])
    # kustomize leaves out the data of a ConfigMap generated without any (base/, whose overlays add it)
    objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, **({"data": data} if data else {})})
    generated.add(name)


def _config_map_hash(obj: dict) -> str:
    """kustomize's name suffix: SHA-256 of the data as Go marshals it (keys sorted, name left empty)."""
    # (no data marshals as the empty string)
    encoded = json.dumps({"data": obj.get("data") or "", "kind": "ConfigMap", "name": ""}, sort_keys=True,
                         separators=(",", ":"), ensure_ascii=False)  # fmt: skip
    encoded = encoded.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")  # Go's HTML escaping
    return hashlib.sha256(encoded.encode()).hexdigest()[:10].translate(str.maketrans("013ae", "ghkmt"))


def _rename_config_map_refs(value, renamed: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("configMapRef", "configMapKeyRef", "configMap") and item.get("name") in renamed:
                item["name"] = renamed[item["name"]]
            else:
                _rename_config_map_refs(item, renamed)
    elif isinstance(value, list):
        for item in value:
            _rename_config_map_refs(item, renamed)


def _apply_patch(objects: list[dict], patch: dict, directory: Path) -> None:
    if set(patch) - {"patch", "path"}:
        raise NotImplementedError(f"patch keys {sorted(patch)} (targets, JSON 6902)")
    body = yaml.safe_load(patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text())
    (target,) = [o for o in objects if o["kind"] == body["kind"] and o["metadata"]["name"] == body["metadata"]["name"]]
    _merge(target, body)


def _merge(target: dict, patch: dict) -> None:
    """A strategic merge of maps: keys set, None deletes. Lists would need their merge keys: refused."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        elif isinstance(value, list):
            raise NotImplementedError(f"a list in a strategic-merge patch ({key})")
        else:
            target[key] = copy.deepcopy(value)


def _set_image(obj: dict, image: dict) -> None:
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        reference = container["image"]
        if "@" in reference or "digest" in image:
            raise NotImplementedError(f"image digests ({reference})")
        name, tag = reference.rsplit(":", 1) if ":" in reference.rsplit("/", 1)[-1] else (reference, "")
        if name == image["name"]:
            container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
