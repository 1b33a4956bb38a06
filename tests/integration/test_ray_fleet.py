"""A fleet spread over a real two-node Ray cluster on this machine reproduces the local fleet.

The cluster is two raylets started with ``ray start --head`` and ``ray start --address=...``
(:class:`firmware_sim.ray_cluster.LocalRayCluster`: loopback addresses 127.0.0.2 and 127.0.0.3,
one CPU each, own ports, token authentication) and is torn down whatever the test's outcome.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, digits_config

# Not imported here: Ray reads its authentication mode from the environment on first import,
# which the test sets first.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the 'ray' extra"),
]


def _processes_naming(folder: Path) -> list[int]:
    marker = str(folder).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_a_fleet_on_two_ray_nodes_matches_the_single_machine_fleet(tmp_path: Path) -> None:
    from firmware_sim.fleet import run_fleet
    from firmware_sim.fleet_spec import FleetOptions
    from firmware_sim.ray_cluster import NODE_RESOURCE, LocalRayCluster

    config = digits_config(clients=4, rounds=2, aggregator="siren", alarm=True)
    cluster = LocalRayCluster(tmp_path / "ray", nodes=2, cpus_per_node=1, pythonpath=str(REPO))
    previous = cluster.client_env()
    # The raylets start while the reference fleet runs on this machine alone.
    launch_error: list[BaseException] = []

    def launch() -> None:
        try:
            cluster.launch()
        except BaseException as exc:
            launch_error.append(exc)

    launcher = threading.Thread(target=launch)
    launcher.start()
    try:
        local = run_fleet(
            config, FleetOptions(workers=2, broker="mosquitto"), tmp_path / "local", timeout=300
        )
        launcher.join()
        if launch_error:
            raise launch_error[0]
        cluster.wait_ready()
        nodes = {n.node_id: n for n in cluster.alive_nodes()}
        history = run_fleet(
            config,
            FleetOptions(workers=2, broker="mosquitto", ray=cluster.address),
            tmp_path / "ray-fleet",
            timeout=300,
        )
    finally:
        launcher.join()
        cluster.stop()
        cluster.restore_env(previous)
    assert cluster.temp_dir is not None
    assert _processes_naming(cluster.temp_dir) == []  # the whole cluster is gone

    # Two raylets on two loopback addresses, one worker actor on each (placement asserted from
    # where the actors said they ran, and each node's own marker resource).
    assert len(nodes) == 2
    assert sorted(n.ip for n in nodes.values()) == ["127.0.0.2", "127.0.0.3"]
    ray = history["fleet"]["transport"]["ray"]
    placed = ray["workers"]
    assert [w["worker"] for w in placed] == [0, 1]
    assert {w["node_id"] for w in placed} == set(nodes)
    for w in placed:
        assert w["node_id"] == w["planned"]
        assert w["ip"] == nodes[w["node_id"]].ip
        assert w["pid"] != os.getpid()
    markers = sorted(
        next(k for k in nodes[w["node_id"]].resources if k.startswith("siren_node_"))
        for w in placed
    )
    assert markers == [NODE_RESOURCE.format(0), NODE_RESOURCE.format(1)]

    # The run completed with every board, and its figures came back through Ray into the
    # files a local worker writes.
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    for r in history["rounds"]:
        assert r["boards_reporting"] == 4
        assert r["network"]["updates"] == 4
    for w in (0, 1):
        lines = (tmp_path / "ray-fleet" / f"worker-{w}.jsonl").read_text().splitlines()
        kinds = [json.loads(line)["kind"] for line in lines]
        assert kinds.count("fleet") == 1 and kinds.count("round") == 2
        assert (tmp_path / "ray-fleet" / f"worker-{w}.log").exists()

    # Same seed, same accuracies as the fleet on this machine alone.
    assert [r["test_accuracy"] for r in history["rounds"]] == [
        r["test_accuracy"] for r in local["rounds"]
    ]
    assert history["summary"]["final_test_accuracy"] == local["summary"]["final_test_accuracy"]
