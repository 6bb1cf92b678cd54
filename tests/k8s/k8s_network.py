"""NetworkPolicy semantics the checks need: which policies isolate a pod's egress, and whether a pod
may open a connection to another pod (or an address) on a port.

As the API server defines it: a pod no Egress policy selects may reach anything; once one selects
it, it reaches only what some rule of a selecting policy allows. A rule without `to` allows every
destination, one without `ports` every port. A podSelector alone means this namespace; with a
namespaceSelector, the namespaces it matches. ipBlocks are addresses outside the cluster: they are
not taken to match pods (whose addresses nobody knows offline).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from k8s_pods import PodTemplate, objects_of_kind, selector_matches

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set on every namespace by the API server


@dataclass
class Destination:
    """A pod a connection goes to, as policies see it: its namespace, labels and named ports."""

    where: str
    namespace: str
    labels: dict
    named_ports: dict = field(default_factory=dict)

    @classmethod
    def of(cls, template: PodTemplate) -> "Destination":
        ports = {p["name"]: p["containerPort"] for c in template.containers() for p in c.get("ports") or [] if p.get("name")}
        return cls(template.where, template.namespace or "default", template.labels, ports)


KUBE_DNS = Destination("the cluster DNS (k8s-app: kube-dns in kube-system)", "kube-system", {"k8s-app": "kube-dns"},
                       {"dns": 53, "dns-tcp": 53})


def network_policies(objects: list[dict]) -> list[dict]:
    return objects_of_kind(objects, "NetworkPolicy")


def policy_types(policy: dict) -> list[str]:
    """policyTypes, or what the API server defaults it to: Ingress, and Egress if there are egress rules."""
    spec = policy.get("spec") or {}
    return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if spec.get("egress") else []))


def egress_policies(objects: list[dict]) -> list[dict]:
    return [p for p in network_policies(objects) if "Egress" in policy_types(p)]


def selects(policy: dict, template: PodTemplate) -> bool:
    return (policy["metadata"].get("namespace") == template.namespace
            and selector_matches((policy.get("spec") or {}).get("podSelector"), template.labels))


def egress_rules(policy: dict) -> list[dict]:
    return (policy.get("spec") or {}).get("egress") or []


def _peer_matches(peer: dict, source_namespace: str | None, destination: Destination) -> bool:
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        namespace_labels = {NAMESPACE_NAME_LABEL: destination.namespace}
        if not selector_matches(peer["namespaceSelector"], namespace_labels):
            return False
    elif destination.namespace != (source_namespace or "default"):
        return False
    return selector_matches(peer.get("podSelector"), destination.labels)


def _port_matches(entry: dict, destination: Destination, protocol: str, port: int | None) -> bool:
    """One `ports` entry against a connection; port None asks for every port of the protocol."""
    if entry.get("protocol", "TCP") != protocol:
        return False
    allowed = entry.get("port")
    if allowed is None:
        return True
    if port is None:
        return False
    if isinstance(allowed, str):
        return destination.named_ports.get(allowed) == port
    return allowed <= port <= entry.get("endPort", allowed)


def _rule_allows(rule: dict, source_namespace: str | None, destination: Destination, protocol: str, port: int | None) -> bool:
    peers = rule.get("to") or []
    if peers and not any(_peer_matches(peer, source_namespace, destination) for peer in peers):
        return False
    ports = rule.get("ports") or []
    return not ports or any(_port_matches(entry, destination, protocol, port) for entry in ports)


def egress_allows(objects: list[dict], source: PodTemplate, destination: Destination, protocol: str,
                  port: int | None) -> bool:
    """May pods of `source` connect to `destination` on protocol/port (None: on every port)?"""
    selecting = [p for p in egress_policies(objects) if selects(p, source)]
    if not selecting:
        return True  # not isolated for egress
    return any(_rule_allows(rule, source.namespace, destination, protocol, port)
               for policy in selecting for rule in egress_rules(policy))


def ip_block_reaches(ip_block: dict, address: str) -> bool:
    """Does the ipBlock hold `address`, not cut out by its `except` list?"""
    target = ipaddress.ip_address(address)
    network = ipaddress.ip_network(ip_block["cidr"], strict=False)
    if target.version != network.version or target not in network:
        return False
    return not any(target in ipaddress.ip_network(cut, strict=False) for cut in ip_block.get("except") or []
                   if ipaddress.ip_network(cut, strict=False).version == target.version)
