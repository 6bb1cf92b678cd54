"""A real `mlflow server`, started with the rendered Deployment's own command, arguments, environment
and mounted ConfigMap, answers the Host headers in-cluster clients and kubectl port-forward send,
refuses an unlisted one, and enforces basic auth. Against it, the Job paceray-mlflow-user and the
Ray head's init container wait-for-mlflow-user run with their own commands and environment: the
Job makes the Ray pods' user (twice: a re-run keeps it), the init container waits for it, and that
user logs runs, metrics and artifacts but cannot manage users or permissions.

Only what cannot run here is substituted: SQLite for the PostgreSQL backend store, temporary
folders for the volumes, loopback and a free port for 0.0.0.0:5000, the test's Python for
`python`, and generated values for the Secret references. `--allowed-hosts`, `--app-name`,
`--serve-artifacts`, `--workers`, the auth config and the clients' MLFLOW_TRACKING_URI stay as
the manifests have them: the clients' connections to the Service's name are routed to the
server, so they send the in-cluster Host header, as in the cluster.
"""

import base64
import configparser
import http.client
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from k8s_pods import env_by_name
from k8s_render import KUSTOMIZATIONS, render

READY_TIMEOUT_S = 90
# The manifest trusts a checked credential for a minute per server worker (basic_auth.ini), so a
# rotated password dies within that minute, not at once. The test's server trusts it this long,
# so the rotation check below waits seconds rather than the manifest's minute.
TEST_AUTH_CACHE_TTL_S = 3
UNLISTED_HOST = "attacker.example:5000"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (here, not from paceray: these tests stand alone)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _find(objects, kind, name):
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


class _Mounts:
    """The pod's mount paths laid under a temporary folder; rewrites paths that point into them."""

    def __init__(self, root: Path, pod_spec: dict, container: dict, objects: list[dict]):
        self.root = root
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


def _shorten_auth_cache(ini: Path) -> None:
    config = configparser.ConfigParser()
    config.read(ini)
    assert config.getint("mlflow", "auth_cache_ttl_seconds") > 0, "basic_auth.ini no longer caches credentials"
    config["mlflow"]["auth_cache_ttl_seconds"] = str(TEST_AUTH_CACHE_TTL_S)
    with ini.open("w") as out:
        config.write(out)


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


def _container_env(container: dict, mounts: _Mounts, secret_values: dict) -> dict:
    """The container's environment, Secret references filled from (and into) `secret_values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and not k.lower().endswith("_proxy")}
    for name, entry in env_by_name(container).items():
        if "value" in entry:
            env[name] = mounts.rewrite(entry["value"])
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[name] = secret_values.setdefault((ref["name"], ref["key"]), secrets.token_urlsafe(18))
    return env


# Imported by the client's Python at start (sitecustomize): connections to the Service's name and
# port go to the test's server instead, as the cluster DNS and the Service would send them.
_ROUTE = """import socket
_connect = socket.create_connection
def _create_connection(address, *args, **kwargs):
    return _connect({target!r} if tuple(address[:2]) == {service!r} else address, *args, **kwargs)
