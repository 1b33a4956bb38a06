"""Ports handed to brokers and Ray nodes: distinct, free, never one given twice."""

from __future__ import annotations

import re
import socket
from pathlib import Path

from firmware_sim.broker import free_ports
from firmware_sim.ray_cluster import LocalRayCluster


def test_free_ports_are_distinct_bindable_and_avoid_the_excluded() -> None:
    first = free_ports(40)
    assert len(set(first)) == 40
    second = free_ports(40, exclude=first)
    assert not set(first) & set(second)
    for port in second[:5]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


def test_every_ray_node_gets_ports_of_its_own(tmp_path: Path) -> None:
    cluster = LocalRayCluster(tmp_path, nodes=3)
    cluster.port = free_ports(1)[0]
    cluster.ports_taken.add(cluster.port)
    ports: list[int] = []
    for index in range(3):
        argv = " ".join(cluster._node_argv(index))
        ports += [int(p) for p in re.findall(r"-port=(\d+)", argv)]
    # the head: its GCS port and 8 more; each other node: 6
    assert len(ports) == 1 + 8 + 6 + 6
    assert len(set(ports)) == len(ports)
