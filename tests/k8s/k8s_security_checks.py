"""Security checks of rendered manifests: token auth, nothing exposed, no literal secret,
bounded and non-root containers, namespace-only network policies."""

from __future__ import annotations

import re

from k8s_pods import describe, objects_of_kind, pod_templates, ray_cluster_specs, selector_matches
from k8s_render import Bundle

KUBERAY_NAMESPACE = "kuberay-system"  # where docs/DEPLOY.md installs the operator
RAY_DASHBOARD_PORT = 8265
SECRET_NAME_PARTS = ("PASSWORD", "TOKEN", "SECRET")


def check_ray_token_auth(bundle: Bundle) -> list[str]:
    problems = []
    for owner, spec in ray_cluster_specs(bundle.objects):
        auth = spec.get("authOptions") or {}
        if auth.get("mode") != "token" or not auth.get("secretName"):
            problems.append(f"{describe(owner)}: authOptions must be mode: token with a secretName")
    return problems


def check_no_external_exposure(bundle: Bundle) -> list[str]:
    """Dashboard, Jobs API, GCS and MLflow stay inside the cluster (kubectl port-forward only)."""
    problems = []
    for obj in bundle.objects:
        if obj.get("kind") == "Service":
            spec = obj.get("spec", {})
            if spec.get("type") in ("LoadBalancer", "NodePort") or spec.get("externalIPs"):
                problems.append(f"{describe(obj)}: type {spec.get('type')} / externalIPs exposes it outside the cluster")
        elif obj.get("kind") in ("Ingress", "Gateway", "HTTPRoute", "Route"):
            problems.append(f"{describe(obj)}: exposes a service outside the cluster")
    for owner, spec in ray_cluster_specs(bundle.objects):
        head = spec.get("headGroupSpec") or {}
        service_type = head.get("serviceType") or ((head.get("headService") or {}).get("spec") or {}).get("type")
        if service_type in ("LoadBalancer", "NodePort"):
            problems.append(f"{describe(owner)}: head service type {service_type}")
        if head.get("enableIngress"):
            problems.append(f"{describe(owner)}: head enableIngress")
    for template in pod_templates(bundle.objects):
        if template.spec.get("hostNetwork"):
            problems.append(f"{template.where}: hostNetwork")
        for container in template.containers():
            if any("hostPort" in p for p in container.get("ports") or []):
                problems.append(f"{template.where} {container.get('name')}: hostPort")
    return problems


_URI_PASSWORD = re.compile(r"://[^/@\s:]+:(?!\$\()[^@\s/]+@")


def check_no_literal_secrets(bundle: Bundle) -> list[str]:
    problems = []
    documents = [(f"rendered {describe(o)}", o) for o in bundle.objects]
    documents += [(path, d) for path, docs in bundle.source_documents.items() for d in docs if isinstance(d, dict)]
    for where, doc in documents:
        if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
            problems.append(f"{where}: a Secret with values; create it with kubectl create secret")
        if doc.get("kind") == "Kustomization":
            for generator in doc.get("secretGenerator") or []:
                if generator.get("literals") or generator.get("files") or generator.get("envs"):
                    problems.append(f"{where}: secretGenerator with values in the repository")
    for template in pod_templates(bundle.objects):
        for container in template.containers():
            where = f"{template.where} {container.get('name')}"
            for entry in container.get("env") or []:
                if any(part in entry.get("name", "").upper() for part in SECRET_NAME_PARTS) and "value" in entry:
                    problems.append(f"{where}: env {entry['name']} has a literal value; use secretKeyRef")
                if _URI_PASSWORD.search(str(entry.get("value", ""))):
                    problems.append(f"{where}: env {entry['name']} holds a URI with a password")
            for token in list(container.get("command") or []) + list(container.get("args") or []):
                if _URI_PASSWORD.search(str(token)):
                    problems.append(f"{where}: argument holds a URI with a password")
    return problems


