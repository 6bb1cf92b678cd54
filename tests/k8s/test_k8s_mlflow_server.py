"""A real `mlflow server`, started with the rendered Deployment's own command, arguments, environment
and mounted ConfigMap, answers the Host headers in-cluster clients and kubectl port-forward send,
refuses an unlisted one, and enforces basic auth.

Only what cannot run here is substituted: SQLite for the PostgreSQL backend store, temporary
folders for the volumes, loopback and a free port for 0.0.0.0:5000, and generated values for
the Secret references. `--allowed-hosts`, `--app-name`, `--serve-artifacts`, `--workers` and the
auth config stay as the manifest has them.
"""

import base64
import configparser
import http.client
import json
import os
import re
import secrets
import signal
import subprocess
import sysconfig
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from paceray.tracking import free_port
from k8s_pods import env_by_name
from k8s_render import KUSTOMIZATIONS, render

READY_TIMEOUT_S = 90
UNLISTED_HOST = "attacker.example:5000"


def _find(objects, kind, name):
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


class _Mounts:
    """The pod's mount paths laid under a temporary folder; rewrites paths that point into them."""

    def __init__(self, root: Path, pod_spec: dict, container: dict, objects: list[dict]):
        volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
        self.paths = {}
        for mount in container.get("volumeMounts", []):
            local = root / mount["mountPath"].lstrip("/")
            local.mkdir(parents=True, exist_ok=True)
            self.paths[mount["mountPath"]] = local
            config_map = volumes[mount["name"]].get("configMap")
            if config_map:
                for filename, text in _find(objects, "ConfigMap", config_map["name"])["data"].items():
                    (local / filename).write_text(self.rewrite(text))

    def rewrite(self, text: str) -> str:
        for mount_path in sorted(self.paths, key=len, reverse=True):
            pattern = r"(?<![\w.-])" + re.escape(mount_path) + r"(?=/|$|\s|,)"
            text = re.sub(pattern, lambda _: str(self.paths[mount_path]), text, flags=re.MULTILINE)
        return text


def _server_command(container: dict, mounts: _Mounts, database: Path, port: int) -> list[str]:
    mlflow = Path(sysconfig.get_path("scripts")) / "mlflow"
    substituted = {"--backend-store-uri": f"sqlite:///{database}", "--host": "127.0.0.1", "--port": str(port)}
    command = [str(mlflow)] + list(container["command"][1:])
    for arg in container["args"]:
        name = arg.partition("=")[0]
        command.append(f"{name}={substituted[name]}" if name in substituted else mounts.rewrite(arg))
    missing = [name for name in substituted if not any(a.startswith(name + "=") for a in command)]
    assert not missing, f"the manifest's mlflow args no longer use the --name=value form for {missing}"
    return command


def _server_env(container: dict, mounts: _Mounts, secret_values: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    for name, entry in env_by_name(container).items():
        if "value" in entry:
            env[name] = mounts.rewrite(entry["value"])
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[name] = secret_values.setdefault((ref["name"], ref["key"]), secrets.token_urlsafe(18))
    return env


def _request(port: int, method: str, path: str, host: str, credentials=None, body: bytes | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Host": host}
    if credentials:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
    if body is not None:
        headers["Content-Type"] = "application/json" if body.startswith(b"{") else "application/octet-stream"
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _wait_until_ready(process: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if _request(port, "GET", "/health", "localhost")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow server not ready after {READY_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def _stop_group(process: subprocess.Popen) -> None:
    # mlflow leaves uvicorn workers and huey consumers behind: end the whole process group.
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            try:  # the leader is gone; make sure no child of the group lingers
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return


@pytest.mark.slow
def test_mlflow_server_with_manifest_arguments(tmp_path):
    objects = render(KUSTOMIZATIONS["gpu"])
    deployment = _find(objects, "Deployment", "mlflow")
    pod_spec = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod_spec["containers"] if c["command"][0] == "mlflow")
    ray_head = _find(objects, "RayCluster", "paceray")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    in_cluster_host = urlsplit(env_by_name(ray_head)["MLFLOW_TRACKING_URI"]["value"]).netloc

    mounts = _Mounts(tmp_path / "pod", pod_spec, container, objects)
    secret_values = {("paceray-mlflow-auth", "username"): "paceray-admin"}
    env = _server_env(container, mounts, secret_values)
    credentials = (env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"])
    port = free_port()
    command = _server_command(container, mounts, tmp_path / "mlflow.db", port)
    artifacts = Path(next(a for a in command if a.startswith("--artifacts-destination=")).partition("=")[2])

    log = tmp_path / "mlflow.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        _wait_until_ready(process, port, log)
        search = "/api/2.0/mlflow/experiments/search?max_results=1"
        for host in (in_cluster_host, "localhost:5000", "127.0.0.1:5000"):
            status, body = _request(port, "GET", search, host, credentials)
            assert status == 200, f"Host {host}: {status} {body[:300]!r}"
        assert _request(port, "GET", search, UNLISTED_HOST, credentials)[0] == 403
        assert _request(port, "GET", search, in_cluster_host)[0] == 401  # basic auth is on

        create = json.dumps({"name": "k8s-manifest-check"}).encode()
        status, body = _request(port, "POST", "/api/2.0/mlflow/experiments/create", in_cluster_host, credentials, create)
        assert status == 200, body[:300]
        upload = "/api/2.0/mlflow-artifacts/artifacts/k8s-check/hello.txt"
        status, body = _request(port, "PUT", upload, in_cluster_host, credentials, b"hello")
        assert status == 200, body[:300]
        assert (artifacts / "k8s-check" / "hello.txt").read_bytes() == b"hello"  # --artifacts-destination
        auth_config = configparser.ConfigParser()
        auth_config.read(env["MLFLOW_AUTH_CONFIG_PATH"])
        auth_database = auth_config["mlflow"]["database_uri"].removeprefix("sqlite:///")
        assert Path(auth_database).is_file(), "the basic_auth.ini from the ConfigMap was not used"
    finally:
        _stop_group(process)
