"""The coordinator's HTTP API on a real SQLite store, through FastAPI's TestClient.

The store is filled through its own API with a small SIREN run of four boards: round 1 is a
clean case-1 round, round 2 a case-4 round with a rollback in which ``board-002`` is judged
malicious and banned and ``board-003`` is missing (its update failed the signature check), and
round 3 is open with one admitted update. Every expected value below is worked out by hand from
these records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from nacl.signing import SigningKey

from coordinator.api import CoordinatorControls, create_app, start_api_server
from coordinator.config import AggregatorSettings, CoordinatorConfig, SimulationSettings
from coordinator.store import CoordinatorStore
from protocol.envelope import check_global
from tests.unit.coordinator.api_builders import (
    AUTH,
    BASE,
    BOARDS,
    COORD,
    FLEET_ROUND_2,
    JETSON_ROUND_2,
    LAYOUT,
    NOW,
    PI_ROUND_2,
    PI_ROUND_3,
    RUN,
    TOKEN,
    Controls,
    make_config,
    populate,
)


@pytest.fixture
def config(tmp_path: Path) -> CoordinatorConfig:
    return make_config(tmp_path)


@pytest.fixture
def store(config: CoordinatorConfig):
    store = CoordinatorStore(config.db)
    store.globals = populate(store)  # type: ignore[attr-defined]
    yield store
    store.close()


@pytest.fixture
def controls() -> Controls:
    return Controls()


@pytest.fixture
def client(config: CoordinatorConfig, store: CoordinatorStore, controls: Controls) -> TestClient:
    app = create_app(config, store, controls, token=TOKEN, clock=lambda: NOW)
    return TestClient(app, base_url=BASE)


def test_the_in_memory_controls_satisfy_the_protocol() -> None:
    assert isinstance(Controls(), CoordinatorControls)


# -- read-only endpoints ---------------------------------------------------------------------


def test_health_reports_the_open_round(client: TestClient) -> None:
    body = client.get("/api/health").json()
    assert body == {
        "status": "ok",
        "run": RUN,
        "round": 3,
        "finished": False,
        "paused": False,
        "time": NOW,
    }


def test_before_the_run_starts_health_says_starting_and_the_rest_answers_503(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path)
    store = CoordinatorStore(config.db)
    try:
        client = TestClient(create_app(config, store), base_url=BASE)
        health = client.get("/api/health").json()
        assert health["status"] == "starting" and health["round"] is None
        for path in ("/api/run", "/api/rounds", "/api/clients", "/api/model"):
            response = client.get(path)
            assert response.status_code == 503, path
            assert response.headers["retry-after"] == "2"
            assert "not started" in response.json()["detail"]
        assert client.get("/metrics").status_code == 200
    finally:
        store.close()


def test_run_describes_settings_progress_and_the_open_round(
    client: TestClient, store: CoordinatorStore
) -> None:
    body = client.get("/api/run").json()
    assert body["run"] == RUN
    assert body["aggregator"] == "siren"
    assert body["boards"] == BOARDS
    assert (body["rounds_planned"], body["rounds_closed"], body["current_round"]) == (5, 2, 3)
    assert body["finished"] is False and body["paused"] is False
    assert body["started_at"] == 1000.0
    assert body["global_model_sha256"] == store.globals[2].sha256  # type: ignore[attr-defined]
    # 4 + 3 + 1 admitted; one bad signature (round 2), one stale and one duplicate (round 3).
    assert body["admission"] == {
        "accepted": 8,
        "bad_signature": 1,
        "stale_round": 1,
        "duplicate": 1,
    }
    assert body["open_round"] == {
        "round": 3,
        "opened_at": 1017.0,
        "age_seconds": NOW - 1017.0,
        "deadline": 1017.0 + 60.0,
        "admitted": ["board-000"],
        "alarms": ["board-000"],
        "missing": ["board-001", "board-002", "board-003"],
    }
    assert body["admin_enabled"] is True


def test_without_a_simulator_the_run_shows_bans_but_cannot_judge_them(client: TestClient) -> None:
    body = client.get("/api/run").json()
    assert body["siren_profile"] == "authors"
    assert body["banned"] == ["board-002"]
    assert body["known_malicious"] is None
    assert body["honest_banned"] is None and body["attackers_missed"] is None
    assert {c["malicious"] for c in client.get("/api/clients").json()} == {None}


def test_with_the_simulators_ground_truth_the_run_counts_honest_bans_and_missed_attackers(
    tmp_path: Path, store: CoordinatorStore
) -> None:
    # board-002 is banned after round 2 (see the module docstring). Tell the API that
    # board-002 and board-003 were malicious: one attacker banned, one missed, no honest ban.
    config = make_config(tmp_path, simulation=SimulationSettings(("board-003", "board-002")))
    client = TestClient(create_app(config, store, None, clock=lambda: NOW), base_url=BASE)
    body = client.get("/api/run").json()
    assert body["known_malicious"] == ["board-002", "board-003"]
    assert body["honest_banned"] == [] and body["attackers_missed"] == ["board-003"]
    rows = {c["client"]: c["malicious"] for c in client.get("/api/clients").json()}
    assert rows == {"board-000": False, "board-001": False, "board-002": True, "board-003": True}
    honest = make_config(tmp_path, simulation=SimulationSettings(("board-003",)))
    client = TestClient(create_app(honest, store, None, clock=lambda: NOW), base_url=BASE)
    body = client.get("/api/run").json()
    assert body["honest_banned"] == ["board-002"] and body["attackers_missed"] == ["board-003"]


def test_rounds_history_lists_accuracy_case_alarms_and_kept_boards(client: TestClient) -> None:
    rounds = client.get("/api/rounds").json()
    assert [r["round"] for r in rounds] == [1, 2]
    first, second = rounds
    assert first["status"] == "closed"
    assert (first["opened_at"], first["closed_at"], first["seconds"]) == (1000.0, 1005.0, 5.0)
    assert first["test_accuracy"] == 0.5
    assert first["test_loss"] is None  # stored as NaN: not valid JSON, shown as null
    assert (first["rule"], first["decision_case"], first["decision_branch"]) == (
        "siren",
        1,
        "no-alarm",
    )
    assert first["reported"] == BOARDS and first["kept"] == BOARDS
    assert first["alarms"] == [] and first["rejected"] == [] and first["missing"] == []
    assert first["admission"] == {"accepted": 4}
    assert second["test_accuracy"] == 0.7 and second["seconds"] == 12.0
    assert (second["decision_case"], second["rollback"]) == (4, True)
    assert second["reported"] == BOARDS[:3]
    assert second["alarms"] == ["board-000", "board-001"]
    assert second["kept"] == ["board-000", "board-001"]
    assert second["rejected"] == ["board-002"]
    assert second["missing"] == ["board-003"]
    assert second["close_reason"] == "deadline"
    assert second["admission"] == {"accepted": 3, "bad_signature": 1}


def test_rounds_range_filters_and_validates(client: TestClient) -> None:
    assert [r["round"] for r in client.get("/api/rounds?first=2").json()] == [2]
    assert [r["round"] for r in client.get("/api/rounds?last=1").json()] == [1]
    assert client.get("/api/rounds?first=3").json() == []
    assert client.get("/api/rounds?first=2&last=1").json() == []  # an empty range
    for query in ("first=0", "first=-4", "last=abc", f"first={2**53}", "first=1e400"):
        assert client.get(f"/api/rounds?{query}").status_code == 422, query


def test_round_detail_maps_siren_indices_to_board_names(client: TestClient) -> None:
    body = client.get("/api/rounds/2").json()
    assert body["verdicts"]["board-002"] == {
        "kept": False,
        "weight": 0.0,
        "score": 0.3,
        "reason": "siren case 4: malicious",
    }
    assert body["verdicts"]["board-000"]["weight"] == 0.5
    assert body["sample_counts"] == {"board-000": 100, "board-001": 100, "board-002": 100}
    siren = body["siren"]
    assert (siren["case"], siren["branch"], siren["base"]) == (4, "divergent", "g_{t-1}")
    assert siren["alarming"] == ["board-000", "board-001"]
    assert siren["silent"] == ["board-002"]
    assert siren["benign"] == ["board-000", "board-001"]
    assert siren["malicious"] == ["board-002"]
    assert siren["banned"] == ["board-002"] and siren["newly_banned"] == ["board-002"]
    assert siren["penalty_counts"] == {
        "board-000": 0.0,
        "board-001": 0.0,
        "board-002": 1.0,
        "board-003": 0.0,
    }
    assert siren["root_accuracy"]["board-001"] == 0.75
    assert siren["max_alarming_accuracy"] == 0.8 and siren["max_silent_accuracy"] is None
    assert (siren["c_s"], siren["c_p"], siren["c_a"]) == (0.1, 0.5, 0.5)
    assert body["network"]["update_bytes"] == 1500
    assert body["decision"]["malicious"] == [2]  # the raw record keeps the indices


def test_round_detail_of_the_open_round_shows_what_is_admitted_so_far(client: TestClient) -> None:
    body = client.get("/api/rounds/3").json()
    assert body["status"] == "open"
    assert body["closed_at"] is None and body["test_accuracy"] is None
    assert body["reported"] == ["board-000"] and body["alarms"] == ["board-000"]
    assert body["missing"] == ["board-001", "board-002", "board-003"]
    assert body["sample_counts"] == {"board-000": 100}
    assert body["admission"] == {"accepted": 1, "stale_round": 1, "duplicate": 1}


def test_round_out_of_range_is_a_clear_4xx(client: TestClient) -> None:
    missing = client.get("/api/rounds/4")
    assert missing.status_code == 404
    assert missing.json()["detail"] == (
        "round 4 does not exist yet: rounds 1..2 are closed and round 3 is open"
    )
    for bad in ("0", "-1", "two", str(2**53), "1.5"):
        assert client.get(f"/api/rounds/{bad}").status_code == 422, bad


def test_clients_summarise_status_alarms_penalties_and_rejections(client: TestClient) -> None:
    rows = {c["client"]: c for c in client.get("/api/clients").json()}
    assert list(rows) == BOARDS
    b0, b1, b2, b3 = (rows[b] for b in BOARDS)
    # board-000: status at 1020 is later than its round-3 update at 1018.
    assert (b0["status"], b0["status_round"], b0["last_seen"]) == ("online", 3, 1020.0)
    assert (b0["rounds_reported"], b0["rounds_kept"], b0["alarms"]) == (2, 2, 1)
    assert b0["penalty_count"] == 0.0 and b0["banned"] is False and b0["rejections"] == 0
    assert (b1["last_seen"], b1["rejections"]) == (1015.0, 1)
    assert (b2["status"], b2["status_round"], b2["last_seen"]) == ("offline", 2, 1016.0)
    assert (b2["rounds_reported"], b2["rounds_kept"], b2["alarms"]) == (2, 1, 0)
    assert b2["penalty_count"] == 1.0
    assert (b2["banned"], b2["siren_banned"], b2["admin_banned"]) == (True, True, False)
    # board-003 never announced a status; it was last heard from in round 1 (update at 1004).
    assert (b3["status"], b3["status_round"], b3["last_seen"]) == ("unknown", None, 1004.0)
    assert (b3["rounds_reported"], b3["rounds_kept"], b3["rejections"]) == (1, 1, 1)
    assert b3["index"] == 3


def test_client_detail_has_alarm_history_penalties_and_rejections(client: TestClient) -> None:
    b2 = client.get("/api/clients/board-002").json()
    assert [h["round"] for h in b2["history"]] == [1, 2]
    assert b2["history"][0] == {
        "round": 1,
        "reported": True,
        "alarm": False,
        "kept": True,
        "weight": 0.25,
        "score": None,
        "reason": "siren case 1: benign",
        "penalty_count": 0.0,
    }
    assert b2["history"][1]["kept"] is False and b2["history"][1]["penalty_count"] == 1.0
    assert b2["alarm_rounds"] == []
    assert client.get("/api/clients/board-000").json()["alarm_rounds"] == [2]
    b3 = client.get("/api/clients/board-003").json()
    assert b3["history"][1] == {
        "round": 2,
        "reported": False,
        "alarm": None,
        "kept": None,
        "weight": None,
        "score": None,
        "reason": None,
        "penalty_count": 0.0,
    }
    assert b3["rejections_by_reason"] == {"bad_signature": 1}
    assert b3["recent_rejections"] == [
        {
            "round": 2,
            "reason": "bad_signature",
            "detail": "signature of the update message from 'board-003' does not verify",
            "at": 1009.0,
        }
    ]
    assert client.get("/api/clients/board-001").json()["rejections_by_reason"] == {"stale_round": 1}


def test_clients_show_their_latest_figures_and_what_they_did_not_report(
    client: TestClient,
) -> None:
    rows = {c["client"]: c for c in client.get("/api/clients").json()}
    pi = rows["board-000"]["telemetry"]
    assert (pi["round"], pi["at"], pi["figures"]) == (3, 1020.0, PI_ROUND_3)
    assert pi["absent"] == ["power_mw"]  # a Raspberry Pi has no power monitor
    assert pi["throttled"] == [
        "under-voltage detected",
        "currently throttled",
        "under-voltage has occurred",
        "throttling has occurred",
    ]
    assert pi["process_boards"] == 1
    jetson = rows["board-001"]["telemetry"]
    assert jetson["round"] == 2  # its round-3 status carried no figures: round 2's stay
    assert jetson["figures"]["power_mw.VDD_SOC"] == 1499.0
    assert jetson["absent"] == ["throttled_flags"] and jetson["throttled"] is None
    sim = rows["board-002"]["telemetry"]
    assert sim["process_boards"] == 4
    assert sim["absent"] == ["soc_temp_c", "throttled_flags", "power_mw"]
    assert "soc_temp_c" not in sim["figures"]  # nothing is filled in for an absent sensor
    assert rows["board-003"]["telemetry"] is None


def test_client_detail_has_every_round_of_figures(client: TestClient) -> None:
    history = client.get("/api/clients/board-000").json()["telemetry_history"]
    assert [(h["round"], h["figures"]) for h in history] == [(2, PI_ROUND_2), (3, PI_ROUND_3)]
    assert history[0]["throttled"] == []  # a word of 0: reported, nothing set
    assert history[0]["absent"] == ["alarm_s", "alarm_cpu_s", "power_mw"]
    assert client.get("/api/clients/board-003").json()["telemetry_history"] == []
    assert [h["figures"] for h in client.get("/api/clients/board-001").json()[
        "telemetry_history"]] == [JETSON_ROUND_2]  # fmt: skip


def test_metrics_have_per_board_figures_and_no_sample_for_an_absent_sensor(
    client: TestClient,
) -> None:
    m = _metric_lines(client.get("/metrics").text)
    assert m['siren_board_telemetry_round{client="board-000"}'] == 3
    assert m['siren_board_telemetry_round{client="board-001"}'] == 2
    assert 'siren_board_telemetry_round{client="board-003"}' not in m
    assert m['siren_board_peak_rss_bytes{client="board-000"}'] == 675 * 2**20
    assert m['siren_board_train_cpu_seconds{client="board-000"}'] == 80.25
    assert m['siren_board_alarm_cpu_seconds{client="board-001"}'] == 0.02
    assert m['siren_board_soc_temperature_celsius{client="board-000"}'] == 71.5
    assert m['siren_board_throttled_flags{client="board-000"}'] == 0x50005
    assert m['siren_board_power_watts{client="board-001"}'] == pytest.approx(6.005)
    assert m['siren_board_rail_power_watts{client="board-001",rail="VDD_SOC"}'] == 1.499
    assert m['siren_board_zone_temperature_celsius{client="board-001",zone="tj-thermal"}'] == 47.5
    assert m['siren_board_process_boards{client="board-002"}'] == FLEET_ROUND_2["process_boards"]
    # Absent sensors have no sample at all (not a zero).
    assert 'siren_board_power_watts{client="board-000"}' not in m
    assert 'siren_board_soc_temperature_celsius{client="board-002"}' not in m
    assert 'siren_board_throttled_flags{client="board-001"}' not in m


def test_a_database_without_the_telemetry_table_answers_without_figures(
    config: CoordinatorConfig, store: CoordinatorStore, controls: Controls
) -> None:
    store._db.execute("DROP TABLE telemetry")  # as a coordinator before telemetry left it
    app = create_app(config, store, controls, token=TOKEN, clock=lambda: NOW)
    with TestClient(app, base_url=BASE) as fresh:
        rows = fresh.get("/api/clients").json()
        assert [r["telemetry"] for r in rows] == [None] * 4
        assert fresh.get("/api/clients/board-000").json()["telemetry_history"] == []
        text = fresh.get("/metrics").text
    assert "siren_board_telemetry_round{" not in text
    assert "# TYPE siren_board_telemetry_round gauge" in text


def test_unknown_or_invalid_client_ids_are_4xx(client: TestClient) -> None:
    unknown = client.get("/api/clients/board-999")
    assert unknown.status_code == 404
    assert unknown.json()["detail"].startswith("no board 'board-999' in this run; its 4 boards")
    for bad in ("-leading-dash", "x" * 65, "semi;colon", "sp%20ace"):
        assert client.get(f"/api/clients/{bad}").status_code == 422, bad


def test_model_metadata_names_the_current_global_model(
    client: TestClient, store: CoordinatorStore
) -> None:
    g2, g3 = store.globals[1:]  # type: ignore[attr-defined]
    body = client.get("/api/model").json()
    assert (body["run"], body["round"], body["final"]) == (RUN, 3, False)
    assert body["sha256"] == g3.sha256 and body["previous_sha256"] == g2.sha256
    assert body["message_bytes"] == len(g3.message)
    assert body["message_sha256"] == hashlib.sha256(g3.message).hexdigest()
    assert body["layout_fingerprint"] == LAYOUT.fingerprint
    assert body["coordinator_public_key"] == bytes(COORD.verify_key).hex()
    assert body["created_at"] == 1017.0
    assert body["download"] == "/api/model/download"


def test_model_download_is_the_signed_message_byte_for_byte(
    client: TestClient, store: CoordinatorStore
) -> None:
    g3 = store.globals[2]  # type: ignore[attr-defined]
    response = client.get("/api/model/download")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.content == g3.message
    # A board verifies it with its pinned coordinator key.
    message = check_global(response.content, COORD.verify_key, run=RUN, last_round=2)
    assert message.round == 3
    np.testing.assert_array_equal(message.weights, np.full(4, 2.0, dtype=np.float32))
    assert response.headers["x-siren-round"] == "3"
    assert response.headers["x-siren-model-sha256"] == g3.sha256
    etag = response.headers["etag"]
    assert etag == f'"{hashlib.sha256(g3.message).hexdigest()}"'
    again = client.get("/api/model/download", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    other = client.get("/api/model/download", headers={"If-None-Match": '"0"'})
    assert other.status_code == 200 and other.content == g3.message


def _metric_lines(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_count_rounds_updates_durations_and_alarms(client: TestClient) -> None:
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = _metric_lines(response.text)
    assert m["siren_rounds_closed_total"] == 2
    assert m["siren_round_current"] == 3
    assert m["siren_rounds_planned"] == 5
    assert m["siren_updates_admitted_total"] == 8
    assert m["siren_updates_duplicate_total"] == 1
    assert m['siren_updates_rejected_total{reason="bad_signature"}'] == 1
    assert m['siren_updates_rejected_total{reason="stale_round"}'] == 1
    assert m['siren_updates_rejected_total{reason="malformed"}'] == 0
    # Round durations 5 s and 12 s.
    buckets = {
        "0.5": 0,
        "1.0": 0,
        "2.0": 0,
        "5.0": 1,
        "10.0": 1,
        "20.0": 2,
        "1800.0": 2,
        "+Inf": 2,
    }
    for le, count in buckets.items():
        assert m[f'siren_round_duration_seconds_bucket{{le="{le}"}}'] == count, le
    assert m["siren_round_duration_seconds_sum"] == 17.0
    assert m["siren_round_duration_seconds_count"] == 2
    assert m["siren_alarms_total"] == 2 and m["siren_round_alarms"] == 2
    assert m["siren_aggregation_kept_total"] == 6
    assert m["siren_aggregation_discarded_total"] == 1
    assert m['siren_decision_case_total{case="1"}'] == 1
    assert m['siren_decision_case_total{case="3"}'] == 0
    assert m['siren_decision_case_total{case="4"}'] == 1
    assert m["siren_test_accuracy"] == 0.7
    assert m['siren_boards{status="online"}'] == 2
    assert m['siren_boards{status="offline"}'] == 1
    assert m['siren_boards{status="unknown"}'] == 1
    assert m['siren_boards_banned{by="siren"}'] == 1
    assert m['siren_boards_banned{by="admin"}'] == 0
    # prometheus_client writes a sample's labels sorted by name.
    assert m['siren_info{aggregator="siren",run="demo"}'] == 1


def test_metrics_follow_the_exposition_format(client: TestClient, store: CoordinatorStore) -> None:
    store.count(3, 'odd"reason\\with\nbreak')
    text = client.get("/metrics").text
    assert text.endswith("\n")
    assert 'siren_updates_rejected_total{reason="odd\\"reason\\\\with\\nbreak"} 1' in text
    sample = re.compile(
        r'^[a-z_]+(\{[a-z_]+="([^"\\\n]|\\.)*"(,[a-z_]+="([^"\\\n]|\\.)*")*\})? \S+$'
    )
    families: list[str] = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            assert kind in ("counter", "gauge", "histogram")
            families.append(name)
        elif not line.startswith("# HELP "):
            assert sample.match(line), line
            assert any(line.startswith(f) for f in families), line
    assert len(families) == len(set(families))


# -- admin actions ---------------------------------------------------------------------------

ADMIN = [
    ("/api/admin/pause", None),
    ("/api/admin/resume", None),
    ("/api/admin/clients/board-001/ban", None),
    ("/api/admin/clients/board-001/unban", None),
    ("/api/admin/keys", {"client_id": "board-001", "public_key": "ab" * 32}),
]


@pytest.mark.parametrize(("path", "body"), ADMIN)
def test_admin_endpoints_need_the_bearer_token(
    client: TestClient, controls: Controls, path: str, body: Any
) -> None:
    wrong = [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ]
    for headers in wrong:
        response = client.post(path, json=body, headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
    assert (controls.paused, controls.banned, controls.keys) == (False, set(), {})


def test_without_a_configured_token_admin_actions_are_disabled(
    config: CoordinatorConfig, store: CoordinatorStore, controls: Controls
) -> None:
    for token in (None, ""):
        client = TestClient(create_app(config, store, controls, token=token), base_url=BASE)
        response = client.post("/api/admin/pause", headers={"Authorization": "Bearer "})
        assert response.status_code == 401
        assert "no api_token" in response.json()["detail"]
        assert client.get("/api/run").json()["admin_enabled"] is False
    assert controls.paused is False


def test_without_a_running_service_admin_actions_answer_409(
    config: CoordinatorConfig, store: CoordinatorStore
) -> None:
    client = TestClient(create_app(config, store, None, token=TOKEN), base_url=BASE)
    response = client.post("/api/admin/pause", headers=AUTH)
    assert response.status_code == 409
    assert client.get("/api/run").json()["admin_enabled"] is False


def test_pause_and_resume(client: TestClient, controls: Controls) -> None:
    assert client.post("/api/admin/pause", headers=AUTH).json() == {
        "paused": True,
        "changed": True,
    }
    assert controls.paused is True
    assert client.get("/api/health").json()["paused"] is True
    assert client.get("/api/run").json()["paused"] is True
    assert _metric_lines(client.get("/metrics").text)["siren_paused"] == 1
    again = client.post("/api/admin/pause", headers=AUTH).json()
    assert again == {"paused": True, "changed": False}
    assert client.post("/api/admin/resume", headers=AUTH).json() == {
        "paused": False,
        "changed": True,
    }
    assert controls.paused is False


def test_ban_and_unban(client: TestClient, controls: Controls) -> None:
    response = client.post("/api/admin/clients/board-001/ban", headers=AUTH)
    assert response.json() == {"client": "board-001", "banned": True, "changed": True}
    assert controls.banned == {"board-001"}
    row = client.get("/api/clients/board-001").json()
    assert (row["banned"], row["admin_banned"], row["siren_banned"]) == (True, True, False)
    # A board banned by an operator is not waited for.
    assert client.get("/api/run").json()["open_round"]["missing"] == ["board-002", "board-003"]
    assert _metric_lines(client.get("/metrics").text)['siren_boards_banned{by="admin"}'] == 1
    assert client.post("/api/admin/clients/board-001/ban", headers=AUTH).json()["changed"] is False
    response = client.post("/api/admin/clients/board-001/unban", headers=AUTH)
    assert response.json() == {"client": "board-001", "banned": False, "changed": True}
    assert controls.banned == set()


def test_banning_an_unknown_board_is_404_and_touches_nothing(
    client: TestClient, controls: Controls
) -> None:
    response = client.post("/api/admin/clients/board-404/ban", headers=AUTH)
    assert response.status_code == 404
    assert "no board 'board-404'" in response.json()["detail"]
    assert controls.banned == set()
    assert client.post("/api/admin/clients/bad!id/ban", headers=AUTH).status_code == 422


def test_refusals_of_the_service_map_to_404_409_and_503(
    client: TestClient, controls: Controls
) -> None:
    controls.fail = LookupError("board-001 is not a board of this run")
    assert client.post("/api/admin/clients/board-001/ban", headers=AUTH).status_code == 404
    controls.fail = ValueError("the run is finished")
    response = client.post("/api/admin/pause", headers=AUTH)
    assert (response.status_code, response.json()["detail"]) == (409, "the run is finished")
    controls.fail = TimeoutError("no answer within 10 s")
    response = client.post("/api/admin/resume", headers=AUTH)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"


def test_register_key(client: TestClient, controls: Controls) -> None:
    key = SigningKey(b"n" * 32).verify_key
    body = {"client_id": "board-001", "public_key": bytes(key).hex()}
    response = client.post("/api/admin/keys", json=body, headers=AUTH)
    assert response.json() == {
        "client_id": "board-001",
        "fingerprint": hashlib.sha256(bytes(key)).hexdigest(),
        "changed": True,
        "active": True,
    }
    assert controls.keys == {"board-001": key}
    assert client.post("/api/admin/keys", json=body, headers=AUTH).json()["changed"] is False
    upper = {"client_id": "board-new", "public_key": bytes(key).hex().upper()}
    response = client.post("/api/admin/keys", json=upper, headers=AUTH).json()
    assert (response["changed"], response["active"]) == (True, False)


def test_malformed_key_registrations_are_422(client: TestClient, controls: Controls) -> None:
    good = bytes(SigningKey(b"n" * 32).verify_key).hex()
    bodies: list[Any] = [
        {"client_id": "board-001"},
        {"public_key": good},
        {"client_id": "board-001", "public_key": good[:-2]},
        {"client_id": "board-001", "public_key": "zz" * 32},
        {"client_id": "bad id", "public_key": good},
        {"client_id": "board-001", "public_key": good, "extra": 1},
        {"client_id": 7, "public_key": good},
        [],
        "text",
    ]
    for body in bodies:
        response = client.post("/api/admin/keys", json=body, headers=AUTH)
        assert response.status_code == 422, body
    raw = client.post(
        "/api/admin/keys",
        content=b"{not json",
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert raw.status_code == 422
    undecodable = client.post(
        "/api/admin/keys",
        content=b'"\xff\xfe{',
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert undecodable.status_code == 422
    assert undecodable.json()["detail"][0]["msg"] == "the request body is not valid UTF-8 JSON"
    assert controls.keys == {}


def test_a_small_order_key_is_422(client: TestClient, controls: Controls) -> None:
    # 01 00..00 encodes the neutral element (x = 0, y = 1): a point of order 1, never a key.
    body = {"client_id": "board-001", "public_key": "01" + "00" * 31}
    response = client.post("/api/admin/keys", json=body, headers=AUTH)
    assert response.status_code == 422
    assert "public_key" in response.text
    assert controls.keys == {}


def test_the_token_never_appears_in_responses_or_logs(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    responses = [
        client.post("/api/admin/pause", headers=AUTH),
        client.post("/api/admin/clients/board-002/ban", headers=AUTH),
        client.post("/api/admin/pause", headers={"Authorization": f"Bearer {TOKEN}-"}),
        client.get("/api/run", headers=AUTH),
        client.get("/metrics"),
        client.get("/api/openapi.json"),
    ]
    for response in responses:
        assert TOKEN not in response.text
        assert all(TOKEN not in v for v in response.headers.values())
    assert "admin: pause" in caplog.text and "admin: ban board-002" in caplog.text
    assert TOKEN not in caplog.text


# -- the dashboard and the HTTP surface ------------------------------------------------------


def test_dashboard_page_and_assets_are_served_without_external_resources(
    client: TestClient,
) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    references = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert "/static/app.js" in references and "/static/style.css" in references
    assert all(ref.startswith("/") for ref in references), references
    script = client.get("/static/app.js")
    style = client.get("/static/style.css")
    assert script.status_code == 200 and style.status_code == 200
    fetched = re.findall(r'getJSON\("([^"]+)"', script.text)
    assert fetched and all(url.startswith("/api/") for url in fetched)
    assert "url(" not in style.text and "@import" not in style.text
    for marker in ('id="accuracy-chart"', 'id="heatmap"', 'id="boards"'):
        assert marker in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_requests_for_other_hosts_are_refused(client: TestClient) -> None:
    assert client.get("/api/health", headers={"Host": "evil.example"}).status_code == 400
    assert client.get("/api/health", headers={"Host": "localhost:8080"}).status_code == 200


def test_openapi_schema_documents_every_endpoint_with_typed_models(client: TestClient) -> None:
    schema = client.get("/api/openapi.json").json()
    paths = schema["paths"]
    expected = {
        "/api/health": "get",
        "/api/run": "get",
        "/api/rounds": "get",
        "/api/rounds/{round}": "get",
        "/api/clients": "get",
        "/api/clients/{client_id}": "get",
        "/api/model": "get",
        "/api/model/download": "get",
        "/metrics": "get",
        "/api/admin/pause": "post",
        "/api/admin/resume": "post",
        "/api/admin/clients/{client_id}/ban": "post",
        "/api/admin/clients/{client_id}/unban": "post",
        "/api/admin/clients/{client_id}/revoke": "post",
        "/api/admin/keys": "post",
    }
    assert set(paths) == set(expected)
    for path, method in expected.items():
        assert method in paths[path], path
    for name in ("RunInfo", "RoundSummary", "RoundDetail", "ClientDetail", "ModelInfo"):
        assert name in schema["components"]["schemas"]
    assert paths["/api/admin/pause"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in paths["/api/run"]["get"]


# -- with the real round engine and over a real socket ----------------------------------------


def test_api_reflects_a_run_driven_by_the_round_engine(tmp_path: Path) -> None:
    from coordinator.engine import RoundEngine
    from coordinator.rounds import RuleStrategy
    from coordinator.runtime import CoordinatorRuntime
    from protocol.envelope import encode_update

    boards = {f"b{i}": SigningKey(bytes([70 + i]) * 32) for i in range(3)}
    config = make_config(tmp_path, clients=tuple(boards), rounds=2, aggregator=AggregatorSettings())
    initial = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    runtime = CoordinatorRuntime(LAYOUT, initial.copy(), RuleStrategy("fedavg"))
    store = CoordinatorStore(config.db)
    keys = {c: k.verify_key for c, k in boards.items()}
    engine = RoundEngine(config, runtime, store, COORD, keys)
    engine.start()
    client = TestClient(create_app(config, store), base_url=BASE)
    try:
        for _ in range(2):
            assert engine.state is not None
            for (name, key), samples in zip(boards.items(), (10, 20, 30)):
                update = encode_update(
                    run=RUN,
                    round=engine.round,
                    client=name,
                    signing_key=key,
                    delta=np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32),
                    layout=LAYOUT,
                    base_sha256=engine.state.glob.sha256,
                    samples=samples,
                    alarm=name == "b1",
                )
                assert engine.handle_update(update).accepted
            assert engine.close_round() is not None
        run = client.get("/api/run").json()
        assert (run["finished"], run["rounds_closed"], run["current_round"]) == (True, 2, 3)
        assert run["open_round"] is None
        rounds = client.get("/api/rounds").json()
        assert [r["reported"] for r in rounds] == [["b0", "b1", "b2"]] * 2
        assert [r["alarms"] for r in rounds] == [["b1"], ["b1"]]
        assert [r["kept"] for r in rounds] == [["b0", "b1", "b2"]] * 2
        assert [r["rule"] for r in rounds] == ["fedavg", "fedavg"]
        assert all(r["decision_case"] is None for r in rounds)
        detail = client.get("/api/rounds/3")
        assert detail.status_code == 404 and "the run is finished" in detail.json()["detail"]
        # FedAvg adds the common delta twice: g_3 = [3, 2, 3, 4].
        final = client.get("/api/model/download").content
        assert final == engine.global_message
        message = check_global(final, COORD.verify_key, run=RUN)
        np.testing.assert_array_equal(message.weights, [3.0, 2.0, 3.0, 4.0])
        assert client.get("/api/model").json()["final"] is True
        clients = {c["client"]: c for c in client.get("/api/clients").json()}
        assert clients["b1"]["alarms"] == 2 and clients["b0"]["alarms"] == 0
        assert clients["b2"]["penalty_count"] is None  # no SIREN, no malicious index
    finally:
        store.close()


def test_server_runs_on_a_free_loopback_port(
    config: CoordinatorConfig, store: CoordinatorStore
) -> None:
    server = start_api_server(create_app(config, store), port=0)
    try:
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}/"
        response = httpx.get(server.url + "api/health", timeout=5)
        assert response.json()["round"] == 3
    finally:
        server.stop()
    assert not server.thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "api/health", timeout=2)


def test_server_refuses_non_loopback_addresses(
    config: CoordinatorConfig, store: CoordinatorStore
) -> None:
    app = create_app(config, store)
    for host in ("0.0.0.0", "192.168.1.10", "example.org"):
        with pytest.raises(ValueError, match="loopback"):
            start_api_server(app, host=host)
    with pytest.raises(ValueError, match=r"0\.\.65535"):
        start_api_server(app, port=70000)


def test_non_finite_values_in_records_never_break_a_response(
    client: TestClient, store: CoordinatorStore
) -> None:
    # Round 1 stored a NaN test loss; every view of it is valid JSON.
    for path in ("/api/rounds", "/api/rounds/1", "/api/clients/board-000"):
        response = client.get(path)
        assert response.status_code == 200
        assert "NaN" not in response.text
    assert not math.isnan(client.get("/api/rounds/1").json()["test_accuracy"])


def test_admin_token_comes_from_the_environment_before_the_token_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from coordinator.config import API_TOKEN_ENV, ApiSettings

    token_file = tmp_path / "api.token"
    token_file.write_text("from-file\n")
    monkeypatch.delenv(API_TOKEN_ENV, raising=False)
    assert ApiSettings(token_file=token_file).token() == "from-file"
    assert ApiSettings().token() is None
    monkeypatch.setenv(API_TOKEN_ENV, "  from-env ")
    assert ApiSettings(token_file=token_file).token() == "from-env"
    assert ApiSettings().token() == "from-env"
    assert "from-env" not in repr(ApiSettings(token_file=token_file))


def test_with_the_real_service_controls(tmp_path: Path) -> None:
    from coordinator.controls import ServiceControls
    from coordinator.engine import RoundEngine
    from coordinator.rounds import RuleStrategy
    from coordinator.runtime import CoordinatorRuntime
    from coordinator.service import CoordinatorService

    boards = {f"b{i}": SigningKey(bytes([80 + i]) * 32) for i in range(3)}
    config = make_config(tmp_path, clients=tuple(boards), aggregator=AggregatorSettings())
    runtime = CoordinatorRuntime(LAYOUT, np.zeros(4, np.float32), RuleStrategy("fedavg"))
    store = CoordinatorStore(config.db)
    keys = {c: k.verify_key for c, k in boards.items()}
    engine = RoundEngine(config, runtime, store, COORD, keys)
    engine.start()
    service = CoordinatorService(config, engine)
    controls = ServiceControls(service, timeout=0.2)
    assert isinstance(controls, CoordinatorControls)
    client = TestClient(create_app(config, store, controls, token=TOKEN), base_url=BASE)
    try:
        # The engine's own state (as the service thread sets it) is what the API shows.
        assert engine.set_banned("b1", True) and engine.set_paused(True)
        assert client.get("/api/health").json()["paused"] is True
        row = client.get("/api/clients/b1").json()
        assert (row["admin_banned"], row["banned"]) == (True, True)
        assert client.get("/api/run").json()["open_round"]["missing"] == ["b0", "b2"]
        # The service loop is not running: actions cannot be carried out.
        response = client.post("/api/admin/resume", headers=AUTH)
        assert response.status_code == 503
        assert "not running" in response.json()["detail"]
        assert engine.paused is True
    finally:
        store.close()


def test_a_revoked_board_is_not_missing_from_the_open_round(
    client: TestClient, store: CoordinatorStore
) -> None:
    store.set_meta("revoked", json.dumps({"board-002": "00" * 32}))
    assert client.get("/api/run").json()["open_round"]["missing"] == ["board-001", "board-003"]
