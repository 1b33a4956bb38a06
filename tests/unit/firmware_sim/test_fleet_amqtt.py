"""The embedded amqtt broker (used where no Mosquitto is installed) carries the protocol's
traffic: QoS 1 delivery and a retained message for a late subscriber, over MQTT 3.1.1."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from edge_client.config import BrokerSettings
from firmware_sim.broker import MQTT_V311, start_amqtt
from protocol.mqtt import make_mqtt_client


def _connect(
    settings: BrokerSettings, client_id: str, topic: str | None = None
) -> tuple[Any, list]:
    client = make_mqtt_client(settings, client_id)
    got: list[tuple[str, bytes, bool]] = []
    ready = threading.Event()

    def on_connect(c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        if topic is not None:
            c.subscribe(topic, qos=1)
        else:
            ready.set()

    client.on_connect = on_connect
    client.on_subscribe = lambda *a: ready.set()
    client.on_message = lambda c, u, m: got.append((m.topic, bytes(m.payload), bool(m.retain)))
    client.connect_async(settings.host, settings.port, keepalive=10)
    client.loop_start()
    assert ready.wait(10), client_id
    return client, got


def test_amqtt_delivers_qos1_and_retained_messages(tmp_path: Path) -> None:
    broker = start_amqtt(tmp_path)
    try:
        assert broker.kind == "amqtt" and broker.protocol == MQTT_V311
        settings = BrokerSettings(host=broker.host, port=broker.port, protocol=311)
        sub, got = _connect(settings, "coordinator", "siren/v1/r/update/+")
        pub, _ = _connect(settings, "board-1")
        pub.publish("siren/v1/r/global", b"model", qos=1, retain=True).wait_for_publish(5)
        pub.publish("siren/v1/r/update/board-1", b"update", qos=1).wait_for_publish(5)
        late, late_got = _connect(settings, "board-2", "siren/v1/r/global")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (got and late_got):
            time.sleep(0.05)
        assert got == [("siren/v1/r/update/board-1", b"update", False)]
        assert late_got == [("siren/v1/r/global", b"model", True)]
        for c in (sub, pub, late):
            c.disconnect()
            c.loop_stop()
    finally:
        broker.stop()
    assert not broker.running()
