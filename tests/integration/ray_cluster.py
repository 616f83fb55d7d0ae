"""A real multi-node Ray cluster for tests: a head and worker nodes from `ray start`.

Every node is its own `ray start --block` process (its own raylet, agents and workers) in its
own session and process group, with ports of its own, and told apart by a custom resource
(``medvlm_node_<name>``). Where the tests run as root in their private network namespace
(scripts/test.sh), every node is also a host of its own: a network namespace with its own
address on a private subnet, joined to the test's namespace by a veth pair on a bridge, so the
nodes talk over a network and not over one loopback (``Hosts``). Elsewhere the nodes share
127.0.0.1. The cluster keeps a private temp dir, so nothing here touches another Ray on the
machine: it is stopped by the processes it recorded (never `ray stop`, which stops every Ray
of the user). Processes are recorded while they run, because a replica's vLLM engine core is
a grandchild of the raylet and outlives neither a kill nor the record.

The test process itself never joins the cluster (a session fixture may already have started a
local Ray in it): it reads the cluster's state from the dashboard's REST API (nodes, Serve
applications with each replica's node) and drives Ray from child interpreters started on the
head (``command_on``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.conftest import free_port

RAY = str(Path(sys.executable).with_name("ray"))
NODE_RESOURCE = "medvlm_node_{}"
NODE_START_ATTEMPTS = 3


class Hosts:
    """One network namespace per node on the private subnet ``SUBNET``.0/24: node ``i`` at
    .``i + 1``, the test's own namespace at .254 on the bridge that joins their veth pairs."""

    SUBNET = "10.213.7"

    def __init__(self, names: list[str]) -> None:
        tag = secrets.token_hex(3)
        self.bridge = f"mvb{tag}"
        self.namespaces = {name: f"medvlm-{tag}-{name}" for name in names}
        self.addresses = {name: f"{self.SUBNET}.{i + 1}" for i, name in enumerate(names)}
        self._links: list[str] = []

    @classmethod
    def create(cls, names: list[str]) -> Hosts | None:
        """The namespaces, or None where they cannot be made or must not be: not root, no
        `ip`, or the tests are not in a namespace of their own (only loopback in it), where
        a bridge would land on the machine's real network."""
        if os.geteuid() != 0 or shutil.which("ip") is None:
            return None
        if [name for _, name in socket.if_nameindex()] != ["lo"]:  # this namespace's links
            return None
        hosts = cls(names)
        try:
            hosts._make()
        except (OSError, subprocess.CalledProcessError):
            hosts.remove()
            return None
        return hosts

    def _ip(self, *args: str, namespace: str | None = None) -> None:
        prefix = ["ip", "netns", "exec", namespace] if namespace else []
        subprocess.run([*prefix, "ip", *args], check=True, capture_output=True, timeout=30)

    def _make(self) -> None:
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._links.append(self.bridge)
        self._ip("addr", "add", f"{self.SUBNET}.254/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        for i, (name, namespace) in enumerate(self.namespaces.items()):
            host_end, node_end = f"{self.bridge}h{i}", f"{self.bridge}n{i}"
            self._ip("netns", "add", namespace)
            self._ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
            self._links.append(host_end)
            self._ip("link", "set", node_end, "netns", namespace)
            self._ip("link", "set", host_end, "master", self.bridge)
            self._ip("link", "set", host_end, "up")
            self._ip("link", "set", "lo", "up", namespace=namespace)
            address = f"{self.addresses[name]}/24"
            self._ip("addr", "add", address, "dev", node_end, namespace=namespace)
            self._ip("link", "set", node_end, "up", namespace=namespace)

    def on(self, name: str, command: list[str]) -> list[str]:
        """``command`` run inside node ``name``'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[name], *command]

    def remove(self) -> None:
        """Delete the namespaces and links (a namespace's end of a veth pair goes with it)."""
        for namespace in self.namespaces.values():
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
        for link in reversed(self._links):
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=30)


def kill_all(processes: list[psutil.Process], *, timeout_s: float) -> None:
    """SIGKILL ``processes`` (those gone already are skipped; psutil refuses a reused pid) and
    wait up to ``timeout_s`` for them to end."""
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(processes, timeout=timeout_s)


@dataclass
class RayNode:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    family: dict[int, psutil.Process] = field(default_factory=dict)

    @property
    def resource(self) -> str:
        return NODE_RESOURCE.format(self.name)

    def record(self) -> None:
        """Remember this node's processes (the `ray start` process and all its descendants)."""
        try:
            root = psutil.Process(self.process.pid)
            found = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        self.family.update((process.pid, process) for process in found)

    def kill(self) -> None:
        """SIGKILL every process of the node at once: a machine that lost power."""
        self.record()
        kill_all(list(self.family.values()), timeout_s=10)
        self.process.wait(timeout=10)

    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM the node (`ray start --block` stops what it started), then SIGKILL the rest."""
        self.record()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        family = list(self.family.values())
        _, alive = psutil.wait_procs(family, timeout=timeout_s)
        kill_all(alive, timeout_s=5)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=5)


class RayCluster:
    """Head (`--num-cpus head_cpus`, the dashboard on loopback) plus named worker nodes."""

    def __init__(self, workdir: Path, *, bind_shim: Path | None, node_cpus: int = 1) -> None:
        self.workdir = workdir
        self.temp_dir = workdir / "ray"  # short: Ray's socket paths have a length limit
        self.node_cpus = node_cpus
        self.gcs_port = free_port()
        self.serve_port = free_port()  # Serve's HTTP proxy on the head
        self.dashboard_port = free_port()
        self.nodes: dict[str, RayNode] = {}
        self._port_ranges: dict[str, int] = {}
        self._arguments: dict[str, list[str]] = {}
        self._starts: dict[str, int] = {}
        # Ray 2.60 turns token authentication on by default; the cluster gets a token of its
        # own (not the user's ~/.ray/auth_token), which every driver joining it presents.
        self.auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self._env = {
            **os.environ,
            **self.auth_env,
            "RAY_USAGE_STATS_ENABLED": "0",
            # Ray's own default niceness (15) starves the replicas on 2 cores (runtime.md).
            "RAY_worker_niceness": "0",
        }
        # A local Ray started earlier in this process (serving.ray_runtime) sets this to 0 to
        # keep itself on loopback; inherited, it makes `ray start` refuse to join a multi-node
        # cluster ("not supported on Windows and OSX"). These nodes bind their address by option.
        self._env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        self._bind_shim = bind_shim
        self.hosts: Hosts | None = None
        self._closed = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="ray-cluster-watch", daemon=True)

    def ip(self, name: str) -> str:
        """Node ``name``'s address: its own host's, or loopback."""
        return self.hosts.addresses[name] if self.hosts is not None else "127.0.0.1"

    def command_on(self, name: str, command: list[str]) -> list[str]:
        """``command`` run on node ``name`` (in its namespace, when nodes are hosts)."""
        return self.hosts.on(name, command) if self.hosts is not None else command

    @property
    def address(self) -> str:
        return f"{self.ip('head')}:{self.gcs_port}"

    @property
    def serve_url(self) -> str:
        """Serve's HTTP proxy on the head, as the tests reach it."""
        return f"http://{self.ip('head')}:{self.serve_port}"

    @property
    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.auth_env['RAY_AUTH_TOKEN']}"}

    @property
    def dashboard(self) -> str:
        return f"http://{self.ip('head')}:{self.dashboard_port}"

    def start(self, workers: list[str], *, timeout_s: float = 180) -> None:
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.hosts = Hosts.create(["head", *workers])
        self._env = self.node_env(self._env)
        self._watcher.start()
        self._start_node(
            "head",
            [
                "--head",
                f"--port={self.gcs_port}",
                "--include-dashboard=true",
                f"--dashboard-host={self.ip('head')}",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
                f"--temp-dir={self.temp_dir}",
            ],
        )
        self.wait_for_nodes({"head"}, timeout_s=timeout_s)
        # One node at a time: nodes share the head's session folder, and two raylets starting
        # together can pick the same socket file there ("bind: Address already in use", seen
        # in CI with the nodes in namespaces of their own: a file is no network's own).
        for i, name in enumerate(workers):
            self.start_worker(name)
            self.wait_for_nodes({"head", *workers[: i + 1]}, timeout_s=timeout_s)

    def node_env(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` for a process on a node. Nodes on one loopback: wildcard binds (the
        replicas' gRPC port on [::]) go to loopback too (the bind shim preloaded). On hosts of
        their own, a node's wildcard is its private network, and binding loopback instead
        would cut it off: the shim is taken out (a local Ray of the test process put it in
        the environment)."""
        preload = [p for p in env.get("LD_PRELOAD", "").split() if p != str(self._bind_shim)]
        if self.hosts is None and self._bind_shim is not None:
            preload.insert(0, str(self._bind_shim))
        env = {k: v for k, v in env.items() if k != "LD_PRELOAD"}
        return env | ({"LD_PRELOAD": " ".join(preload)} if preload else {})

    def start_worker(self, name: str) -> None:
        self._start_node(name, [f"--address={self.address}"])

    def _start_node(self, name: str, extra: list[str]) -> None:
        self._arguments[name] = extra
        self._starts[name] = self._starts.get(name, 0) + 1
        log = self.workdir / f"{name}.log"
        index = self._port_ranges.setdefault(name, len(self._port_ranges))
        first_port = 20000 + 1000 * index
        command = [
            RAY,
            "start",
            "--block",
            f"--node-ip-address={self.ip(name)}",
            f"--num-cpus={self.node_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps({NODE_RESOURCE.format(name): 1})}",
            # Nodes may share one address: each gets its own range for its workers' ports,
            # below the ephemeral range free_port() draws the other ports from.
            f"--min-worker-port={first_port}",
            f"--max-worker-port={first_port + 999}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats",
            *extra,
        ]
        with log.open("ab") as out:
            process = subprocess.Popen(
                self.command_on(name, command),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env,
                start_new_session=True,  # its own process group, apart from pytest's
            )
        self.nodes[name] = RayNode(name, process, log)

    def _watch(self) -> None:
        while not self._closed.wait(0.5):
            for node in list(self.nodes.values()):
                node.record()

    def alive_nodes(self) -> dict[str, str]:
        """Node name -> Ray node id of every node the GCS reports alive."""
        response = httpx.get(
            f"{self.dashboard}/api/v0/nodes",
            params={"detail": "true", "limit": 100},
            headers=self._auth,
            timeout=30,
        )
        response.raise_for_status()
        alive: dict[str, str] = {}
        for node in response.json()["data"]["result"]["result"]:
            if node["state"] != "ALIVE":
                continue
            for resource in node.get("resources_total", {}):
                if resource.startswith("medvlm_node_"):
                    alive[resource.removeprefix("medvlm_node_")] = node["node_id"]
        return alive

    def wait_for_nodes(self, names: set[str], *, timeout_s: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            for name in names:
                node = self.nodes[name]
                if node.process.poll() is None:
                    continue
                # A raylet that misses Ray's fixed 30 s registration window on a loaded machine
                # exits ("The current node timed out during startup"): start it again.
                if self._starts[name] >= NODE_START_ATTEMPTS:
                    raise RuntimeError(f"ray node {name} exited: {node.log.read_text()[-3000:]}")
                node.stop()
                self._start_node(name, self._arguments[name])
            try:
                alive = self.alive_nodes()
                if names <= set(alive):
                    return alive
            except httpx.HTTPError as exc:  # the dashboard is not up yet
                last = exc
            time.sleep(1)
        raise TimeoutError(f"ray nodes {sorted(names)} not alive after {timeout_s:.0f} s: {last}")

    def serve_replicas(self, app: str, deployment: str) -> list[dict[str, Any]]:
        """Serve's replicas of ``deployment`` (state, node_id, actor_id), from the REST API."""
        response = httpx.get(
            f"{self.dashboard}/api/serve/applications/", headers=self._auth, timeout=30
        )
        response.raise_for_status()
        application = response.json().get("applications", {}).get(app)
        if application is None:
            return []
        replicas: list[dict[str, Any]] = application["deployments"][deployment]["replicas"]
        return replicas

    def delete_serve_apps(self, *, timeout_s: float = 120) -> None:
        """Delete every Serve application (the REST API) and wait until none is left."""
        url = f"{self.dashboard}/api/serve/applications/"
        httpx.delete(url, headers=self._auth, timeout=60).raise_for_status()
        deadline = time.monotonic() + timeout_s
        while True:
            response = httpx.get(url, headers=self._auth, timeout=30)
            response.raise_for_status()
            if not response.json().get("applications"):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"Serve applications not deleted after {timeout_s:.0f} s")
            time.sleep(1)

    def running_replica_nodes(self, app: str, deployment: str) -> list[str]:
        """Node names hosting a RUNNING replica, one entry per replica."""
        ids = {node_id: name for name, node_id in self.alive_nodes().items()}
        return sorted(
            ids.get(replica["node_id"], replica["node_id"])
            for replica in self.serve_replicas(app, deployment)
            if replica["state"] == "RUNNING"
        )

    def stop(self) -> None:
        for name in [n for n in self.nodes if n != "head"] + ["head"]:
            if name in self.nodes:
                self.nodes[name].stop()
        self._closed.set()
        if self._watcher.is_alive():
            self._watcher.join()
        # A replica whose raylet died is reparented to init, and its vLLM engine core with it
        # (seen here): whatever still carries this cluster's token in its environment is ours.
        kill_all(self._ours(), timeout_s=10)
        if self.hosts is not None:
            self.hosts.remove()

    def _ours(self) -> list[psutil.Process]:
        token = self.auth_env["RAY_AUTH_TOKEN"]
        found = []
        for process in psutil.process_iter():
            try:
                if process.environ().get("RAY_AUTH_TOKEN") == token:
                    found.append(process)
            except psutil.Error:  # exited, or not ours to read
                continue
        return found

    def leftovers(self) -> list[str]:
        """Command lines of this cluster's processes still running (none after ``stop``)."""
        left = []
        for process in self._ours():
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    left.append(" ".join(process.cmdline())[:200])
            except psutil.Error:
                continue
        return left
