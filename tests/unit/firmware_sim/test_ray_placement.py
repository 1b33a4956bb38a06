"""Where a Ray fleet's workers go and where its broker listens (no cluster needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from firmware_sim.errors import FleetError
from firmware_sim.ray_fleet import (
    RayCluster,
    RayNode,
    broker_host_for,
    check_reachable,
    plan_placement,
    worker_files,
)


def _node(name: str, ip: str, cpus: float) -> RayNode:
    return RayNode(node_id=name * 8, ip=ip, hostname=name, cpus=cpus)


def test_workers_spread_over_every_node_by_free_cpus():
    nodes = [_node("a", "127.0.0.2", 1), _node("b", "127.0.0.3", 1)]
    assert [n.hostname for n in plan_placement(nodes, 2, 1.0)] == ["a", "b"]
    big = [_node("a", "10.0.0.1", 4), _node("b", "10.0.0.2", 2)]
    plan = [n.hostname for n in plan_placement(big, 6, 1.0)]
    assert plan.count("a") == 4 and plan.count("b") == 2
    # Ties go to the nodes other than the driver's first.
    tied = [big[0], _node("c", "10.0.0.3", 4)]
    assert plan_placement(tied, 1, 1.0, "10.0.0.1")[0].hostname == "c"


def test_workers_that_do_not_fit_are_refused_before_anything_starts():
    nodes = [_node("a", "127.0.0.2", 1), _node("b", "127.0.0.3", 1)]
    with pytest.raises(FleetError, match="3 workers at 1 CPU each do not fit the cluster's 2 CPUs"):
        plan_placement(nodes, 3, 1.0)
    assert len(plan_placement(nodes, 4, 0.5)) == 4


def test_the_broker_stays_on_loopback_unless_nodes_are_on_other_hosts():
    here = RayCluster("x", [_node("a", "127.0.0.2", 1), _node("b", "127.0.0.3", 1)], "127.0.0.2")
    assert broker_host_for(here) == "127.0.0.1"
    check_reachable(here, "127.0.0.1")
    far = RayCluster("x", [_node("a", "127.0.0.1", 1), _node("b", "203.0.113.7", 1)], "127.0.0.1")
    # This host's own address as the cluster sees it is kept (a documentation address here).
    spread = RayCluster("x", far.nodes, "198.51.100.4")
    assert broker_host_for(spread) == "198.51.100.4"
    assert broker_host_for(spread, "198.51.100.5") == "198.51.100.5"
    with pytest.raises(FleetError, match=r"loopback, but nodes b \(203\.0\.113\.7\)"):
        check_reachable(far, "127.0.0.1")


def test_a_worker_is_shipped_its_boards_keys_and_the_coordinator_key_only(tmp_path: Path):
    from firmware_sim.engine import SimConfig
    from firmware_sim.fleet_spec import FleetOptions, WorkerSpec, prepare_fleet

    config = SimConfig(dataset="digits", clients=5, rounds=1)
    _, specs = prepare_fleet(
        config, FleetOptions(workers=2), tmp_path, host="127.0.0.1", port=1883, protocol=5
    )
    spec = WorkerSpec.from_json(specs[1].read_text())
    files = worker_files(spec)
    boards = sorted({name.split("/")[1] for name in files if name.startswith("keys/")})
    assert boards == ["board-001", "board-003"]
    assert files["coordinator.pub"] == Path(spec.coordinator_key).read_bytes()
    private = files["keys/board-001/private.key"]
    assert private == (tmp_path / "keys" / "board-001" / "private.key").read_bytes()
    assert not any(str(tmp_path) in name for name in files)