def check_resources_on_every_container(bundle: Bundle) -> list[str]:
    problems = []
    for template in pod_templates(bundle.objects):
        for container in template.containers():
            resources = container.get("resources") or {}
            for kind in ("requests", "limits"):
                missing = [r for r in ("cpu", "memory") if r not in (resources.get(kind) or {})]
                if missing:
                    problems.append(f"{template.where} {container.get('name')}: no {kind} for {missing}")
    for owner, spec in ray_cluster_specs(bundle.objects):
        if spec.get("enableInTreeAutoscaling"):
            resources = (spec.get("autoscalerOptions") or {}).get("resources") or {}
            if not resources.get("requests") or not resources.get("limits"):
                problems.append(f"{describe(owner)}: autoscaler sidecar without requests and limits")
    return problems


def check_non_root_security_context(bundle: Bundle) -> list[str]:
    problems = []
    for template in pod_templates(bundle.objects):
        pod_context = template.spec.get("securityContext") or {}
        for container in template.containers():
            where = f"{template.where} {container.get('name')}"
            context = {**pod_context, **(container.get("securityContext") or {})}
            if context.get("runAsNonRoot") is not True:
                problems.append(f"{where}: runAsNonRoot must be true")
            if context.get("runAsUser") == 0:
                problems.append(f"{where}: runAsUser 0")
            if context.get("privileged"):
                problems.append(f"{where}: privileged")
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation must be false")
            if "ALL" not in ((context.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{where}: capabilities must drop ALL")
            if (context.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{where}: seccompProfile must be RuntimeDefault")
    for owner, spec in ray_cluster_specs(bundle.objects):
        if spec.get("enableInTreeAutoscaling"):
            context = (spec.get("autoscalerOptions") or {}).get("securityContext") or {}
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{describe(owner)}: autoscaler sidecar securityContext")
    return problems


def check_dockerfile_runs_as_ray(bundle: Bundle) -> list[str]:
    users = re.findall(r"^\s*USER\s+(\S+)", bundle.dockerfile, re.MULTILINE)
    if not users or users[-1].split(":")[0] not in ("ray", "1000"):
        return [f"platform/Dockerfile: the final USER is {users[-1] if users else 'unset'}, not the image's ray user"]
    return []


def _peer_is_namespace_local(peer: dict, ports: list) -> bool:
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" not in peer:
        return "podSelector" in peer
    # The one exception: the KubeRay operator polling the Ray dashboard.
    pinned = (peer["namespaceSelector"].get("matchLabels") or {}).get("kubernetes.io/metadata.name")
    return (pinned == KUBERAY_NAMESPACE and bool((peer.get("podSelector") or {}).get("matchLabels"))
            and bool(ports) and all(p.get("port") == RAY_DASHBOARD_PORT for p in ports))


def check_network_policies(bundle: Bundle) -> list[str]:
    """Ingress denied by default; what listens is opened to pods of the namespace only."""
    policies = [p for p in objects_of_kind(bundle.objects, "NetworkPolicy") if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    problems = []
    if not any(p["spec"].get("podSelector") in ({}, None) and not p["spec"].get("ingress") for p in policies):
        problems.append("no default-deny ingress NetworkPolicy (podSelector: {}, no ingress rules)")
    for policy in policies:
        for rule in policy["spec"].get("ingress") or []:
            if not rule.get("from"):
                problems.append(f"{describe(policy)}: an ingress rule without `from` admits every source")
            for peer in rule.get("from") or []:
                if not _peer_is_namespace_local(peer, rule.get("ports") or []):
                    problems.append(f"{describe(policy)}: ingress from {peer} reaches beyond the namespace")
    for template in pod_templates(bundle.objects):
        listens = template.role in ("ray-head", "ray-worker") or any(c.get("ports") for c in template.containers())
        opened = any(p["metadata"].get("namespace") == template.namespace and p["spec"].get("ingress")
                     and selector_matches(p["spec"].get("podSelector"), template.labels) for p in policies)
        if listens and not opened:
            problems.append(f"{template.where}: listens but no NetworkPolicy admits its in-namespace clients")
    return problems
