"""Where the pods are in rendered manifests: pod templates of built-in workloads and of KubeRay kinds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

RAY_CLUSTER_SPEC_PATHS = {"RayCluster": ("spec",), "RayJob": ("spec", "rayClusterSpec"), "RayService": ("spec", "rayClusterConfig")}
_WORKLOAD_TEMPLATE_PATHS = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


def _dig(obj: dict, path: tuple[str, ...]) -> dict | None:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj if isinstance(obj, dict) else None


def objects_of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o.get("kind") == kind]


def describe(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


@dataclass
class PodTemplate:
    owner: str  # "Kind/name"
    role: str  # "workload", "ray-head", "ray-worker", "ray-submitter"
    namespace: str | None
    template: dict
    implied_labels: dict  # labels a controller adds to the pods (KubeRay's ray.io/*)
    cluster: str | None = None  # the Ray cluster's owner ("Kind/name") of a Ray head, worker or submitter

    @property
    def where(self) -> str:
        return f"{self.owner} ({self.role})"

    @property
    def labels(self) -> dict:
        return {**(self.template.get("metadata") or {}).get("labels", {}), **self.implied_labels}

    @property
    def spec(self) -> dict:
        return self.template.get("spec") or {}

    def containers(self, include_init: bool = True) -> list[dict]:
        found = list(self.spec.get("containers") or [])
        return found + list(self.spec.get("initContainers") or []) if include_init else found


def ray_cluster_specs(objects: list[dict]) -> Iterator[tuple[dict, dict]]:
    """(owner object, RayClusterSpec) for every RayCluster, and the cluster inside RayJob/RayService."""
    for obj in objects:
        path = RAY_CLUSTER_SPEC_PATHS.get(obj.get("kind"))
        if path and obj.get("apiVersion", "").startswith("ray.io/"):
            spec = _dig(obj, path)
            if spec is not None:
                yield obj, spec


def pod_templates(objects: list[dict]) -> Iterator[PodTemplate]:
    for obj in objects:
        namespace = obj.get("metadata", {}).get("namespace")
        kind = obj.get("kind")
        if kind == "Pod":
            yield PodTemplate(describe(obj), "workload", namespace, obj, {})
        elif kind in _WORKLOAD_TEMPLATE_PATHS and not obj.get("apiVersion", "").startswith("ray.io/"):
            template = _dig(obj, _WORKLOAD_TEMPLATE_PATHS[kind])
            if template is not None:
                yield PodTemplate(describe(obj), "workload", namespace, template, {})
    for owner, spec in ray_cluster_specs(objects):
        namespace = owner.get("metadata", {}).get("namespace")
        cluster = {"ray.io/cluster": owner["metadata"]["name"]} if owner["kind"] == "RayCluster" else {}
        head = _dig(spec, ("headGroupSpec", "template"))
        if head is not None:
            implied = {**cluster, "ray.io/node-type": "head", "ray.io/group": "headgroup", "ray.io/is-ray-node": "yes"}
            yield PodTemplate(describe(owner), "ray-head", namespace, head, implied, describe(owner))
        for group in spec.get("workerGroupSpecs") or []:
            template = group.get("template")
            if isinstance(template, dict):
                implied = {**cluster, "ray.io/node-type": "worker", "ray.io/group": group.get("groupName", ""), "ray.io/is-ray-node": "yes"}
                yield PodTemplate(f"{describe(owner)} group {group.get('groupName')}", "ray-worker", namespace, template,
                                  implied, describe(owner))
    for obj in objects:
        if obj.get("kind") == "RayJob" and isinstance(_dig(obj, ("spec", "submitterPodTemplate")), dict):
            template = obj["spec"]["submitterPodTemplate"]
            yield PodTemplate(describe(obj), "ray-submitter", obj.get("metadata", {}).get("namespace"), template, {},
                              describe(obj))


def ray_node_templates(objects: list[dict]) -> Iterator[PodTemplate]:
    return (t for t in pod_templates(objects) if t.role in ("ray-head", "ray-worker"))


def mlflow_server(objects: list[dict]) -> tuple[PodTemplate | None, dict | None, dict | None]:
    """The MLflow tracking server: its pod template, its container (command: mlflow) and the
    Service in front of it; (None, None, None) when there is none."""
    for template in pod_templates(objects):
        if not template.owner.startswith("Deployment/"):
            continue
        for container in template.containers(include_init=False):
            if (container.get("command") or [None])[0] == "mlflow":
                services = [s for s in objects_of_kind(objects, "Service") if s["spec"].get("selector")
                            and s["metadata"].get("namespace") == template.namespace
                            and selector_matches({"matchLabels": s["spec"]["selector"]}, template.labels)]
                return template, container, (services[0] if services else None)
    return None, None, None


def selector_matches(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (matchLabels + matchExpressions); an empty selector matches everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def env_by_name(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env") or [] if "name" in entry}


def is_secret_ref(env_entry: dict | None) -> bool:
    return bool(env_entry) and "secretKeyRef" in (env_entry.get("valueFrom") or {})


def command_options(container: dict) -> dict[str, str | None]:
    """`--name=value` / `--name value` / `--flag` options of a container's command + args."""
    tokens = list(container.get("command") or []) + list(container.get("args") or [])
    options: dict[str, str | None] = {}
    index = 0
    while index < len(tokens):
        token = str(tokens[index])
        if token.startswith("--"):
            name, eq, value = token.partition("=")
            if eq:
                options[name] = value
            elif index + 1 < len(tokens) and not str(tokens[index + 1]).startswith("-"):
                options[name] = str(tokens[index + 1])
                index += 1
            else:
                options[name] = None
        index += 1
    return options
