"""Device profiles of simulated boards: compute slowdown, network latency, random dropout.

A simulated fleet trains every board on this machine's CPU, one board after the other, in a
worker process. A profile turns that into the timing of a physical board:

* ``compute_factor`` -- a board of this kind needs ``factor ×`` the measured training time; the
  worker holds the board's update back for the extra ``(factor − 1) ×`` time;
* ``latency_ms`` / ``jitter_ms`` -- one-way network delay added before the update is published:
  ``latency + U(−jitter, +jitter)``, never negative;
* ``dropout`` -- probability that the board sits out a round (powered off, out of range). Drops
  are drawn from ``default_rng([seed, round, board, 4242])``: the same seed drops the same
  boards in the same rounds.

The built-in compute factors are rough orders of magnitude for TensorFlow CPU training relative
to a desktop x86 core (a Raspberry Pi 4's Cortex-A72 cores run small Keras models several
times slower); measure a real board and pass ``--compute-factor`` when it matters.

A *mix* gives each profile a share of the fleet (``"pi4:0.5,pi5:0.3,jetson:0.2"``); named mixes
(:data:`MIXES`) stand for whole fleets: ``mixed`` is the uneven field fleet of a deployment that
grew over time -- 20% Pi Zero 2-class boards 8× slower than the Pi 4-class majority (60%),
20% Jetson-class boards, every class dropping out of some rounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DeviceProfile:
    """Timing behaviour of one kind of board.

    Attributes
    ----------
    name : str
        Profile name.
    compute_factor : float
        Multiplier of the measured training time (>= 1 slows down; 1 = this machine).
    latency_ms : float
        Mean one-way delay before an update reaches the broker.
    jitter_ms : float
        Half-width of the uniform jitter around ``latency_ms``.
    dropout : float
        Probability of skipping a round, in [0, 1).
    """

    name: str
    compute_factor: float = 1.0
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.compute_factor <= 0:
            raise ValueError(f"compute factor must be > 0, got {self.compute_factor}")
        if self.latency_ms < 0 or self.jitter_ms < 0:
            raise ValueError("latency and jitter must be >= 0 ms")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def publish_delay(self, compute_seconds: float, rng: np.random.Generator) -> float:
        """Seconds to hold an update back after training took ``compute_seconds`` here.

        ``(compute_factor − 1) · compute_seconds + (latency + U(−jitter, jitter)) / 1000``,
        clipped at 0.
        """
        extra = max(0.0, (self.compute_factor - 1.0) * compute_seconds)
        jitter = float(rng.uniform(-self.jitter_ms, self.jitter_ms)) if self.jitter_ms else 0.0
        return extra + max(0.0, self.latency_ms + jitter) / 1000.0

    def board_seconds(
        self, compute_seconds: float, seed: int, round_index: int, board: int
    ) -> float:
        """Simulated time from receiving a global model to the update reaching the broker:
        ``compute + publish_delay(compute)`` (``compute_factor × compute + latency``), with the
        jitter drawn from ``default_rng([seed, round, board, 77])`` as a fleet worker draws it.
        """
        rng = np.random.default_rng([seed, round_index, board, 77])
        return compute_seconds + self.publish_delay(compute_seconds, rng)

    def drops(self, seed: int, round_index: int, board: int) -> bool:
        """Whether the board sits out ``round_index`` (seeded, see the module docstring)."""
        if self.dropout <= 0:
            return False
        rng = np.random.default_rng([seed, round_index, board, 4242])
        return bool(rng.random() < self.dropout)


def compute_seconds(config: Any, update: Any, num_train: int) -> float:
    """A board's compute time for one round on this machine, which its device profile scales:
    the measured time of its alarm and training (``update.alarm_seconds + train_seconds``), or,
    when ``config.nominal_compute`` is set, that many seconds per training sample and local
    epoch -- the same on every run, so simulated times, and the order of an asynchronous run's
    updates, are reproducible."""
    nominal = getattr(config, "nominal_compute", None)
    if nominal is not None:
        return float(nominal) * num_train * int(config.local_epochs)
    return float(update.alarm_seconds + update.train_seconds)


#: Built-in profiles (see the module docstring for what the numbers mean).
PROFILES: dict[str, DeviceProfile] = {
    "ideal": DeviceProfile("ideal"),
    "desktop": DeviceProfile("desktop", 1.0, 2.0, 1.0),
    "jetson": DeviceProfile("jetson", 2.0, 10.0, 5.0),
    "pi5": DeviceProfile("pi5", 3.0, 15.0, 5.0),
    "pi4": DeviceProfile("pi4", 6.0, 25.0, 10.0),
    "flaky": DeviceProfile("flaky", 6.0, 150.0, 100.0, 0.1),
    "pizero2": DeviceProfile("pizero2", 48.0, 40.0, 20.0, 0.1),
}

#: Named mixes: a whole fleet's profiles and shares (see the module docstring).
MIXES: dict[str, tuple[tuple[DeviceProfile, float], ...]] = {
    "mixed": (
        (PROFILES["pizero2"], 0.2),
        (replace(PROFILES["pi4"], dropout=0.05), 0.6),
        (replace(PROFILES["jetson"], dropout=0.02), 0.2),
    ),
}


def parse_mix(text: str) -> list[tuple[DeviceProfile, float]]:
    """Parse ``"pi4:0.5,pi5:0.3,jetson:0.2"`` (or one name, ``"pi4"``, or a named mix of
    :data:`MIXES`, ``"mixed"``) into profiles and shares.

    Raises
    ------
    ValueError
        On an unknown profile name or a non-positive share.
    """
    if text.strip() in MIXES:
        return list(MIXES[text.strip()])
    out: list[tuple[DeviceProfile, float]] = []
    for part in text.split(","):
        name, _, share = part.strip().partition(":")
        if name not in PROFILES:
            raise ValueError(
                f"unknown device profile {name!r}; known: {', '.join(PROFILES)}, or a whole "
                f"fleet: {', '.join(MIXES)}"
            )
        weight = float(share) if share else 1.0
        if weight <= 0:
            raise ValueError(f"share of profile {name!r} must be > 0, got {weight}")
        out.append((PROFILES[name], weight))
    if not out:
        raise ValueError("empty device profile mix")
    return out


def assign_profiles(
    mix: Sequence[tuple[DeviceProfile, float]],
    n_boards: int,
    seed: int,
    *,
    compute_factor: float | None = None,
    latency_ms: float | None = None,
    dropout: float | None = None,
) -> list[DeviceProfile]:
    """Give each of ``n_boards`` boards a profile.

    Shares are turned into counts by largest remainders (so ``pi4:0.5`` of 10 boards is exactly
    5), and the counts are shuffled over the boards with ``default_rng([seed, 2718])``.
    ``compute_factor``, ``latency_ms`` and ``dropout`` override every assigned profile.
    """
    total = sum(w for _, w in mix)
    exact = [n_boards * w / total for _, w in mix]
    counts = [int(np.floor(x)) for x in exact]
    order = sorted(range(len(mix)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: n_boards - sum(counts)]:
        counts[i] += 1
    assigned = [mix[i][0] for i, c in enumerate(counts) for _ in range(c)]
    rng = np.random.default_rng([seed, 2718])
    assigned = [assigned[i] for i in rng.permutation(n_boards)]
    out = []
    for profile in assigned:
        if compute_factor is not None:
            profile = replace(profile, compute_factor=compute_factor)
        if latency_ms is not None:
            profile = replace(profile, latency_ms=latency_ms)
        if dropout is not None:
            profile = replace(profile, dropout=dropout)
        out.append(profile)
    return out
