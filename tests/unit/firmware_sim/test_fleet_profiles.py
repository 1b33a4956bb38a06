"""Device profiles: exact shares by largest remainders, seeded drops, publish delays."""

from __future__ import annotations

import numpy as np
import pytest

from firmware_sim.profiles import PROFILES, DeviceProfile, assign_profiles, parse_mix


def test_shares_become_exact_counts() -> None:
    mix = parse_mix("pi4:0.5,pi5:0.3,jetson:0.2")
    names = [p.name for p in assign_profiles(mix, 10, seed=1)]
    assert sorted(names) == ["jetson"] * 2 + ["pi4"] * 5 + ["pi5"] * 3
    # 7 boards: exact 3.5 / 2.1 / 1.4 -> floors 3, 2, 1 and the leftover board goes to the
    # largest remainder (pi4's 0.5).
    names7 = [p.name for p in assign_profiles(mix, 7, seed=1)]
    assert (names7.count("pi4"), names7.count("pi5"), names7.count("jetson")) == (4, 2, 1)


def test_assignment_is_seeded_and_overrides_apply() -> None:
    mix = parse_mix("pi4:1,desktop:1")
    a = assign_profiles(mix, 20, seed=3)
    assert a == assign_profiles(mix, 20, seed=3)
    assert a != assign_profiles(mix, 20, seed=4)
    b = assign_profiles(mix, 4, seed=0, latency_ms=5.0, dropout=0.2)
    assert {p.latency_ms for p in b} == {5.0} and {p.dropout for p in b} == {0.2}


def test_publish_delay_is_extra_compute_plus_latency() -> None:
    profile = DeviceProfile("x", compute_factor=4.0, latency_ms=20.0)
    rng = np.random.default_rng(0)
    # (4 - 1) * 0.5 s + 20 ms
    assert profile.publish_delay(0.5, rng) == pytest.approx(1.52)
    jittery = DeviceProfile("y", latency_ms=10.0, jitter_ms=10.0)
    delays = [jittery.publish_delay(0.0, rng) for _ in range(200)]
    assert min(delays) >= 0.0 and max(delays) <= 0.020


def test_drops_are_reproducible_and_near_the_rate() -> None:
    profile = DeviceProfile("z", dropout=0.25)
    drops = [profile.drops(7, t, b) for t in range(1, 21) for b in range(50)]
    assert drops == [profile.drops(7, t, b) for t in range(1, 21) for b in range(50)]
    assert 0.2 < np.mean(drops) < 0.3
    assert not any(PROFILES["ideal"].drops(7, t, 0) for t in range(100))


def test_unknown_profile_names_are_listed() -> None:
    with pytest.raises(ValueError, match="known: ideal"):
        parse_mix("raspberry")


def test_the_mixed_fleet_is_uneven_and_drops_out() -> None:
    names = [p.name for p in assign_profiles(parse_mix("mixed"), 50, seed=0)]
    assert (names.count("pizero2"), names.count("pi4"), names.count("jetson")) == (10, 30, 10)
    by_name = {p.name: p for p in assign_profiles(parse_mix("mixed"), 50, seed=0)}
    assert by_name["pizero2"].compute_factor == 8 * by_name["pi4"].compute_factor
    assert all(p.dropout > 0 for p in by_name.values())
