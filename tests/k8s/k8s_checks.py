"""Checks of rendered manifests: the schemas (built-in kinds and KubeRay CRDs) and the rules no
schema holds; CHECKS lists them all, the security ones (k8s_security_checks) included.
Each check takes a Bundle and returns its problems, one line each; none means pass.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable
from urllib.parse import urlsplit

import kubernetes_validate

from k8s_crd_schema import CRDRegistry
from k8s_pods import (
    command_options, describe, env_by_name, is_secret_ref, mlflow_server, objects_of_kind, pod_templates,
    ray_cluster_specs, ray_node_templates, selector_matches,
)
from k8s_render import OLDEST_KUBERNETES, Bundle, dockerfile_args, kuberay_crd_dir
from k8s_security_checks import (
    check_dockerfile_runs_as_ray, check_egress_bounded, check_egress_default_deny, check_egress_no_metadata_endpoint,
    check_egress_reaches_dependencies, check_network_policies, check_no_external_exposure, check_no_literal_secrets,
    check_non_root_security_context, check_ray_mlflow_user_not_admin, check_ray_token_auth,
    check_resources_on_every_container, check_service_account_tokens_off,
)

GPU = "nvidia.com/gpu"
MAX_RAYJOB_NAME = 47  # KubeRay appends suffixes to derive the cluster and submitter Job names
SINGLE_NODE_ANNOTATION = "paceray.dev/single-node"


@lru_cache(maxsize=1)
def kuberay_crds() -> CRDRegistry:
    return CRDRegistry(kuberay_crd_dir())


def _name(obj: dict) -> str:
    return obj.get("metadata", {}).get("name", "")


# --- schemas -------------------------------------------------------------------------------


def check_builtin_schemas(bundle: Bundle) -> list[str]:
    """Built-in kinds against kubernetes-validate's strict schemas; a kind with no schema fails."""
    problems = []
    crds = kuberay_crds()
    for obj in bundle.objects:
        if crds.handles(obj):
            continue
        try:
            kubernetes_validate.validate(obj, OLDEST_KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            problems.append(f"{describe(obj)}: {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.append(f"{describe(obj)}: {error.message}")
    return problems


def check_kuberay_schemas(bundle: Bundle) -> list[str]:
    """ray.io kinds as the API server admits them against the KubeRay CRDs."""
    crds = kuberay_crds()
    return [f"{describe(o)}: {e}" for o in bundle.objects if crds.handles(o) for e in crds.validate(o)]


# --- GPUs and the Ray cluster's shape ---------------------------------------------------------


def check_gpu_requests_equal_limits(bundle: Bundle) -> list[str]:
    problems = []
    for template in pod_templates(bundle.objects):
        for container in template.containers():
            resources = container.get("resources") or {}
            requested = (resources.get("requests") or {}).get(GPU)
            limited = (resources.get("limits") or {}).get(GPU)
            if (requested, limited) != (None, None) and str(requested) != str(limited):
                problems.append(f"{template.where} {container.get('name')}: {GPU} requests {requested} != limits {limited}")
    return problems


def check_ray_head_has_no_gpus(bundle: Bundle) -> list[str]:
    problems = []
    for owner, spec in ray_cluster_specs(bundle.objects):
        head = spec.get("headGroupSpec") or {}
        if str((head.get("rayStartParams") or {}).get("num-gpus")) != "0":
            problems.append(f"{describe(owner)}: head rayStartParams must set num-gpus: \"0\"")
    for template in pod_templates(bundle.objects):
        if template.role == "ray-head":
            for container in template.containers():
                resources = container.get("resources") or {}
                if any(GPU in (resources.get(k) or {}) for k in ("requests", "limits")):
                    problems.append(f"{template.where} {container.get('name')}: the head must not take a GPU")
    return problems


def check_gpu_workers_tolerate_gpu_taint(bundle: Bundle) -> list[str]:
    problems = []
    for template in pod_templates(bundle.objects):
        wants_gpu = any(GPU in ((c.get("resources") or {}).get("limits") or {}) for c in template.containers())
        tolerated = any(t.get("key") == GPU and t.get("operator") in ("Exists", "Equal") for t in template.spec.get("tolerations") or [])
        if wants_gpu and not tolerated:
            problems.append(f"{template.where}: requests {GPU} but does not tolerate the {GPU} taint")
    return problems


# --- RayJob ----------------------------------------------------------------------------------


def check_rayjob_name_length(bundle: Bundle) -> list[str]:
    return [
        f"RayJob/{_name(job)}: name is {len(_name(job))} characters, KubeRay allows {MAX_RAYJOB_NAME}"
        for job in objects_of_kind(bundle.objects, "RayJob") if len(_name(job)) > MAX_RAYJOB_NAME
    ]


def check_rayjob_ttl_needs_shutdown(bundle: Bundle) -> list[str]:
    return [
        f"RayJob/{_name(job)}: ttlSecondsAfterFinished only acts with shutdownAfterJobFinishes: true"
        for job in objects_of_kind(bundle.objects, "RayJob")
        if "ttlSecondsAfterFinished" in job.get("spec", {}) and job["spec"].get("shutdownAfterJobFinishes") is not True
    ]


def check_rayjob_is_bounded(bundle: Bundle) -> list[str]:
    """A search on its own GPU cluster must end: shut down after the job, TTL, active deadline."""
    problems = []
    for job in objects_of_kind(bundle.objects, "RayJob"):
        spec = job.get("spec", {})
        if spec.get("clusterSelector"):
            continue  # runs on an existing cluster: nothing of its own to tear down
        for key in ("shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "activeDeadlineSeconds"):
            if not spec.get(key):
                problems.append(f"RayJob/{_name(job)}: spec.{key} must be set")
    return problems


# --- wiring ------------------------------------------------------------------------------------


def check_selectors_match_pod_labels(bundle: Bundle) -> list[str]:
    templates = list(pod_templates(bundle.objects))
    problems = []

    def matched(namespace: str | None, selector: dict) -> bool:
        return any(t.namespace == namespace and selector_matches(selector, t.labels) for t in templates)

    for obj in bundle.objects:
        namespace = obj.get("metadata", {}).get("namespace")
        kind = obj.get("kind")
        if kind == "Service" and obj["spec"].get("selector"):
            if not matched(namespace, {"matchLabels": obj["spec"]["selector"]}):
                problems.append(f"{describe(obj)}: selector {obj['spec']['selector']} matches no pod")
        elif kind == "NetworkPolicy":
            if not matched(namespace, obj["spec"].get("podSelector")):
                problems.append(f"{describe(obj)}: podSelector matches no pod")
            for direction, peers_key in (("ingress", "from"), ("egress", "to")):
                for rule in obj["spec"].get(direction) or []:
                    for peer in rule.get(peers_key) or []:
                        if "podSelector" in peer and "namespaceSelector" not in peer and not matched(namespace, peer["podSelector"]):
                            problems.append(f"{describe(obj)}: {direction} {peers_key} podSelector {peer['podSelector']} matches no pod")
        elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            labels = (obj["spec"].get("template", {}).get("metadata") or {}).get("labels", {})
            if obj["spec"].get("selector") and not selector_matches(obj["spec"]["selector"], labels):
                problems.append(f"{describe(obj)}: selector does not match its pod template's labels")
            if kind == "StatefulSet":
                service = obj["spec"].get("serviceName")
                if not any(s for s in objects_of_kind(bundle.objects, "Service") if _name(s) == service and s["metadata"].get("namespace") == namespace):
                    problems.append(f"{describe(obj)}: serviceName {service!r} is not a Service here")
    return problems


def check_ray_versions_agree(bundle: Bundle) -> list[str]:
    """One Ray version: pyproject.toml, the Dockerfile, every rayVersion, and the tag of every Ray
    pod's image and of the paceray image wherever it runs (MLflow too)."""
    version = bundle.ray_version
    problems = []
    docker_version = dockerfile_args(bundle.dockerfile).get("RAY_VERSION")
    if docker_version != version:
        problems.append(f"platform/Dockerfile: ARG RAY_VERSION={docker_version}, pyproject.toml pins ray=={version}")
    if not re.search(r"^FROM\s+rayproject/ray:\$\{RAY_VERSION\}-", bundle.dockerfile, re.MULTILINE):
        problems.append("platform/Dockerfile: FROM must be rayproject/ray:${RAY_VERSION}-...")
    mlflow_pins = re.findall(r"mlflow(?:\[[^\]]*\])?==([\w.]+)", bundle.dockerfile)
    if any(pin != bundle.mlflow_version for pin in mlflow_pins):
        problems.append(f"platform/Dockerfile: mlflow pins {mlflow_pins} differ from pyproject's {bundle.mlflow_version}")
    for owner, spec in ray_cluster_specs(bundle.objects):
        if str(spec.get("rayVersion")) != version:
            problems.append(f"{describe(owner)}: rayVersion {spec.get('rayVersion')!r}, pyproject.toml pins {version}")
    for template in pod_templates(bundle.objects):
        for container in template.containers():
            repository, _, tag = container.get("image", "").rsplit("/", 1)[-1].partition(":")
            if not template.role.startswith("ray-") and repository != "paceray":
                continue  # neither a Ray pod nor the paceray image (e.g. PostgreSQL)
            if tag != version and not tag.startswith(version + "-"):
                problems.append(f"{template.where} {container.get('name')}: image tag {tag!r} is not Ray {version}")
    return problems


def _mlflow_service_and_container(bundle: Bundle) -> tuple[dict | None, dict | None]:
    _, container, service = mlflow_server(bundle.objects)
    return service, container


def mlflow_service_hosts(service: dict) -> list[str]:
    """Host headers in-cluster clients send: every name of the Service, with the port."""
    name, namespace = _name(service), service["metadata"].get("namespace", "default")
    return [f"{host}:{port['port']}" for port in service["spec"].get("ports", [])
            for host in (name, f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local")]


def mlflow_port_forward_hosts(service: dict) -> list[str]:
    """Host headers a browser or client sends through `kubectl port-forward` (not reachable in-cluster)."""
    return [f"{host}:{port['port']}" for port in service["spec"].get("ports", []) for host in ("localhost", "127.0.0.1")]


def check_mlflow_allowed_hosts(bundle: Bundle) -> list[str]:
    """MLflow answers 403 to a Host header it does not list, port included."""
    service, container = _mlflow_service_and_container(bundle)
    if container is None or service is None:
        return ["no MLflow server Deployment (command: mlflow) with a Service"]
    allowed = set((command_options(container).get("--allowed-hosts") or "").split(","))
    return [f"mlflow --allowed-hosts lacks {host!r}"
            for host in mlflow_service_hosts(service) + mlflow_port_forward_hosts(service) if host not in allowed]


def check_mlflow_basic_auth(bundle: Bundle) -> list[str]:
    _, container = _mlflow_service_and_container(bundle)
    if container is None:
        return ["no MLflow server Deployment (command: mlflow)"]
    options, env = command_options(container), env_by_name(container)
    problems = []
    if options.get("--app-name") != "basic-auth":
        problems.append("mlflow server must run --app-name=basic-auth")
    if "--serve-artifacts" not in options or "--artifacts-destination" not in options:
        problems.append("mlflow server must serve artifacts (--serve-artifacts --artifacts-destination)")
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        if not is_secret_ref(env.get(name)):
            problems.append(f"mlflow env {name} must come from a Secret")
    if "MLFLOW_AUTH_CONFIG_PATH" not in env:
        problems.append("mlflow env MLFLOW_AUTH_CONFIG_PATH must name the mounted basic_auth.ini")
    return problems


def check_tracking_env_on_ray_containers(bundle: Bundle) -> list[str]:
    """Every Ray container finds the MLflow server, with credentials from a Secret."""
    service, _ = _mlflow_service_and_container(bundle)
    reachable = set(mlflow_service_hosts(service)) if service else set()
    problems = []
    for template in ray_node_templates(bundle.objects):
        for container in template.containers(include_init=False):
            env, where = env_by_name(container), f"{template.where} {container.get('name')}"
            uri = (env.get("MLFLOW_TRACKING_URI") or {}).get("value")
            if not uri:
                problems.append(f"{where}: MLFLOW_TRACKING_URI not set")
            elif urlsplit(uri).netloc not in reachable:
                problems.append(f"{where}: MLFLOW_TRACKING_URI {uri} is not the MLflow Service with its port")
            for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                if not is_secret_ref(env.get(name)):
                    problems.append(f"{where}: {name} must come from a Secret")
    return problems


def check_shared_storage(bundle: Bundle) -> list[str]:
    """Head and workers mount one shared volume at one path; PACERAY_* point into it."""
    claims = {_name(p): p for p in objects_of_kind(bundle.objects, "PersistentVolumeClaim")}
    problems, seen = [], set()
    for template in ray_node_templates(bundle.objects):
        volumes = {v["name"]: v for v in template.spec.get("volumes") or []}
        for container in template.containers(include_init=False):
            where = f"{template.where} {container.get('name')}"
            env = env_by_name(container)
            mounts = [(m["mountPath"], volumes.get(m["name"], {}).get("persistentVolumeClaim", {}).get("claimName"))
                      for m in container.get("volumeMounts") or []]
            mounts = [(path, claim) for path, claim in mounts if claim]
            if not mounts:
                problems.append(f"{where}: mounts no PersistentVolumeClaim")
                continue
            for var in ("PACERAY_STORAGE", "PACERAY_RUN_DIR"):
                value = (env.get(var) or {}).get("value", "")
                inside = [(path, claim) for path, claim in mounts if value == path or value.startswith(path.rstrip("/") + "/")]
                if not inside:
                    problems.append(f"{where}: {var}={value!r} is not on a mounted claim")
                else:
                    seen.add((var, value, *inside[0]))
    for var in ("PACERAY_STORAGE", "PACERAY_RUN_DIR"):
        variants = {entry[1:] for entry in seen if entry[0] == var}
        if len(variants) > 1:
            problems.append(f"{var} differs between Ray containers: {sorted(variants)}")
    for claim_name in {entry[3] for entry in seen}:
        claim = claims.get(claim_name)
        if claim is None:
            problems.append(f"PersistentVolumeClaim {claim_name!r} used by Ray pods is not in the manifests")
        elif "ReadWriteMany" not in claim["spec"].get("accessModes", []) and \
                (claim["metadata"].get("annotations") or {}).get(SINGLE_NODE_ANNOTATION) != "true":
            problems.append(f"PersistentVolumeClaim/{claim_name}: Ray pods on several nodes need ReadWriteMany")
    return problems


CHECKS: dict[str, Callable[[Bundle], list[str]]] = {
    "builtin_schemas": check_builtin_schemas,
    "kuberay_schemas": check_kuberay_schemas,
    "gpu_requests_equal_limits": check_gpu_requests_equal_limits,
    "ray_head_has_no_gpus": check_ray_head_has_no_gpus,
    "gpu_workers_tolerate_gpu_taint": check_gpu_workers_tolerate_gpu_taint,
    "rayjob_name_length": check_rayjob_name_length,
    "rayjob_ttl_needs_shutdown": check_rayjob_ttl_needs_shutdown,
    "rayjob_is_bounded": check_rayjob_is_bounded,
    "selectors_match_pod_labels": check_selectors_match_pod_labels,
    "ray_versions_agree": check_ray_versions_agree,
    "mlflow_allowed_hosts": check_mlflow_allowed_hosts,
    "mlflow_basic_auth": check_mlflow_basic_auth,
    "tracking_env_on_ray_containers": check_tracking_env_on_ray_containers,
    "shared_storage": check_shared_storage,
    "ray_token_auth": check_ray_token_auth,
    "no_external_exposure": check_no_external_exposure,
    "no_literal_secrets": check_no_literal_secrets,
    "resources_on_every_container": check_resources_on_every_container,
    "non_root_security_context": check_non_root_security_context,
    "dockerfile_runs_as_ray": check_dockerfile_runs_as_ray,
    "network_policies": check_network_policies,
    "egress_default_deny": check_egress_default_deny,
    "egress_bounded": check_egress_bounded,
    "egress_no_metadata_endpoint": check_egress_no_metadata_endpoint,
    "egress_reaches_dependencies": check_egress_reaches_dependencies,
    "service_account_tokens_off": check_service_account_tokens_off,
    "ray_mlflow_user_not_admin": check_ray_mlflow_user_not_admin,
}