socket.create_connection = _create_connection
"""


def _run_client(container: dict, mounts: _Mounts, secret_values: dict, port: int, **extra_env) -> subprocess.CompletedProcess:
    """A client container's command (`python` is this Python) with its own environment; its
    MLFLOW_TRACKING_URI is left alone and its host:port routed to the server on `port`."""
    command = [sys.executable if token == "python" else mounts.rewrite(token)
               for token in list(container["command"]) + list(container.get("args") or [])]
    env = {**_container_env(container, mounts, secret_values), **extra_env}
    service = urlsplit(env["MLFLOW_TRACKING_URI"])
    route = mounts.root / "route"
    route.mkdir(parents=True, exist_ok=True)
    (route / "sitecustomize.py").write_text(_ROUTE.format(target=("127.0.0.1", port), service=(service.hostname, service.port)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(route), env.get("PYTHONPATH")]))
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


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
    env = _container_env(container, mounts, secret_values)
    credentials = (env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"])
    _shorten_auth_cache(Path(env["MLFLOW_AUTH_CONFIG_PATH"]))
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
        status, body_of_create = _request(port, "POST", "/api/2.0/mlflow/experiments/create", in_cluster_host, credentials, create)
        assert status == 200, body_of_create[:300]
        upload = "/api/2.0/mlflow-artifacts/artifacts/k8s-check/hello.txt"
        status, body = _request(port, "PUT", upload, in_cluster_host, credentials, b"hello")
        assert status == 200, body[:300]
        assert (artifacts / "k8s-check" / "hello.txt").read_bytes() == b"hello"  # --artifacts-destination
        auth_config = configparser.ConfigParser()
        auth_config.read(env["MLFLOW_AUTH_CONFIG_PATH"])
        auth_database = auth_config["mlflow"]["database_uri"].removeprefix("sqlite:///")
        assert Path(auth_database).is_file(), "the basic_auth.ini from the ConfigMap was not used"
        admin_experiment = json.loads(body_of_create)["experiment_id"]
        _check_ray_user(objects, tmp_path, secret_values, port, in_cluster_host, credentials, admin_experiment)
    finally:
        _stop_group(process)


def _check_ray_user(objects, tmp_path, secret_values, port, host, admin, admin_experiment):
    job_spec = _find(objects, "Job", "paceray-mlflow-user")["spec"]["template"]["spec"]
    job = job_spec["containers"][0]
    head_spec = _find(objects, "RayCluster", "paceray")["spec"]["headGroupSpec"]["template"]["spec"]
    wait = next(c for c in head_spec["initContainers"] if c["name"] == "wait-for-mlflow-user")
    job_mounts = _Mounts(tmp_path / "job", job_spec, job, objects)
    head_mounts = _Mounts(tmp_path / "head", head_spec, wait, objects)
    secret_values.setdefault(("paceray-mlflow-ray", "username"), "paceray-ray")
    ray = tuple(_container_env(wait, head_mounts, secret_values)[n] for n in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"))
    assert ray[0] != admin[0]

    early = _run_client(wait, head_mounts, secret_values, port, MLFLOW_WAIT_TIMEOUT_S="0")
    assert early.returncode != 0 and f"does not let {ray[0]} in" in early.stderr and "401" in early.stderr, early.stderr[-2000:]
    made = _run_client(job, job_mounts, secret_values, port)
    assert made.returncode == 0 and "created" in made.stdout and "not an admin" in made.stdout, made.stdout + made.stderr
    waited = _run_client(wait, head_mounts, secret_values, port)
    assert waited.returncode == 0, waited.stderr[-2000:]

    def call(method, path, payload=None, credentials=None):
        body = payload if isinstance(payload, bytes) or payload is None else json.dumps(payload).encode()
        return _request(port, method, path, host, credentials or ray, body)

    status, body = call("GET", "/api/2.0/mlflow/users/current")
    assert status == 200 and json.loads(body)["user"]["is_admin"] is False, body[:300]
    # A rotation as docs/DEPLOY.md has it: a new password in the Secret, the Job run again.
    secret_values[("paceray-mlflow-ray", "password")] = rotated = secrets.token_urlsafe(18)
    made = _run_client(job, job_mounts, secret_values, port)
    assert made.returncode == 0 and "exists" in made.stdout, made.stdout + made.stderr
    # The worker that served the Job forgets the old password at once; the other one within its TTL.
    deadline = time.monotonic() + TEST_AUTH_CACHE_TTL_S + 10
    while call("GET", "/api/2.0/mlflow/users/current")[0] != 401:
        assert time.monotonic() < deadline, "the old password still works past the credential cache's TTL"
        time.sleep(0.5)
    ray = (ray[0], rotated)
    assert call("GET", "/api/2.0/mlflow/users/current")[0] == 200
    # What a search does: its own experiment, runs in an experiment another user made, metrics, artifacts.
    status, body = call("POST", "/api/2.0/mlflow/experiments/create", {"name": "ray-user-check"})
    assert status == 200, body[:300]
    for experiment in (json.loads(body)["experiment_id"], admin_experiment):
        status, body = call("POST", "/api/2.0/mlflow/runs/create", {"experiment_id": experiment})
        assert status == 200, body[:300]
        run_id = json.loads(body)["run"]["info"]["run_id"]
        metric = {"run_id": run_id, "key": "eval/fid", "value": 12.5, "timestamp": 0, "step": 1}
        assert call("POST", "/api/2.0/mlflow/runs/log-metric", metric)[0] == 200
        artifact = f"/api/2.0/mlflow-artifacts/artifacts/{experiment}/{run_id}/artifacts/samples.txt"
        assert call("PUT", artifact, b"samples")[0] == 200
        assert call("POST", "/api/2.0/mlflow/runs/update", {"run_id": run_id, "status": "FINISHED"})[0] == 200
    # What only an admin does: users, admin rights, permissions; and deleting another's experiment.
    refused = [
        ("POST", "/api/2.0/mlflow/users/create", {"username": "eve", "password": "e" * 16}),
        ("PATCH", "/api/2.0/mlflow/users/update-admin", {"username": ray[0], "is_admin": True}),
        ("PATCH", "/api/2.0/mlflow/users/update-password", {"username": admin[0], "password": "p" * 16}),
        ("DELETE", "/api/2.0/mlflow/users/delete", {"username": admin[0]}),
        ("POST", "/api/3.0/mlflow/users/permissions/grant",
         {"username": ray[0], "resource_type": "experiment", "resource_id": admin_experiment, "permission": "MANAGE"}),
        ("POST", "/api/2.0/mlflow/experiments/delete", {"experiment_id": admin_experiment}),
    ]
    for method, path, payload in refused:
        status, body = call(method, path, payload)
        assert status == 403, f"{method} {path} as {ray[0]}: {status} {body[:300]!r}"
    assert _request(port, "GET", "/api/2.0/mlflow/users/current", host, admin)[0] == 200  # the admin is intact
