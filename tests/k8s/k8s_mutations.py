"""Ways to break the manifests, one or more per check: each must make its check fail.

A mutation edits a deep copy of a rendered overlay (and of the files it is checked against) in
the way the check guards against; a check that still passes would guard nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from k8s_render import Bundle


@dataclass(frozen=True)
class Mutation:
    id: str
    check: str
    mutate: Callable[[Bundle], None]
    overlay: str = "gpu"


def find(bundle: Bundle, kind: str, name: str | None = None) -> dict:
    for obj in bundle.objects:
        if obj.get("kind") == kind and (name is None or obj["metadata"]["name"] == name):
            return obj
    raise LookupError(f"no {kind} {name or ''} to mutate")


def _job_cluster(bundle: Bundle) -> dict:
    return find(bundle, "RayJob")["spec"]["rayClusterSpec"]


def _job_worker(bundle: Bundle) -> dict:
    return _job_cluster(bundle)["workerGroupSpecs"][0]["template"]["spec"]


def _job_worker_container(bundle: Bundle) -> dict:
    return _job_worker(bundle)["containers"][0]


def _mlflow_container(bundle: Bundle) -> dict:
    return find(bundle, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]


def _submitter(bundle: Bundle) -> dict:
    return find(bundle, "RayJob")["spec"]["submitterPodTemplate"]["spec"]


def _set_env(container: dict, name: str, entry: dict) -> None:
    container["env"] = [e for e in container.get("env", []) if e["name"] != name] + [{"name": name, **entry}]


def _replace_arg(container: dict, prefix: str, new: str | None) -> None:
    args = [a for a in container["args"] if not a.startswith(prefix)]
    container["args"] = args + ([new] if new else [])


def _add_ingress_peer(peer: dict) -> Callable[[Bundle], None]:
    def mutate(bundle: Bundle) -> None:
        find(bundle, "NetworkPolicy", "mlflow-from-namespace")["spec"]["ingress"].append({"from": [peer]})
    return mutate


def _egress(bundle: Bundle, policy: str) -> list[dict]:
    return find(bundle, "NetworkPolicy", policy)["spec"]["egress"]


def _add_egress_rule(policy: str, rule: dict) -> Callable[[Bundle], None]:
    return lambda b: _egress(b, policy).append(rule)


def _job_head(bundle: Bundle) -> dict:
    return _job_cluster(bundle)["headGroupSpec"]["template"]["spec"]


def _user_job_container(bundle: Bundle) -> dict:
    return find(bundle, "Job", "paceray-mlflow-user")["spec"]["template"]["spec"]["containers"][0]


def _secret_env(secret: str, key: str) -> dict:
    return {"valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


MUTATIONS = [
    # schemas
    Mutation("deployment-unknown-field", "builtin_schemas",
             lambda b: _mlflow_container(b).__setitem__("imagePullPolicyy", "Always")),
    Mutation("service-port-wrong-type", "builtin_schemas",
             lambda b: find(b, "Service", "mlflow")["spec"]["ports"][0].__setitem__("port", "5000")),
    Mutation("kind-without-schema", "builtin_schemas",
             lambda b: b.objects.append({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})),
    Mutation("rayjob-unknown-field", "kuberay_schemas",
             lambda b: find(b, "RayJob")["spec"].__setitem__("shutdownAfterJobFinish", True)),
    Mutation("raycluster-unknown-container-field", "kuberay_schemas",
             lambda b: find(b, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].__setitem__("gpus", 1)),
    Mutation("raycluster-auth-mode-not-in-enum", "kuberay_schemas",
             lambda b: find(b, "RayCluster")["spec"]["authOptions"].__setitem__("mode", "tokens")),
    Mutation("rayjob-worker-group-without-name", "kuberay_schemas",
             lambda b: _job_cluster(b)["workerGroupSpecs"][0].pop("groupName")),
    Mutation("rayjob-breaks-cel-rule", "kuberay_schemas",
             lambda b: find(b, "RayJob")["spec"].__setitem__("deletionStrategy", {"onSuccess": {"policy": "DeleteCluster"}})),
    Mutation("rayjob-ttl-as-string", "kuberay_schemas",
             lambda b: find(b, "RayJob")["spec"].__setitem__("ttlSecondsAfterFinished", "600")),
    # GPUs and cluster shape
    Mutation("gpu-limit-above-request", "gpu_requests_equal_limits",
             lambda b: _job_worker_container(b)["resources"]["limits"].__setitem__("nvidia.com/gpu", "2")),
    Mutation("head-may-take-gpus", "ray_head_has_no_gpus",
             lambda b: find(b, "RayCluster")["spec"]["headGroupSpec"]["rayStartParams"].pop("num-gpus")),
    Mutation("gpu-worker-without-toleration", "gpu_workers_tolerate_gpu_taint",
             lambda b: _job_worker(b).pop("tolerations")),
    # RayJob
    Mutation("rayjob-name-48-chars", "rayjob_name_length",
             lambda b: find(b, "RayJob")["metadata"].__setitem__("name", "paceray-" + "x" * 40)),
    Mutation("ttl-without-shutdown", "rayjob_ttl_needs_shutdown",
             lambda b: find(b, "RayJob")["spec"].__setitem__("shutdownAfterJobFinishes", False)),
    Mutation("rayjob-without-deadline", "rayjob_is_bounded",
             lambda b: find(b, "RayJob")["spec"].pop("activeDeadlineSeconds")),
    # wiring
    Mutation("service-selector-typo", "selectors_match_pod_labels",
             lambda b: find(b, "Service", "mlflow")["spec"]["selector"].__setitem__("app.kubernetes.io/name", "mlfow")),
    Mutation("egress-peer-selects-nothing", "selectors_match_pod_labels",
             lambda b: _egress(b, "mlflow-egress")[0]["to"][0]["podSelector"]["matchLabels"].__setitem__("app.kubernetes.io/name", "postgresql")),
    Mutation("networkpolicy-selects-nothing", "selectors_match_pod_labels",
             lambda b: find(b, "NetworkPolicy", "ray-from-namespace")["spec"]["podSelector"]["matchLabels"].__setitem__("app.kubernetes.io/component", "rays")),
    Mutation("statefulset-selector-off-template", "selectors_match_pod_labels",
             lambda b: find(b, "StatefulSet")["spec"]["template"]["metadata"]["labels"].__setitem__("app.kubernetes.io/name", "pg")),
    Mutation("statefulset-service-missing", "selectors_match_pod_labels",
             lambda b: find(b, "StatefulSet")["spec"].__setitem__("serviceName", "postgres")),
    Mutation("rayjob-ray-version-drift", "ray_versions_agree",
             lambda b: _job_cluster(b).__setitem__("rayVersion", "2.59.0")),
    Mutation("worker-image-other-ray", "ray_versions_agree",
             lambda b: _job_worker_container(b).__setitem__("image", "registry.example.com/paceray:2.59.0-gpu")),
    Mutation("mlflow-image-other-ray", "ray_versions_agree",
             lambda b: _mlflow_container(b).__setitem__("image", "registry.example.com/paceray:latest")),
    Mutation("dockerfile-ray-version-drift", "ray_versions_agree",
             lambda b: setattr(b, "dockerfile", b.dockerfile.replace("ARG RAY_VERSION=", "ARG RAY_VERSION=9.9.9#"))),
    Mutation("dockerfile-mlflow-pin-drift", "ray_versions_agree",
             lambda b: setattr(b, "dockerfile", b.dockerfile.replace("mlflow[auth]==", "mlflow[auth]==0.0.1#"))),
    Mutation("allowed-hosts-without-port", "mlflow_allowed_hosts",
             lambda b: _replace_arg(_mlflow_container(b), "--allowed-hosts", "--allowed-hosts=mlflow,mlflow.paceray.svc.cluster.local,localhost")),
    Mutation("mlflow-without-auth-app", "mlflow_basic_auth",
             lambda b: _replace_arg(_mlflow_container(b), "--app-name", None)),
    Mutation("mlflow-admin-password-literal", "mlflow_basic_auth",
             lambda b: _set_env(_mlflow_container(b), "MLFLOW_AUTH_ADMIN_PASSWORD", {"value": "hunter2"})),
    Mutation("worker-without-tracking-uri", "tracking_env_on_ray_containers",
             lambda b: _job_worker_container(b).__setitem__("env", [e for e in _job_worker_container(b)["env"] if e["name"] != "MLFLOW_TRACKING_URI"])),
    Mutation("tracking-uri-without-port", "tracking_env_on_ray_containers",
             lambda b: _set_env(_job_worker_container(b), "MLFLOW_TRACKING_URI", {"value": "http://mlflow.paceray.svc.cluster.local"})),
    Mutation("tracking-uri-localhost", "tracking_env_on_ray_containers",
             lambda b: _set_env(_job_worker_container(b), "MLFLOW_TRACKING_URI", {"value": "http://localhost:5000"})),
    Mutation("worker-mounts-storage-elsewhere", "shared_storage",
             lambda b: _job_worker_container(b)["volumeMounts"][0].__setitem__("mountPath", "/data")),
    Mutation("run-dir-off-the-shared-volume", "shared_storage",
             lambda b: _set_env(_job_worker_container(b), "PACERAY_RUN_DIR", {"value": "/tmp/runs"})),
    Mutation("storage-read-write-once", "shared_storage",
             lambda b: find(b, "PersistentVolumeClaim", "paceray-storage")["spec"].__setitem__("accessModes", ["ReadWriteOnce"])),
    Mutation("dev-storage-not-declared-single-node", "shared_storage",
             lambda b: find(b, "PersistentVolumeClaim", "paceray-storage")["metadata"].pop("annotations"), overlay="dev"),
    # security
    Mutation("rayjob-cluster-without-token-auth", "ray_token_auth",
             lambda b: _job_cluster(b).pop("authOptions")),
    Mutation("raycluster-auth-disabled", "ray_token_auth",
             lambda b: find(b, "RayCluster")["spec"]["authOptions"].__setitem__("mode", "disabled")),
    Mutation("mlflow-service-load-balancer", "no_external_exposure",
             lambda b: find(b, "Service", "mlflow")["spec"].__setitem__("type", "LoadBalancer")),
    Mutation("postgres-service-node-port", "no_external_exposure",
             lambda b: find(b, "Service", "paceray-postgres")["spec"].__setitem__("type", "NodePort")),
    Mutation("ray-head-service-node-port", "no_external_exposure",
             lambda b: _job_cluster(b)["headGroupSpec"].__setitem__("serviceType", "NodePort")),
    Mutation("dashboard-host-port", "no_external_exposure",
             lambda b: find(b, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][1].__setitem__("hostPort", 8265)),
    Mutation("rendered-secret-with-values", "no_literal_secrets",
             lambda b: b.objects.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "paceray-postgres"}, "stringData": {"password": "x"}})),
    Mutation("committed-secret-file", "no_literal_secrets",
             lambda b: b.source_documents.__setitem__("k8s/base/secret.yaml", [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "data": {"password": "eA=="}}])),
    Mutation("committed-secret-generator", "no_literal_secrets",
             lambda b: b.source_documents["k8s/base/kustomization.yaml"][0].__setitem__("secretGenerator", [{"name": "s", "literals": ["password=x"]}])),
    Mutation("postgres-password-literal-env", "no_literal_secrets",
             lambda b: _set_env(_mlflow_container(b), "PGPASSWORD", {"value": "hunter2"})),
    Mutation("ray-token-literal-env", "no_literal_secrets",
             lambda b: _set_env(_job_worker_container(b), "RAY_AUTH_TOKEN", {"value": "abc"})),
    Mutation("password-in-backend-uri", "no_literal_secrets",
             lambda b: _replace_arg(_mlflow_container(b), "--backend-store-uri", "--backend-store-uri=postgresql://mlflow:hunter2@paceray-postgres:5432/mlflow")),
    Mutation("mlflow-without-limits", "resources_on_every_container",
             lambda b: _mlflow_container(b)["resources"].pop("limits")),
    Mutation("submitter-without-resources", "resources_on_every_container",
             lambda b: _submitter(b)["containers"][0].pop("resources")),
    Mutation("postgres-as-root", "non_root_security_context",
             lambda b: find(b, "StatefulSet")["spec"]["template"]["spec"]["securityContext"].update(runAsUser=0, runAsNonRoot=False)),
    Mutation("worker-may-escalate", "non_root_security_context",
             lambda b: _job_worker_container(b)["securityContext"].__setitem__("allowPrivilegeEscalation", True)),
    Mutation("submitter-without-pod-security", "non_root_security_context",
             lambda b: _submitter(b).pop("securityContext")),
    Mutation("mlflow-without-seccomp", "non_root_security_context",
             lambda b: find(b, "Deployment", "mlflow")["spec"]["template"]["spec"]["securityContext"].pop("seccompProfile")),
    Mutation("dockerfile-ends-as-root", "dockerfile_runs_as_ray",
             lambda b: setattr(b, "dockerfile", b.dockerfile + "\nUSER root\n")),
    Mutation("no-default-deny", "network_policies",
             lambda b: b.objects.remove(find(b, "NetworkPolicy", "default-deny-ingress"))),
    Mutation("ray-pods-not-opened", "network_policies",
             lambda b: b.objects.remove(find(b, "NetworkPolicy", "ray-from-namespace"))),
    Mutation("mlflow-open-to-any-ip", "network_policies", _add_ingress_peer({"ipBlock": {"cidr": "0.0.0.0/0"}})),
    Mutation("mlflow-open-to-all-namespaces", "network_policies", _add_ingress_peer({"namespaceSelector": {}})),
    # egress
    Mutation("no-default-deny-egress", "egress_default_deny",
             lambda b: b.objects.remove(find(b, "NetworkPolicy", "default-deny-egress"))),
    Mutation("default-deny-egress-for-ray-pods-only", "egress_default_deny",
             lambda b: find(b, "NetworkPolicy", "default-deny-egress")["spec"].__setitem__(
                 "podSelector", {"matchLabels": {"app.kubernetes.io/component": "ray"}})),
    Mutation("default-deny-egress-allows-all", "egress_default_deny",
             lambda b: find(b, "NetworkPolicy", "default-deny-egress")["spec"].__setitem__("egress", [{}])),
    Mutation("ray-egress-rule-without-to", "egress_bounded", _add_egress_rule("ray-egress", {"ports": [{"protocol": "TCP", "port": 443}]})),
    Mutation("mlflow-egress-to-any-ip", "egress_bounded",
             _add_egress_rule("mlflow-egress", {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}]})),
    Mutation("ray-egress-to-half-the-internet", "egress_bounded",
             _add_egress_rule("ray-egress", {"to": [{"ipBlock": {"cidr": "0.0.0.0/1"}}, {"ipBlock": {"cidr": "128.0.0.0/1"}}]})),
    Mutation("ray-egress-to-all-namespaces", "egress_bounded", _add_egress_rule("ray-egress", {"to": [{"namespaceSelector": {}}]})),
    Mutation("dns-egress-to-kube-system-any-port", "egress_bounded",
             lambda b: _egress(b, "dns-egress")[0].pop("ports")),
    Mutation("ray-egress-to-link-local", "egress_no_metadata_endpoint",
             _add_egress_rule("ray-egress", {"to": [{"ipBlock": {"cidr": "169.254.0.0/16", "except": ["169.254.20.10/32"]}}]})),
    Mutation("submitter-egress-to-metadata", "egress_no_metadata_endpoint",
             _add_egress_rule("ray-submitter-egress", {"to": [{"ipBlock": {"cidr": "169.254.169.254/32"}}], "ports": [{"port": 80}]})),
    Mutation("mlflow-egress-anywhere", "egress_no_metadata_endpoint", _add_egress_rule("mlflow-egress", {})),
    Mutation("no-dns-egress", "egress_reaches_dependencies", lambda b: b.objects.remove(find(b, "NetworkPolicy", "dns-egress"))),
    Mutation("dns-egress-udp-only", "egress_reaches_dependencies", lambda b: _egress(b, "dns-egress")[0]["ports"].pop(1)),
    Mutation("ray-pods-reach-gcs-only", "egress_reaches_dependencies",
             lambda b: _egress(b, "ray-egress")[0].__setitem__("ports", [{"protocol": "TCP", "port": 6379}])),
    Mutation("ray-pods-cannot-reach-mlflow", "egress_reaches_dependencies", lambda b: _egress(b, "ray-egress").pop(1)),
    Mutation("ray-egress-to-wrong-mlflow-port", "egress_reaches_dependencies",
             lambda b: _egress(b, "ray-egress")[1]["ports"][0].__setitem__("port", 5001)),
    Mutation("mlflow-cannot-reach-postgres", "egress_reaches_dependencies",
             lambda b: b.objects.remove(find(b, "NetworkPolicy", "mlflow-egress"))),
    Mutation("user-job-cannot-reach-mlflow", "egress_reaches_dependencies",
             lambda b: b.objects.remove(find(b, "NetworkPolicy", "mlflow-user-setup-egress"))),
    Mutation("submitter-cannot-reach-dashboard", "egress_reaches_dependencies",
             lambda b: _egress(b, "ray-submitter-egress")[0]["ports"][0].__setitem__("port", 10001)),
    # the Kubernetes API and MLflow credentials
    Mutation("job-head-mounts-token", "service_account_tokens_off",
             lambda b: _job_head(b).pop("automountServiceAccountToken")),
    Mutation("worker-mounts-token", "service_account_tokens_off",
             lambda b: find(b, "RayCluster")["spec"]["workerGroupSpecs"][0]["template"]["spec"].__setitem__("automountServiceAccountToken", True)),
    Mutation("submitter-mounts-token", "service_account_tokens_off",
             lambda b: _submitter(b).pop("automountServiceAccountToken")),
    Mutation("user-job-mounts-token", "service_account_tokens_off",
             lambda b: find(b, "Job", "paceray-mlflow-user")["spec"]["template"]["spec"].pop("automountServiceAccountToken")),
    Mutation("autoscaler-on", "service_account_tokens_off",
             lambda b: _job_cluster(b).__setitem__("enableInTreeAutoscaling", True)),
    Mutation("autoscaler-without-token", "service_account_tokens_off",
             lambda b: find(b, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"].__setitem__("automountServiceAccountToken", False),
             "gpu-autoscaling"),
    Mutation("autoscaler-cannot-reach-the-api-server", "service_account_tokens_off",
             lambda b: b.objects.remove(find(b, "NetworkPolicy", "ray-head-api-server-egress")), "gpu-autoscaling"),
    Mutation("autoscaled-worker-mounts-token", "service_account_tokens_off",
             lambda b: find(b, "RayCluster")["spec"]["workerGroupSpecs"][0]["template"]["spec"].__setitem__("automountServiceAccountToken", True),
             "gpu-autoscaling"),
    Mutation("ray-pods-log-in-as-admin", "ray_mlflow_user_not_admin",
             lambda b: [_set_env(c, name, _secret_env("paceray-mlflow-auth", key)) for c in (_job_worker_container(b), _job_head(b)["containers"][0])
                        for name, key in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password"))]),
    Mutation("worker-password-from-admin-secret", "ray_mlflow_user_not_admin",
             lambda b: _set_env(_job_worker_container(b), "MLFLOW_TRACKING_PASSWORD", _secret_env("paceray-mlflow-auth", "password"))),
    Mutation("head-env-from-admin-secret", "ray_mlflow_user_not_admin",
             lambda b: _job_head(b)["containers"][0].__setitem__("envFrom", [{"secretRef": {"name": "paceray-mlflow-auth"}}])),
    Mutation("submitter-mounts-admin-secret", "ray_mlflow_user_not_admin",
             lambda b: _submitter(b).__setitem__("volumes", [{"name": "auth", "secret": {"secretName": "paceray-mlflow-auth"}}])),
    Mutation("user-job-creates-another-user", "ray_mlflow_user_not_admin",
             lambda b: _set_env(_user_job_container(b), "MLFLOW_TRACKING_USERNAME", _secret_env("paceray-mlflow-other", "username"))),
    Mutation("no-user-job", "ray_mlflow_user_not_admin", lambda b: b.objects.remove(find(b, "Job", "paceray-mlflow-user"))),
]
