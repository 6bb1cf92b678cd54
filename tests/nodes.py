"""A real multi-node Ray cluster on this machine, for the tests that need more than one node.

Each node is a `ray start --block` of its own, with its own resources. Where network namespaces
can be made (root, `ip netns`), the head listens on a private subnet of its own (10.231-254.X.1
on a bridge the cluster creates) and every worker node runs in a namespace of its own on the
next address of that subnet, joined to the bridge by a veth pair: the nodes talk over real,
distinct addresses, as on a cluster. Elsewhere every node runs on 127.0.0.1 (Ray allows several
raylets on one address), so the same tests still run. The cluster removes exactly what it
made: its nodes' process sessions, its namespaces, its bridge.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import kill_session

RAY = str(Path(sys.executable).parent / "ray")


def namespaces_possible() -> bool:
    """Whether this process may create network namespaces (tried, then removed)."""
    if shutil.which("ip") is None:
        return False
    name = f"paceray-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    if made:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return made


def _ip(*args: str, netns: str | None = None) -> None:
    argv = ["ip", *(["netns", "exec", netns, "ip"] if netns else []), *args]
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(argv)}: {r.stderr.strip()}"


def _free_subnet() -> str:
    """A /24 in 10.231.0.0-10.254.255.0 that no interface here uses: `10.A.B`."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for _ in range(100):
        prefix = f"10.{secrets.choice(range(231, 255))}.{secrets.randbelow(256)}"
        if f" {prefix}." not in used:
            return prefix
    raise AssertionError("no free 10.x.y.0/24 subnet")


@dataclass
class Node:
    ip: str
    proc: subprocess.Popen
    netns: str | None
    log: Path

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


def alive_nodes(dashboard: str, env: dict[str, str]) -> list[dict]:
    """The alive nodes of the cluster whose dashboard (Ray's state API) is at `dashboard`, as
    `ray list nodes` gives them; none while it does not answer yet."""
    import json

    r = subprocess.run([RAY, "list", "nodes", "--address", dashboard, "--format", "json", "--filter", "state=ALIVE"],
                       capture_output=True, text=True, env={**os.environ, **env}, timeout=60)
    if r.returncode != 0 or r.stdout.strip() == "No resource in the cluster":
        return []
    return json.loads(r.stdout)


def _inherited_env() -> dict[str, str]:
    """This process's environment less what would pin every node to one interface: a node's
    process group must choose its own (paceray.cluster.ray_internals.choose_socket_ifname)."""
    from paceray.cluster.ray_internals import SOCKET_IFNAME_VARS

    return {k: v for k, v in os.environ.items() if k not in SOCKET_IFNAME_VARS}


