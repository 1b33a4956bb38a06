"""Coordinator settings: TOML round trip, inline aggregator parameters, quorum arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.config import AggregatorSettings, ConfigError, CoordinatorConfig


def _config(root: Path, **kw) -> CoordinatorConfig:
    return CoordinatorConfig(
        run="demo", key_dir=root / "keys", allow_list=root / "allow.txt", db=root / "c.sqlite", **kw
    )


def test_toml_round_trip(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        clients=("b0", "b1"),
        rounds=4,
        quorum=0.75,
        aggregator=AggregatorSettings("krum", {"f": 1, "mode": "multi"}),
    )
    (tmp_path / "coord.toml").write_text(cfg.to_toml(relative_to=tmp_path))
    loaded = CoordinatorConfig.load(tmp_path / "coord.toml")
    assert loaded.clients == ("b0", "b1") and loaded.rounds == 4 and loaded.quorum == 0.75
    assert loaded.aggregator.params == {"f": 1, "mode": "multi"}
    assert loaded.db == tmp_path.resolve() / "c.sqlite"
    assert loaded.max_samples is None and loaded.data.root_path is None


@pytest.mark.parametrize(
    ("quorum", "k", "needed"),
    [(0.5, 3, 2), (0.5, 4, 2), (1.0, 10, 10), (0.34, 3, 2), (0.01, 50, 1), (0.3, 10, 3)],
)
def test_quorum_count_is_the_ceiling_of_the_fraction(quorum: float, k: int, needed: int) -> None:
    # ceil(0.5*3)=2, ceil(2)=2, 10, ceil(1.02)=2, ceil(0.5)=1, ceil(3.0)=3 (no float drift to 4)
    assert _config(Path("/x"), quorum=quorum).quorum_count(k) == needed


def test_invalid_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="twice"):
        _config(tmp_path, clients=("b0", "b0"))
    with pytest.raises(ConfigError, match="quorum"):
        _config(tmp_path, quorum=0.0)
    (tmp_path / "bad.toml").write_text('[coordinator]\nrun = "r"\n')
    with pytest.raises(ConfigError, match=r"coordinator\.key_dir"):
        CoordinatorConfig.load(tmp_path / "bad.toml")
    (tmp_path / "bad2.toml").write_text("[coordinator]\n[wat]\n")
    with pytest.raises(ConfigError, match="wat"):
        CoordinatorConfig.load(tmp_path / "bad2.toml")


def test_commented_toml_documents_every_key_and_loads_the_same(tmp_path: Path) -> None:
    import tomllib

    from coordinator.config import COMMENTS

    cfg = _config(tmp_path, clients=("b0",), aggregator=AggregatorSettings("siren"))
    plain = tomllib.loads(cfg.to_toml(relative_to=tmp_path, password_file="pw"))
    text = cfg.to_toml(relative_to=tmp_path, password_file="pw", commented=True, header="top")
    assert text.startswith("# top\n") and tomllib.loads(text) == plain
    for section, values in plain.items():
        assert COMMENTS[section].get(""), f"[{section}] has no description"
        for key in values:
            assert COMMENTS[section].get(key), f"{section}.{key} has no comment"
            assert f"# {COMMENTS[section][key].splitlines()[0][:30]}" in text
    (tmp_path / "coord.toml").write_text(text)
    (tmp_path / "pw").write_text("secret\n")
    assert CoordinatorConfig.load(tmp_path / "coord.toml").aggregator.name == "siren"


def test_siren_profile_round_trips_and_defaults_to_authors(tmp_path: Path) -> None:
    cfg = _config(tmp_path, aggregator=AggregatorSettings("siren", {}, profile="paper-text"))
    (tmp_path / "coord.toml").write_text(cfg.to_toml(relative_to=tmp_path))
    text = (tmp_path / "coord.toml").read_text()
    assert 'profile = "paper-text"' in text
    assert CoordinatorConfig.load(tmp_path / "coord.toml").aggregator.profile == "paper-text"
    (tmp_path / "coord.toml").write_text(text.replace('profile = "paper-text"\n', ""))
    assert CoordinatorConfig.load(tmp_path / "coord.toml").aggregator.profile == "authors"
    (tmp_path / "coord.toml").write_text(text.replace('"paper-text"', '"paper"'))
    with pytest.raises(ConfigError, match="unknown SIREN profile 'paper'; valid: authors"):
        CoordinatorConfig.load(tmp_path / "coord.toml")


def test_the_simulators_malicious_boards_round_trip_and_are_absent_by_default(
    tmp_path: Path,
) -> None:
    from coordinator.config import SimulationSettings

    plain = _config(tmp_path)
    assert plain.simulation is None and "[simulation]" not in plain.to_toml(relative_to=tmp_path)
    cfg = _config(tmp_path, simulation=SimulationSettings(("b2", "b4")))
    (tmp_path / "coord.toml").write_text(cfg.to_toml(relative_to=tmp_path))
    loaded = CoordinatorConfig.load(tmp_path / "coord.toml")
    assert loaded.simulation == SimulationSettings(("b2", "b4"))
    with pytest.raises(ConfigError, match="invalid client ids"):
        SimulationSettings(("bad/id",))


def test_config_template_is_a_complete_commented_coord_toml(tmp_path: Path, capsys) -> None:
    from siren_cli.main import main

    assert main(["coordinator", "config-template", "--run", "field-1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# siren-edge coordinator configuration")
    (tmp_path / "coord.toml").write_text(text)
    (tmp_path / "mqtt.password").write_text("pw\n")
    loaded = CoordinatorConfig.load(tmp_path / "coord.toml")
    assert loaded.run == "field-1" and loaded.aggregator.name == "siren"
    assert loaded.data.evaluate and loaded.data.root == "split"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("streaming = true", 'streaming = "false"', "admission.streaming must be true or false"),
        ("exit_when_done = true", 'exit_when_done = "no"', "coordinator.exit_when_done must be"),
        ("enabled = false", "enabled = 0", "api.enabled must be true or false, got 0"),
    ],
)
def test_a_flag_written_as_text_or_a_number_is_refused(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    text = _config(tmp_path).to_toml(relative_to=tmp_path)
    assert old in text
    (tmp_path / "coord.toml").write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=message):
        CoordinatorConfig.load(tmp_path / "coord.toml")
