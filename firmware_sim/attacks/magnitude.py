"""Magnitude attack: a board sends an update of huge but finite values.

A legitimate board whose key was stolen can send any finite float32 vector; admission refuses
only non-finite values. ``huge_values`` makes every malicious update a constant vector
(``mode=constant``: every value = ``value``, default 1e15; float32's largest finite number is
3.4028235e38) or the honest update scaled by ``value`` (``mode=scale``). Rules
that average with data-independent or direction-only weights (FedAvg, FoolsGold, DSPO's score
policy) pass such a vector on unless the coordinator's global-model guard stops it; rules built
on order statistics or distances ignore it (docs/protocol.md, "Magnitude attacks").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge_client.board import BoardUpdate
from firmware_sim.attacks.base import Attack, map_malicious, register_attack
from firmware_sim.attacks.params import Param

#: float32's largest finite value.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def huge_update(delta: np.ndarray, mode: str, value: float) -> np.ndarray:
    """The malicious update: every value ``value`` (``constant``) or ``value · Δ`` (``scale``),
    clipped into float32's finite range (the attacker wants it admitted, so never inf)."""
    if mode == "constant":
        out = np.full(np.shape(delta), value, dtype=np.float64)
    else:
        out = np.asarray(delta, dtype=np.float64) * value
    return np.clip(out, -FLOAT32_MAX, FLOAT32_MAX).astype(np.float32)


@register_attack
class HugeValues(Attack):
    """Send an update of huge finite values (every value = ``value``, or ``value`` × honest)."""

    name = "huge_values"
    summary = "send huge finite values: every value = VALUE (default 1e15), or VALUE x honest"
    source = "magnitude attack by a board with a stolen key (siren-edge threat model)"
    PARAMS = (
        Param(
            "mode",
            str,
            "constant",
            "constant: every value = VALUE; scale: the honest update times VALUE",
            choices=("constant", "scale"),
        ),
        Param("value", float, 1e15, "the value or the scale factor (float32 max: 3.4028235e38)"),
    )

    def tamper(
        self,
        round_index: int,
        global_weights: np.ndarray,
        updates: list[BoardUpdate],
        malicious: Sequence[int],
        rng: np.random.Generator,
    ) -> list[BoardUpdate]:
        """Replace every malicious update by its huge version."""
        mode, value = str(self.values["mode"]), float(self.values["value"])
        return map_malicious(
            updates, malicious, lambda _, u: u.with_delta(huge_update(u.delta, mode, value))
        )
