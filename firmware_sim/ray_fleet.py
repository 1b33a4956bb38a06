"""A simulated fleet's board workers as Ray actors across the nodes of a Ray cluster.

``siren sim fleet --ray ADDRESS`` keeps the private broker and the coordinator where the command
runs and places the fleet's worker processes (:class:`firmware_sim.worker.FleetWorker`, many
boards each, one MQTT connection per board) as Ray actors on the cluster's nodes. Every board
still speaks real MQTT to the broker, so the coordinator cannot tell them from physical boards.

* :func:`connect_cluster` attaches this process to a running cluster (``ADDRESS`` as Ray takes it:
  ``auto``, ``HOST:PORT`` of the head, or ``ray://...``) or starts a throwaway local one
  (``local``), and lists the alive nodes.
* :func:`broker_host_for` picks the address the private broker listens on and the boards
  connect to: loopback when every node is on this host, else this host's address as the
  cluster sees it (``--broker-host`` overrides both); :func:`check_reachable` refuses a
  loopback broker that boards on other hosts could not reach.
* :func:`plan_placement` assigns worker ``w`` to a node (the node with the most unassigned CPUs,
  nodes other than this one first), and :class:`RayWorkers` starts one :class:`BoardHost` actor
  per worker pinned to its node (a hard node-affinity scheduling strategy), ships it its spec and
  its boards' key files (no shared filesystem is assumed), runs it, and ships its per-round
  statistics lines back into the local ``worker-<w>.jsonl`` files that
  :func:`firmware_sim.fleet_history.read_worker_stats` reads, as a local worker writes them.

Every node needs the same Python environment as the driver: siren-edge installed (or on
``PYTHONPATH`` of ``ray start``) with its dependencies, and the data set (the bundled digits
always; Fashion-MNIST files where it is used). Ray is an optional extra
(``pip install 'siren-edge[ray]'``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from firmware_sim.errors import FleetError
from firmware_sim.fleet_spec import WorkerSpec, client_name

logger = logging.getLogger(__name__)

#: ``--ray local``: start a throwaway single-node Ray instance in this process.
LOCAL = "local"

#: Seconds to wait for every worker actor to be placed and to report its node.
PLACEMENT_TIMEOUT = 180.0


@dataclass(frozen=True)
class RayNode:
    """An alive node of the cluster.

    Attributes
    ----------
    node_id : str
        Ray's hex node id.
    ip : str
        The node's address in the cluster (``NodeManagerAddress``).
    hostname : str
        The node's host name.
    cpus : float
        Logical CPUs the node offers.
    resources : dict
        Every resource the node offers (custom ones included).
    """

    node_id: str
    ip: str
    hostname: str
    cpus: float
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class RayCluster:
    """This process's connection to a Ray cluster.

    Attributes
    ----------
    address : str
        What ``--ray`` said.
    nodes : list of RayNode
        The alive nodes when connecting.
    driver_ip : str
        This host's address as the cluster sees it.
    """

    address: str
    nodes: list[RayNode]
    driver_ip: str
    _previous_sigterm: Any = field(default=None, repr=False)

    def close(self) -> None:
        """Disconnect (and stop a ``local`` instance started here)."""
        import ray

        if ray.is_initialized():
            ray.shutdown()


def import_ray() -> Any:
    """The ``ray`` module; :class:`FleetError` naming the extra to install when it is missing."""
    try:
        import ray
    except ImportError as exc:
        raise FleetError(
            f"--ray needs Ray: pip install 'siren-edge[ray]' (import failed: {exc})"
        ) from None
    return ray


def connect_cluster(address: str, *, local_cpus: int | None = None) -> RayCluster:
    """Attach to the Ray cluster at ``address`` (or start a local one for ``local``).

    Parameters
    ----------
    address : str
        ``auto`` (the cluster this machine belongs to, or ``$RAY_ADDRESS``), ``HOST:PORT`` of a
        head node, ``ray://HOST:PORT`` (Ray client), or ``local`` (a new single-node instance
        that lives as long as this process's connection).
    local_cpus : int, optional
        Logical CPUs of a ``local`` instance (default: this machine's).

    Raises
    ------
    FleetError
        Ray is not installed, the cluster cannot be reached, or it has no alive node.
    """
    ray = import_ray()
    main_thread = threading.current_thread() is threading.main_thread()
    # ray.init installs its own SIGTERM handler; the command's own (which unwinds through the
    # fleet's cleanup) must stay in force.
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if address == LOCAL:
        kwargs.update(include_dashboard=False, num_cpus=local_cpus)
    try:
        ray.init(address=address, **kwargs)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError, ...
        raise FleetError(f"--ray {address}: cannot connect to a Ray cluster: {exc}") from None
    finally:
        if main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    nodes = [
        RayNode(
            node_id=str(n["NodeID"]),
            ip=str(n.get("NodeManagerAddress", "")),
            hostname=str(n.get("NodeManagerHostname", "")),
            cpus=float(n.get("Resources", {}).get("CPU", 0.0)),
            resources={str(k): float(v) for k, v in n.get("Resources", {}).items()},
        )
        for n in ray.nodes()
        if n.get("Alive")
    ]
    if not nodes:
        ray.shutdown()
        raise FleetError(f"--ray {address}: the cluster has no alive node")
    return RayCluster(address, nodes, str(ray.util.get_node_ip_address()), previous)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _local_addresses() -> set[str]:
    """This host's own addresses (the ones its name resolves to, and loopback)."""
    found = {"127.0.0.1", "::1", "localhost"}
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.add(str(info[4][0]))
    return found


def remote_nodes(cluster: RayCluster) -> list[RayNode]:
    """Nodes on other hosts than this one (their boards cannot reach a loopback broker)."""
    here = _local_addresses() | {cluster.driver_ip}
    return [n for n in cluster.nodes if n.ip not in here and not _is_loopback(n.ip)]


def broker_host_for(cluster: RayCluster, requested: str | None = None) -> str:
    """Where the private broker listens, and the address the boards connect to.

    ``requested`` (``--broker-host``) wins. Otherwise loopback (``127.0.0.1``) when every node
    runs on this host (nothing leaves the machine), else this host's address as the cluster
    sees it (Ray's node IP of the driver), which the other nodes reach.
    """
    if requested:
        return requested
    return cluster.driver_ip if remote_nodes(cluster) else "127.0.0.1"


def check_reachable(cluster: RayCluster, host: str) -> None:
    """Refuse a broker on a loopback address when boards would run on other hosts.

    Raises
    ------
    FleetError
        ``host`` is loopback and some node is on another host.
    """
    far = remote_nodes(cluster)
    if _is_loopback(host) and far:
        names = ", ".join(f"{n.hostname or n.node_id[:8]} ({n.ip})" for n in far[:3])
        raise FleetError(
            f"the broker at {host} is loopback, but nodes {names} are on other hosts: their "
            "boards could not reach it. Give a broker address they reach (--broker-host, or "
            "--broker HOST:PORT of a broker on the network)"
        )


def plan_placement(
    nodes: list[RayNode], workers: int, cpus_per_worker: float, driver_ip: str = ""
) -> list[RayNode]:
    """The node of each worker: every worker goes to the node with the most CPUs not yet
    assigned (ties: nodes on other hosts than the driver first, then Ray's order), so the
    workers spread over all nodes and none asks a node for more CPUs than it has.

    Raises
    ------
    FleetError
        The workers do not fit (``workers × cpus_per_worker`` exceeds what the nodes offer).
    """
    if cpus_per_worker < 0:
        raise FleetError(f"--ray-worker-cpus must be >= 0, got {cpus_per_worker}")
    free = {n.node_id: n.cpus for n in nodes}
    order = sorted(range(len(nodes)), key=lambda i: (nodes[i].ip == driver_ip, i))
    plan = []
    for _ in range(workers):
        best = max(order, key=lambda i: (free[nodes[i].node_id], -order.index(i)))
        node = nodes[best]
        if free[node.node_id] < cpus_per_worker:
            total = sum(n.cpus for n in nodes)
            raise FleetError(
                f"{workers} workers at {cpus_per_worker:g} CPU each do not fit the cluster's "
                f"{total:g} CPUs on {len(nodes)} node(s): lower --workers or "
                "--ray-worker-cpus, or add nodes"
            )
        free[node.node_id] -= cpus_per_worker
        plan.append(node)
    return plan


def worker_files(spec: WorkerSpec) -> dict[str, bytes]:
    """What a worker needs from the driver's disk: its boards' key files (``keys/<board>/...``)
    and the coordinator's public key (``coordinator.pub``)."""
    files: dict[str, bytes] = {"coordinator.pub": Path(spec.coordinator_key).read_bytes()}
    for index in spec.boards:
        name = client_name(index)
        for path in sorted((Path(spec.keys_dir) / name).iterdir()):
            if path.is_file():
                files[f"keys/{name}/{path.name}"] = path.read_bytes()
    return files


class BoardHost:
    """The body of a worker actor: one :class:`~firmware_sim.worker.FleetWorker` on its node.

    The constructor writes the shipped files into a private folder on the node and points the
    spec at it (keys, coordinator key, statistics file, board states); :meth:`run` serves the
    boards until the final global model; :meth:`stop` asks it to finish early;
    :meth:`read_stats` and :meth:`read_log` return what it wrote. Ray runs the methods on
    several threads (a threaded actor), so :meth:`read_stats` and :meth:`stop` answer while
    :meth:`run` is busy.
    """

    def __init__(self, spec_json: str, files: dict[str, bytes]) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        spec = WorkerSpec.from_json(spec_json)
        self.root = Path(tempfile.mkdtemp(prefix=f"siren-{spec.run}-worker-{spec.worker}-"))
        for rel, data in files.items():
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            path.chmod(0o600)
        self.spec = replace(
            spec,
            keys_dir=str(self.root / "keys"),
            coordinator_key=str(self.root / "coordinator.pub"),
            stats_path=str(self.root / "stats.jsonl"),
            state_dir=str(self.root / "boards") if spec.state_dir else "",
        )
        self.log_path = self.root / "worker.log"
        self._stop = threading.Event()

    def where(self) -> dict[str, Any]:
        """Where this actor runs: Ray node id, host name, address, process id."""
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname(),
            "ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
        }

    def run(self) -> int:
        """Host the boards until the run ends (or :meth:`stop`); the worker's exit code."""
        from firmware_sim.worker import FleetWorker

        _raise_open_files_limit()
        handler = logging.FileHandler(self.log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            return FleetWorker(self.spec).run(self._stop)
        except Exception:
            logger.exception("worker %d failed", self.spec.worker)
            raise
        finally:
            root.removeHandler(handler)
            handler.close()

    def stop(self) -> None:
        """Ask :meth:`run` to announce the boards offline and return."""
        self._stop.set()

    def read_stats(self, offset: int) -> bytes:
        """The statistics file's complete lines from byte ``offset`` on."""
        path = Path(self.spec.stats_path)
        if not path.exists():
            return b""
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
        end = data.rfind(b"\n")
        return data[: end + 1] if end >= 0 else b""

    def read_log(self, chars: int = 3000) -> str:
        """The end of this worker's log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def cleanup(self) -> None:
        """Remove this worker's folder on its node (keys, statistics, board states)."""
        shutil.rmtree(self.root, ignore_errors=True)


def _builtin_resource(name: str) -> bool:
    """Ray's own resources (CPU, GPU, memory, object store, ``node:<ip>`` markers)."""
    return name in ("CPU", "GPU", "memory", "object_store_memory") or name.startswith("node:")


def _raise_open_files_limit() -> None:
    """One MQTT connection per board: let this process open as many files as it may."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class RayWorkers:
    """The fleet's worker actors on a cluster, started, followed and stopped from the driver.

    Parameters
    ----------
    cluster : RayCluster
        The connection (:func:`connect_cluster`).
    spec_paths : list of Path
        The worker specs written by :func:`firmware_sim.fleet_spec.prepare_fleet`.
    cpus_per_worker : float
        Logical CPUs each actor reserves on its node.
    """

    def __init__(self, cluster: RayCluster, spec_paths: list[Path], cpus_per_worker: float) -> None:
        self.cluster = cluster
        self.specs = [WorkerSpec.from_json(p.read_text()) for p in spec_paths]
        self.cpus_per_worker = cpus_per_worker
        self.plan = plan_placement(
            cluster.nodes, len(self.specs), cpus_per_worker, cluster.driver_ip
        )
        self.actors: list[Any] = []
        self.runs: list[Any] = []
        self.placement: list[dict[str, Any]] = []
        self.codes: dict[int, int] = {}
        self._offsets = [0] * len(self.specs)

    def start(self) -> None:
        """Create every actor on its planned node, wait until each reports where it runs, and
        start the workers.

        Raises
        ------
        FleetError
            An actor cannot be placed within :data:`PLACEMENT_TIMEOUT` or fails to start.
        """
        ray = import_ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        host_class = ray.remote(BoardHost)
        for spec, node in zip(self.specs, self.plan):
            actor = host_class.options(
                num_cpus=self.cpus_per_worker,
                max_concurrency=4,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
                name=f"siren-{spec.run}-worker-{spec.worker}",
            ).remote(spec.to_json(), worker_files(spec))
            self.actors.append(actor)
        refs = [a.where.remote() for a in self.actors]
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=PLACEMENT_TIMEOUT)
        if pending:
            late = [w for w, r in enumerate(refs) if r in pending]
            raise FleetError(
                f"workers {late} were not placed within {PLACEMENT_TIMEOUT:.0f} s (planned "
                f"nodes {[self.plan[w].node_id[:8] for w in late]}; each needs "
                f"{self.cpus_per_worker:g} CPU)"
            )
        try:
            where = ray.get(refs)
        except ray.exceptions.RayError as exc:
            raise FleetError(f"a worker actor failed to start: {exc}") from None
        for spec, node, seen in zip(self.specs, self.plan, where):
            self.placement.append(
                {"worker": spec.worker, "boards": len(spec.boards), "planned": node.node_id, **seen}
            )
        self.runs = [a.run.remote() for a in self.actors]

    def sync_stats(self) -> None:
        """Append what every worker wrote since the last call to its local statistics file
        (the ``stats_path`` of its spec on this host)."""
        ray = import_ray()
        refs = [a.read_stats.remote(off) for a, off in zip(self.actors, self._offsets)]
        for w, ref in enumerate(refs):
            try:
                data = ray.get(ref, timeout=60)
            except ray.exceptions.RayError:
                continue  # a dead actor: poll() reports it
            if data:
                with open(self.specs[w].stats_path, "ab") as handle:
                    handle.write(data)
                self._offsets[w] += len(data)

    def poll(self) -> bool:
        """Ship the statistics back; ``True`` when every worker has finished.

        Raises
        ------
        FleetError
            A worker exited with a non-zero code or its actor died.
        """
        ray = import_ray()
        self.sync_stats()
        for w, ref in enumerate(self.runs):
            if w in self.codes:
                continue
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                continue
            try:
                code = int(ray.get(ref))
            except ray.exceptions.RayError as exc:
                raise FleetError(
                    f"worker-{w} on node {self.placement[w]['node_id'][:8]} failed: "
                    f"{str(exc)[-2000:]}\n{self.log_tail(w)}"
                ) from None
            self.codes[w] = code
            if code != 0:
                raise FleetError(f"worker-{w} exited with status {code}:\n{self.log_tail(w)}")
        if len(self.codes) == len(self.runs):
            self.sync_stats()
            return True
        return False

    def log_tail(self, w: int, chars: int = 3000) -> str:
        """The end of worker ``w``'s log on its node ("" when its actor is gone)."""
        ray = import_ray()
        try:
            return str(ray.get(self.actors[w].read_log.remote(chars), timeout=30))
        except ray.exceptions.RayError:
            return ""

    def save_logs(self, workdir: Path) -> None:
        """Copy every worker's log into ``workdir/worker-<w>.log`` as local workers leave it."""
        for w in range(len(self.actors)):
            (workdir / f"worker-{w}.log").write_text(self.log_tail(w, chars=200_000))

    def describe(self) -> dict[str, Any]:
        """The run's Ray facts for the history: address, nodes, where each worker ran."""
        return {
            "address": self.cluster.address,
            "nodes": [
                {
                    "node_id": n.node_id,
                    "ip": n.ip,
                    "hostname": n.hostname,
                    "cpus": n.cpus,
                    "custom": sorted(k for k in n.resources if not _builtin_resource(k)),
                }
                for n in self.cluster.nodes
            ],
            "cpus_per_worker": self.cpus_per_worker,
            "workers": self.placement,
        }

    def close(self, timeout: float = 15.0, cleanup_timeout: float = 300.0) -> None:
        """Stop every worker (the boards announce themselves offline), remove their folders and
        end the actors. Removing a folder of thousands of boards' keys takes a while on a busy
        node: the actors are ended only once that is done (or after ``cleanup_timeout``)."""
        ray = import_ray()
        with contextlib.suppress(ray.exceptions.RayError):
            ray.get([a.stop.remote() for a in self.actors], timeout=timeout)
        if self.runs:
            with contextlib.suppress(ray.exceptions.RayError):
                ray.wait(self.runs, num_returns=len(self.runs), timeout=timeout)
        cleanups = [a.cleanup.remote() for a in self.actors]
        if cleanups:
            _, late = ray.wait(cleanups, num_returns=len(cleanups), timeout=cleanup_timeout)
            if late:
                logger.warning(
                    "%d worker folder(s) were still being removed after %.0f s",
                    len(late),
                    cleanup_timeout,
                )
        for actor in self.actors:
            with contextlib.suppress(ray.exceptions.RayError):
                ray.kill(actor)
