"""Board settings: TOML in and out, relative paths, secrets kept out of the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_client.config import (
    AlarmSettings,
    BoardConfig,
    BrokerSettings,
    ConfigError,
    DataSettings,
)


def _config(root: Path) -> BoardConfig:
    return BoardConfig(
        client_id="board-002",
        run="demo",
        key_dir=root / "keys",
        coordinator_key=root / "coordinator.pub",
        state_dir=root / "state",
        index=2,
        rounds=5,
        broker=BrokerSettings(
            host="10.0.0.1",
            port=8883,
            username="board-002",
            password="pw",
            tls=True,
            ca_file=root / "ca.crt",
        ),
        data=DataSettings(dataset="digits", clients=4, train_samples=800),
    )


def test_toml_round_trip_with_relative_paths_and_password_file(tmp_path: Path) -> None:
    (tmp_path / "mqtt.password").write_text("pw\n")
    text = _config(tmp_path).to_toml(relative_to=tmp_path, password_file="mqtt.password")
    assert "pw" not in text.replace("password_file", "").replace("mqtt.password", "")
    assert 'key_dir = "keys"' in text
    (tmp_path / "board.toml").write_text(text)
    loaded = BoardConfig.load(tmp_path / "board.toml")
    assert loaded.client_id == "board-002" and loaded.index == 2 and loaded.rounds == 5
    assert loaded.key_dir == tmp_path.resolve() / "keys"
    assert loaded.broker.password == "pw"
    assert loaded.broker.tls is True and loaded.broker.ca_file == tmp_path.resolve() / "ca.crt"
    assert loaded.data.train_samples == 800 and loaded.data.test_samples is None
    assert loaded.training.learning_rate is None
    assert loaded.training.resolved_lr() == 0.001


def test_unknown_keys_and_bad_values_are_reported(tmp_path: Path) -> None:
    base = (
        '[board]\nclient_id = "b1"\nrun = "r"\nkey_dir = "k"\ncoordinator_key = "c"\n'
        'state_dir = "s"\n'
    )
    (tmp_path / "a.toml").write_text(base + 'colour = "red"\n')
    with pytest.raises(ConfigError, match="colour"):
        BoardConfig.load(tmp_path / "a.toml")
    (tmp_path / "b.toml").write_text(base + "[broker]\nprotocol = 4\n")
    with pytest.raises(ConfigError, match="protocol must be 5 or 311"):
        BoardConfig.load(tmp_path / "b.toml")
    (tmp_path / "c.toml").write_text(base.replace('"b1"', '"bad/id"'))
    with pytest.raises(ConfigError, match="client_id"):
        BoardConfig.load(tmp_path / "c.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        BoardConfig.load(tmp_path / "missing.toml")


def test_commented_board_toml_documents_every_key_and_loads_the_same(tmp_path: Path) -> None:
    import tomllib

    from edge_client.config import COMMENTS, BoardConfig

    cfg = BoardConfig(
        client_id="board-1", run="demo", key_dir=tmp_path / "keys",
        coordinator_key=tmp_path / "c.pub", state_dir=tmp_path / "state",
    )  # fmt: skip
    plain = tomllib.loads(cfg.to_toml(relative_to=tmp_path, password_file="mqtt.password"))
    text = cfg.to_toml(relative_to=tmp_path, password_file="mqtt.password", commented=True)
    assert tomllib.loads(text) == plain
    for section, values in plain.items():
        assert COMMENTS[section].get(""), f"[{section}] has no description"
        for key in values:
            assert COMMENTS[section].get(key), f"{section}.{key} has no comment"


def test_alarm_rule_comes_from_the_profile_unless_set(tmp_path: Path) -> None:
    assert AlarmSettings().profile == "authors" and AlarmSettings().rule == "relative"
    assert AlarmSettings(profile="paper-text").rule == "paper"
    assert AlarmSettings(profile="paper-text", rule="relative").rule == "relative"
    base = (
        '[board]\nclient_id = "b1"\nrun = "r"\nkey_dir = "k"\ncoordinator_key = "c"\n'
        'state_dir = "s"\n[alarm]\nenabled = true\n'
    )
    (tmp_path / "a.toml").write_text(base + 'profile = "paper-text"\nrule = ""\n')
    loaded = BoardConfig.load(tmp_path / "a.toml")
    assert (loaded.alarm.profile, loaded.alarm.rule) == ("paper-text", "paper")
    (tmp_path / "b.toml").write_text(base + 'profile = "nope"\n')
    with pytest.raises(ConfigError, match=r"alarm\.profile: unknown SIREN profile 'nope'"):
        BoardConfig.load(tmp_path / "b.toml")
    (tmp_path / "c.toml").write_text(base + 'rule = "sometimes"\n')
    with pytest.raises(ConfigError, match=r"alarm\.rule must be one of"):
        BoardConfig.load(tmp_path / "c.toml")
