"""Security checks of rendered manifests: token auth, nothing exposed, no literal secret,
bounded and non-root containers, namespace-only ingress, egress denied but for what each pod uses,
no service account tokens, and the Ray pods' own MLflow user."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from k8s_network import (
    KUBE_DNS, NAMESPACE_NAME_LABEL, Destination, egress_allows, egress_policies, egress_rules, ip_block_reaches,
    selects,
)
from k8s_pods import (
    PodTemplate, command_options, describe, env_by_name, is_secret_ref, mlflow_server, objects_of_kind,
    pod_templates, ray_cluster_specs, selector_matches,
)
from k8s_render import Bundle

KUBERAY_NAMESPACE = "kuberay-system"  # where docs/DEPLOY.md installs the operator
RAY_DASHBOARD_PORT = 8265
SECRET_NAME_PARTS = ("PASSWORD", "TOKEN", "SECRET")
# The link-local metadata service of AWS, GCP, Azure, OpenStack, ... (IPv4), and AWS's IPv6 one.
METADATA_ENDPOINTS = ("169.254.169.254", "fd00:ec2::254")
# An ipBlock shorter than this is the internet in all but name (0.0.0.0/1 + 128.0.0.0/1 = /0).
MIN_IP_BLOCK_PREFIX = 8
MLFLOW_ADMIN_ENV = ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD")
MLFLOW_LOGIN_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


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


# --- egress --------------------------------------------------------------------------------


def _selects_every_pod(selector: dict | None) -> bool:
    selector = selector or {}
    return not selector.get("matchLabels") and not selector.get("matchExpressions")


def check_egress_default_deny(bundle: Bundle) -> list[str]:
    """Every namespace with pods denies all egress to all its pods (podSelector: {}, no egress
    rules), pods the operator creates included; what is allowed is added policy by policy."""
    deny_all = [p for p in egress_policies(bundle.objects) if not egress_rules(p)]
    namespaces = sorted({t.namespace or "default" for t in pod_templates(bundle.objects)})
    return [f"namespace {namespace}: no default-deny egress NetworkPolicy (podSelector: {{}}, policyTypes: [Egress], "
            "no egress rules)" for namespace in namespaces
            if not any(p["metadata"].get("namespace") == namespace and _selects_every_pod(p["spec"].get("podSelector"))
                       for p in deny_all)]


def check_egress_bounded(bundle: Bundle) -> list[str]:
    """No egress rule reaches the internet or the whole cluster: each names its peers (a rule
    without `to` is 0.0.0.0/0), no ipBlock is 0.0.0.0/0 or nearly, and a peer in another namespace
    (the cluster DNS) names that namespace, its pods and the ports."""
    problems = []
    for policy in egress_policies(bundle.objects):
        for rule in egress_rules(policy):
            if not rule.get("to"):
                problems.append(f"{describe(policy)}: an egress rule without `to` reaches every address (0.0.0.0/0)")
            for peer in rule.get("to") or []:
                if "ipBlock" in peer:
                    cidr = peer["ipBlock"].get("cidr", "")
                    try:
                        network = ipaddress.ip_network(cidr, strict=False)
                    except ValueError:
                        problems.append(f"{describe(policy)}: egress ipBlock {cidr!r} is no CIDR")
                        continue
                    if network.prefixlen < MIN_IP_BLOCK_PREFIX:
                        problems.append(f"{describe(policy)}: egress to {cidr} reaches (nearly) every address")
                elif "namespaceSelector" in peer:
                    named = (peer["namespaceSelector"].get("matchLabels") or {}).get(NAMESPACE_NAME_LABEL)
                    pods = (peer.get("podSelector") or {}).get("matchLabels")
                    if not named or not pods or not rule.get("ports"):
                        problems.append(f"{describe(policy)}: egress to {peer} must name one namespace "
                                        f"({NAMESPACE_NAME_LABEL}), its pods and the ports")
    return problems


def check_egress_no_metadata_endpoint(bundle: Bundle) -> list[str]:
    """No egress rule reaches the cloud metadata endpoint (node credentials on most clouds)."""
    problems = []
    for policy in egress_policies(bundle.objects):
        for rule in egress_rules(policy):
            blocks = [peer["ipBlock"] for peer in rule.get("to") or [] if "ipBlock" in peer]
            for address in METADATA_ENDPOINTS:
                try:
                    reached = not rule.get("to") or any(ip_block_reaches(block, address) for block in blocks)
                except ValueError:
                    continue  # not a CIDR: check_egress_bounded says so
                if reached:
                    problems.append(f"{describe(policy)}: egress reaches the metadata endpoint {address}")
    return problems


def _target_port(service: dict, target: Destination, port: int | None = None) -> int | None:
    """The pod port behind a Service port (the first port when `port` is None): policies see that one."""
    for entry in service["spec"].get("ports") or []:
        if port is None or entry.get("port") == port:
            target_port = entry.get("targetPort", entry.get("port"))
            return target.named_ports.get(target_port) if isinstance(target_port, str) else target_port
    return None


def _service_backend(objects: list[dict], namespace: str | None, host: str, port: int) -> tuple[PodTemplate, int] | None:
    """The pods and pod port behind `host:port` when host names a Service of the namespace."""
    name = host.split(".")[0]
    for service in objects_of_kind(objects, "Service"):
        if service["metadata"]["name"] == name and service["metadata"].get("namespace") == namespace and service["spec"].get("selector"):
            for template in pod_templates(objects):
                if template.namespace == namespace and selector_matches({"matchLabels": service["spec"]["selector"]}, template.labels):
                    target_port = _target_port(service, Destination.of(template), port)
                    return (template, target_port) if target_port else None
    return None


def check_egress_reaches_dependencies(bundle: Bundle) -> list[str]:
    """With egress denied, what the pods connect to is allowed: the cluster DNS (UDP and TCP 53)
    from every pod; MLflow's port from every pod with MLFLOW_TRACKING_URI; MLflow's backend store
    from MLflow; every port between the pods of one Ray cluster (raycluster.yaml pins GCS,
    dashboard and client ports only; raylet, object manager, agents, workers and NCCL take others);
    the head's dashboard port from the RayJob's submitter."""
    objects = bundle.objects
    templates = list(pod_templates(objects))
    problems = []

    def need(source: PodTemplate, destination: Destination, protocol: str, port: int | None, why: str) -> None:
        if not egress_allows(objects, source, destination, protocol, port):
            problems.append(f"{source.where}: egress to {destination.where} on {protocol} "
                            f"{port if port is not None else 'every port'} is not allowed ({why})")

    for template in templates:
        for protocol in ("UDP", "TCP"):
            need(template, KUBE_DNS, protocol, 53, "name resolution")
    server, container, service = mlflow_server(objects)
    if server is not None and service is not None:
        destination = Destination.of(server)
        port = _target_port(service, destination)
        for template in templates:
            if any("MLFLOW_TRACKING_URI" in env_by_name(c) for c in template.containers()):
                need(template, destination, "TCP", port, "its MLFLOW_TRACKING_URI")
        backend = urlsplit(command_options(container).get("--backend-store-uri") or "")
        if backend.hostname:
            found = _service_backend(objects, server.namespace, backend.hostname, backend.port or 5432)
            if found is None:
                problems.append(f"{server.where}: the backend store host {backend.hostname} is no Service here")
            else:
                need(server, Destination.of(found[0]), "TCP", found[1], "--backend-store-uri")
    nodes = [t for t in templates if t.role in ("ray-head", "ray-worker")]
    for source in nodes:
        for target in nodes:
            if target.cluster == source.cluster:
                need(source, Destination.of(target), "TCP", None, "Ray's own ports")
    dashboard_ports = {describe(owner): int(((spec.get("headGroupSpec") or {}).get("rayStartParams") or {}).get("dashboard-port", RAY_DASHBOARD_PORT))
                       for owner, spec in ray_cluster_specs(objects)}
    for submitter in (t for t in templates if t.role == "ray-submitter"):
        for head in (t for t in nodes if t.role == "ray-head" and t.cluster == submitter.cluster):
            need(submitter, Destination.of(head), "TCP", dashboard_ports.get(submitter.cluster, RAY_DASHBOARD_PORT),
                 "ray job submit")
    return problems


# --- the Kubernetes API and MLflow credentials ---------------------------------------------


API_SERVER_PORTS = (443, 6443)  # managed clusters' API server, kubeadm's


def _egress_to_an_address_on(objects: list[dict], template, ports: tuple[int, ...]) -> bool:
    """Does some egress rule of a policy selecting `template` allow an ipBlock on one of `ports`?"""
    for policy in egress_policies(objects):
        if not selects(policy, template):
            continue
        for rule in egress_rules(policy):
            if not any("ipBlock" in peer for peer in rule.get("to") or []):
                continue
            allowed = rule.get("ports") or []
            if not allowed or any(e.get("protocol", "TCP") == "TCP" and isinstance(e.get("port"), int)
                                  and any(e["port"] <= p <= e.get("endPort", e["port"]) for p in ports) for e in allowed):
                return True
    return False


def check_service_account_tokens_off(bundle: Bundle) -> list[str]:
    """Only KubeRay's in-tree autoscaler calls the Kubernetes API: the head of a cluster with
    enableInTreeAutoscaling mounts its service account token (the autoscaler sidecar scales the
    worker groups with it) and an egress policy lets it reach an address on the API server's
    port. Every other pod (Ray workers, which run user code, the submitter, MLflow, PostgreSQL)
    mounts none."""
    autoscaled = {describe(owner) for owner, spec in ray_cluster_specs(bundle.objects) if spec.get("enableInTreeAutoscaling")}
    problems = []
    for t in pod_templates(bundle.objects):
        autoscaler_head = t.role == "ray-head" and t.cluster in autoscaled
        mounted = t.spec.get("automountServiceAccountToken")
        if not autoscaler_head and mounted is not False:
            problems.append(f"{t.where}: automountServiceAccountToken must be false (nothing in it calls the API server)")
        if autoscaler_head and mounted is not True:
            problems.append(f"{t.where}: the in-tree autoscaler needs the head's service account token "
                            f"(automountServiceAccountToken: true)")
        if autoscaler_head and not _egress_to_an_address_on(bundle.objects, t, API_SERVER_PORTS):
            problems.append(f"{t.where}: the in-tree autoscaler cannot reach the API server "
                            f"(no egress policy allows an ipBlock on TCP {' or '.join(map(str, API_SERVER_PORTS))})")
    return problems


def _secret_key(entry: dict | None) -> tuple[str, str] | None:
    ref = ((entry or {}).get("valueFrom") or {}).get("secretKeyRef") if is_secret_ref(entry) else None
    return (ref.get("name"), ref.get("key")) if ref else None


def _secrets_read(template: PodTemplate) -> set[str]:
    """Every Secret a pod reads: env, envFrom, secret and projected volumes."""
    names = set()
    for container in template.containers():
        names |= {key[0] for entry in container.get("env") or [] if (key := _secret_key(entry))}
        names |= {(source.get("secretRef") or {}).get("name") for source in container.get("envFrom") or []}
    for volume in template.spec.get("volumes") or []:
        names.add((volume.get("secret") or {}).get("secretName"))
        names |= {(source.get("secret") or {}).get("name") for source in (volume.get("projected") or {}).get("sources") or []}
    return names - {None}


def _login(container: dict) -> tuple[tuple[str, str] | None, ...]:
    env = env_by_name(container)
    return tuple(_secret_key(env.get(name)) for name in MLFLOW_LOGIN_ENV)


def check_ray_mlflow_user_not_admin(bundle: Bundle) -> list[str]:
    """The Ray pods log in to MLflow as a user of their own: no Ray pod reads the Secret the
    server takes its admin from, they all log in as one user, and a Job logs in as the admin
    (MLFLOW_AUTH_ADMIN_* from that Secret) to create that very user (its MLFLOW_TRACKING_*)."""
    _, server, _ = mlflow_server(bundle.objects)
    if server is None:
        return ["no MLflow server Deployment (command: mlflow)"]
    server_env = env_by_name(server)
    admin_secrets = {key[0] for name in MLFLOW_ADMIN_ENV if (key := _secret_key(server_env.get(name)))}
    if not admin_secrets:
        return ["mlflow env MLFLOW_AUTH_ADMIN_USERNAME / _PASSWORD must come from a Secret"]
    problems, logins = [], set()
    for template in pod_templates(bundle.objects):
        if not template.role.startswith("ray-"):
            continue
        if _secrets_read(template) & admin_secrets:
            problems.append(f"{template.where}: reads the MLflow admin's Secret {sorted(_secrets_read(template) & admin_secrets)}")
        logins |= {_login(c) for c in template.containers() if any(n in env_by_name(c) for n in MLFLOW_LOGIN_ENV)}
    if len(logins) > 1:
        problems.append(f"Ray pods log in to MLflow with different Secrets: {sorted(map(str, logins))}")
    creators = [_login(c) for t in pod_templates(bundle.objects) if t.owner.startswith("Job/") for c in t.containers()
                if {k[0] for n in MLFLOW_ADMIN_ENV if (k := _secret_key(env_by_name(c).get(n)))} == admin_secrets]
    for login in logins:
        if None not in login and login not in creators:
            problems.append(f"no Job logs in as the MLflow admin and creates the Ray pods' user {login}")
    return problems