class Nodes:
    """A head and the worker nodes added to it; `stop()` ends them all and removes the network."""

    def __init__(self, head_cpus: float = 1, isolated: bool | None = None):
        from paceray.tracking.server import free_port

        if isolated is None:  # PACERAY_TEST_LOOPBACK_NODES=1 runs the fallback where namespaces would work
            isolated = namespaces_possible() and not os.environ.get("PACERAY_TEST_LOOPBACK_NODES")
        self.isolated = isolated
        self.tag = secrets.token_hex(2)  # names: pcr<tag>b, pcr<tag>h<k>/pcr<tag>n<k> (<= 15 chars), paceray-<tag>-<k>
        self.temp = Path(tempfile.mkdtemp(prefix="rmn", dir="/tmp"))  # Ray's socket paths stay short
        self.workers: list[Node] = []
        self.namespaces: list[str] = []
        self.bridge: str | None = None
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0",
                    "OMP_NUM_THREADS": "1",
                    # A node lost is seen in ~3 s, not Ray's ~30 s (its GCS health check, read at `ray start`).
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                    "RAY_health_check_failure_threshold": "3", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        try:
            if self.isolated:
                self.subnet = _free_subnet()
                self.bridge = f"pcr{self.tag}b"
                _ip("link", "add", self.bridge, "type", "bridge")
                _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
                _ip("link", "set", self.bridge, "up")
                self.head_ip = f"{self.subnet}.1"
            else:
                self.head_ip = "127.0.0.1"
            self.gcs = free_port()
            dashboard = free_port()
            self.address = f"{self.head_ip}:{self.gcs}"
            self.jobs_address = f"http://{self.head_ip}:{dashboard}"
            self.head = self._start("head", None, self.head_ip,
                                    ["--head", "--port", str(self.gcs), "--dashboard-host", self.head_ip,
                                     "--dashboard-port", str(dashboard), "--include-dashboard", "true",
                                     "--num-cpus", str(head_cpus)])
            self.wait_for(1)
        except BaseException:
            self.stop()
            raise

    # ------------------------------------------------------------------ nodes

    def _start(self, name: str, netns: str | None, ip: str, options: list[str]) -> Node:
        from paceray.tracking.server import free_port

        log = self.temp / f"{name}.log"
        # A temp dir per node, as on machines of their own: nodes sharing one share its
        # runtime_resources, and a node's runtime-env agent then deletes the working dir a job
        # on another node still runs in.
        (self.temp / name).mkdir()
        # Ray's fixed default agent port (52365) may still be held by a cluster a test just stopped.
        argv = [RAY, "start", "--block", "--node-ip-address", ip, "--temp-dir", str(self.temp / name),
                "--dashboard-agent-listen-port", str(free_port()), *options]
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        proc = subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                                env={**_inherited_env(), **self.env})
        return Node(ip, proc, netns, log)

    def add_node(self, cpus: float = 1) -> Node:
        """A worker node joined to the head (and waited for)."""
        k = len(self.workers) + 2  # the head is .1
        netns = None
        ip = "127.0.0.1"
        if self.isolated:
            netns, host_end, node_end, ip = f"paceray-{self.tag}-{k}", f"pcr{self.tag}h{k}", f"pcr{self.tag}n{k}", f"{self.subnet}.{k}"
            _ip("netns", "add", netns)
            self.namespaces.append(netns)  # removed at stop(), with the veth pair inside it
            _ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
            _ip("link", "set", node_end, "netns", netns)
            _ip("link", "set", host_end, "master", self.bridge)
            _ip("link", "set", host_end, "up")
            _ip("addr", "add", f"{ip}/24", "dev", node_end, netns=netns)
            _ip("link", "set", node_end, "up", netns=netns)
            _ip("link", "set", "lo", "up", netns=netns)
        node = self._start(f"node{k}", netns, ip, ["--address", self.address, "--num-cpus", str(cpus)])
        self.workers.append(node)
        self.wait_for(1 + sum(n.alive for n in self.workers))
        return node

    def kill_node(self, node: Node) -> None:
        """SIGKILL every process of the node (its raylet, its workers), as a machine lost would."""
        kill_session(node.proc.pid)
        node.proc.wait(timeout=30)

    def alive_nodes(self) -> list[dict]:
        return alive_nodes(self.jobs_address, self.env)

    def wait_for(self, count: int, timeout: float = 120) -> None:
        """Until `count` nodes are alive in the cluster."""
        deadline = time.monotonic() + timeout
        while len(self.alive_nodes()) < count:
            assert self.head.alive, self.head.log.read_text()[-3000:]
            for n in self.workers:
                assert n.alive, n.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"fewer than {count} nodes alive after {timeout:.0f} s"
            time.sleep(1)

    def head_logs(self, lines: int = 30) -> str:
        """The tails of the head's dashboard and job logs (for a failing test's message)."""
        out = []
        for log in sorted(self.temp.glob("head/session_latest/logs/dashboard*.log")):
            out.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    # ------------------------------------------------------------------ commands

    def command_env(self) -> dict[str, str]:
        """The environment of a `paceray` run against this cluster (its address, its token)."""
        return {**self.env, "RAY_ADDRESS": self.address}

    def stop(self) -> None:
        for node in [*self.workers, *([self.head] if hasattr(self, "head") else [])]:
            if node.proc.poll() is None:
                kill_session(node.proc.pid)
            node.proc.wait(timeout=30)
        for netns in self.namespaces:  # its veth pair goes with it
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        if self.bridge:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        shutil.rmtree(self.temp, ignore_errors=True)
