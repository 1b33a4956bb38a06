"""A Ray cluster of several nodes on this one host, for tests and benchmarks of Ray fleets.

:class:`LocalRayCluster` runs ``ray start --head`` and then ``ray start --address=...`` once per
further node: each node is a raylet of its own (own object store, own worker processes), all on
loopback, each with its own ports and a custom resource ``siren_node_<i>`` so that a test can tell
the nodes apart. Every node is started in a process group of its own, and :meth:`stop` ends
exactly those groups (then any process still naming this cluster's own temporary folder), never
other Ray processes on the machine, as a machine-wide ``ray stop`` would.

Token authentication is on, with a token of this cluster's own in its folder: :attr:`env` holds
the variables (``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN_PATH``) a driver needs in its environment to
connect (:meth:`client_env` sets them in this process; Ray reads the mode when it is first
imported, so before that).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from firmware_sim.broker import free_ports
from firmware_sim.errors import FleetError

#: The custom resource that marks node ``i``: ``{"siren_node_0": 1}`` on the head, ...
NODE_RESOURCE = "siren_node_{}"


def ray_executable() -> str:
    """The ``ray`` command of this Python environment (else the one on ``PATH``).

    Raises
    ------
    FleetError
        Ray is not installed.
    """
    beside = Path(sys.executable).parent / "ray"
    if beside.exists():
        return str(beside)
    found = shutil.which("ray")
    if found is None:
        raise FleetError("the ray command is not installed: pip install 'siren-edge[ray]'")
    return found


class LocalRayCluster:
    """``nodes`` Ray nodes on loopback, started by :meth:`start` and ended by :meth:`stop`.

    Parameters
    ----------
    root : Path
        Folder of the cluster's token and of the output of every ``ray start`` (Ray's own
        temporary folder is :attr:`temp_dir`).
    nodes : int
        Number of nodes (the head and ``nodes - 1`` more).
    cpus_per_node : int
        Logical CPUs each node offers.
    object_store_bytes : int
        Object store size of each node (the fleet ships only small messages through it).
    pythonpath : str, optional
        ``PYTHONPATH`` of the nodes' worker processes (the checkout whose code the actors run).
    """

    def __init__(
        self,
        root: Path,
        nodes: int = 2,
        cpus_per_node: int = 1,
        object_store_bytes: int = 100 * 1024 * 1024,
        pythonpath: str | None = None,
    ) -> None:
        if nodes < 1:
            raise FleetError(f"a cluster needs at least one node, got {nodes}")
        self.root = root.resolve()
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.object_store_bytes = object_store_bytes
        self.pythonpath = pythonpath
        self.port = 0
        #: Every port given to a node of this cluster (none is given twice).
        self.ports_taken: set[int] = set()
        self.groups: list[int] = []
        #: Ray's temporary folder of every node (sessions, logs, sockets), made by start() under
        #: the system's temporary folder: Unix socket paths inside it must stay under 108 bytes.
        self.temp_dir: Path | None = None
        token = self.root / "auth_token"
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}

    @property
    def address(self) -> str:
        """``<head address>:<GCS port>`` (what ``--ray`` takes)."""
        return f"{self.node_ip(0)}:{self.port}"

    def client_env(self) -> dict[str, str | None]:
        """Set :attr:`env` in this process (to connect to the cluster); returns the previous
        values, for :meth:`restore_env`. Ray reads the authentication mode when it is first
        imported: call this before anything in the process imports ``ray``."""
        previous = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        return previous

    @staticmethod
    def restore_env(previous: dict[str, str | None]) -> None:
        """Undo :meth:`client_env`."""
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    @staticmethod
    def node_ip(index: int) -> str:
        """Loopback address of node ``index``: ``127.0.0.2`` for the head, ``127.0.0.3``, ...
        for the others: each raylet on an address of its own, none leaving the machine.
        (``ray start`` replaces ``127.0.0.1`` and ``localhost`` by the host's network address;
        the rest of 127.0.0.0/8 it keeps as given.)"""
        return f"127.0.0.{index + 2}"

    def _node_argv(self, index: int) -> list[str]:
        ports = [
            "--node-manager-port",
            "--object-manager-port",
            "--metrics-export-port",
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port",
        ]
        argv = [
            ray_executable(),
            "start",
            f"--node-ip-address={self.node_ip(index)}",
            f"--num-cpus={self.cpus_per_node}",
            "--num-gpus=0",
            f"--object-store-memory={self.object_store_bytes}",
            f'--resources={{"{NODE_RESOURCE.format(index)}": 1}}',
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        if index == 0:
            ports += ["--dashboard-port", "--ray-client-server-port"]
        # Distinct ports, none given to another node: Ray refuses a node whose components
        # share one, and some of them listen on every address, not the node's own.
        chosen = free_ports(len(ports), self.node_ip(index), exclude=self.ports_taken)
        self.ports_taken.update(chosen)
        argv += [f"{option}={port}" for option, port in zip(ports, chosen, strict=True)]
        if index == 0:
            argv += ["--head", f"--port={self.port}", "--include-dashboard=false"]
        else:
            argv.append(f"--address={self.address}")
        return argv

    def _start_node(self, index: int, timeout: float) -> None:
        env = {**os.environ, **self.env, "TF_CPP_MIN_LOG_LEVEL": "2"}
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath
        log = self.root / f"ray-start-{index}.log"
        with open(log, "ab") as handle:
            # A session (and process group) of its own: everything this node starts stays in
            # it after `ray start` returns, and stop() ends exactly that group.
            proc = subprocess.Popen(
                self._node_argv(index),
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=handle,
                env=env,
                start_new_session=True,
            )
        self.groups.append(proc.pid)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise FleetError(
                f"ray start of node {index} did not finish within {timeout:.0f} s; see {log}"
            ) from None
        if code != 0:
            tail = log.read_text(errors="replace")[-2000:]
            raise FleetError(f"ray start of node {index} exited with status {code}:\n{tail}")

    def start(self, timeout: float = 180.0) -> LocalRayCluster:
        """Start the head and the other nodes; return once the cluster counts them all alive
        (:meth:`launch`, then :meth:`wait_ready`).

        Raises
        ------
        FleetError
            A node does not start, or the nodes do not all register in time (the nodes already
            started are stopped).
        """
        self.launch(timeout)
        self.wait_ready(timeout)
        return self

    def launch(self, timeout: float = 180.0) -> None:
        """Run ``ray start`` for every node, one after the other. Touches no Ray state of this
        process, so it may run on another thread while this one does something else.

        Raises
        ------
        FleetError
            A node does not start (the nodes already started are stopped).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="siren-ray-"))
        token = Path(self.env["RAY_AUTH_TOKEN_PATH"])
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.ports_taken.clear()
        self.port = free_ports(1, self.node_ip(0))[0]
        self.ports_taken.add(self.port)
        try:
            for index in range(self.nodes):
                self._start_node(index, timeout)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Return once the cluster counts every node alive (call on the main thread: it
        connects to the cluster from this process).

        Raises
        ------
        FleetError
            The nodes do not all register in time (the cluster is stopped).
        """
        try:
            self._await_nodes(timeout)
        except BaseException:
            self.stop()
            raise

    def alive_nodes(self) -> list[Any]:
        """The cluster's alive nodes (:class:`~firmware_sim.ray_fleet.RayNode`), asked from
        this process over a short connection."""
        from firmware_sim.ray_fleet import connect_cluster

        previous = self.client_env()
        try:
            cluster = connect_cluster(self.address)
            cluster.close()
            return cluster.nodes
        finally:
            self.restore_env(previous)

    def _await_nodes(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        seen, problem = 0, ""
        while time.monotonic() < deadline:
            try:
                seen = len(self.alive_nodes())
            except FleetError as exc:
                problem = f" (last error: {exc})"
            else:
                if seen >= self.nodes:
                    return
            time.sleep(1.0)
        raise FleetError(
            f"only {seen} of {self.nodes} Ray nodes registered in {timeout:.0f} s{problem}"
        )

    def _stray_pids(self) -> list[int]:
        """Processes (other than this one) whose command line names this cluster's folder."""
        if self.temp_dir is None:
            return []
        marker = str(self.temp_dir).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if marker in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
        return found

    def stop(self, grace: float = 3.0, reap: float = 10.0) -> None:
        """End every process of this cluster: SIGTERM to each node's process group, SIGKILL
        after ``grace`` seconds, then SIGKILL to any process still naming the cluster's folder,
        and wait up to ``reap`` seconds until none is left (a killed process takes a moment to
        exit). Safe to call twice and after a failed start."""
        for group in self.groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_group_alive(g) for g in self.groups):
            time.sleep(0.2)
        for group in self.groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        for pid in self._stray_pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + reap
        while time.monotonic() < deadline and self._stray_pids():
            time.sleep(0.1)
        self.groups = []
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
