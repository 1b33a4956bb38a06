"""MQTT sockets are opened with Nagle's algorithm off."""

from __future__ import annotations

import socket

from protocol.mqtt import make_mqtt_client, set_tcp_nodelay


def test_tcp_sockets_get_nodelay_and_others_are_left_alone() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    try:
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        set_tcp_nodelay(client)
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        client.close()
        server.close()
    left, right = socket.socketpair()  # not TCP: nothing to set, no error
    try:
        set_tcp_nodelay(left)
    finally:
        left.close()
        right.close()


def test_clients_set_nodelay_when_their_socket_opens() -> None:
    from protocol.mqtt import BrokerSettings

    mqtt_client = make_mqtt_client(BrokerSettings(), "probe")
    server = socket.create_server(("127.0.0.1", 0))
    sock = socket.create_connection(server.getsockname())
    try:
        mqtt_client.on_socket_open(mqtt_client, None, sock)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        sock.close()
        server.close()
