"""FoolsGold (Fung et al., "Mitigating Sybils in Federated Learning Poisoning"), as the baseline
compared in the residual-based reweighting paper (Sec. 4).

FoolsGold assumes that sybils pushing the same poisoning objective send updates that point the
same way over time, while honest clients (with different data) do not. Per round:

1. each client's history ``H_i`` is the sum of all its updates so far (this round included);
2. ``cs_ij`` = cosine similarity of ``H_i`` and ``H_j`` (i != j), ``v_i = max_j cs_ij``;
3. pardoning: if ``v_j > v_i`` then ``cs_ij *= v_i / v_j`` (an honest client that happens to
   resemble a sybil is judged by its own maximum similarity, not the sybil's);
4. ``alpha_i = 1 - max_j cs_ij`` clipped to [0, 1], rescaled so that ``max alpha = 1``;
5. ``alpha_i = kappa * (ln(alpha_i / (1 - alpha_i)) + 0.5)`` clipped to [0, 1] (logit, with the
   limits 1 at ``alpha = 1`` and 0 at ``alpha = 0``);
6. the update is ``sum_i alpha_i Delta_i`` scaled as described under ``normalize``.

The history is explicit state (:class:`FoolsGoldState`): a float32 ``(clients, d)`` matrix keyed by
client id. It is as large as one round's update matrix, which is the price of the method; with
``history=False`` the similarities use this round's updates only and no state is kept. The
original's optional feature-importance weighting of the output layer is not implemented (it needs
the model layout, which aggregators do not see).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from coordinator.aggregators.base import (
    AggregationContext,
    AggregationResult,
    InvalidParameterError,
    Verdict,
    register,
    weighted_combination,
)
from coordinator.aggregators.dspo import resolve_client_ids
from coordinator.aggregators.krum import gram_matrix
from coordinator.errors import ByzantineBoundError, InvalidUpdatesError


@dataclass(frozen=True)
class FoolsGoldState:
    """Sum of every update each client has sent so far.

    ``as_arrays()`` gives a dict for ``numpy.savez``; :meth:`from_mapping` reads it back.
    """

    client_ids: tuple[str, ...]
    history: np.ndarray

    def __post_init__(self) -> None:
        hist = np.asarray(self.history, dtype=np.float32)
        ids = tuple(str(c) for c in self.client_ids)
        if hist.ndim != 2 or hist.shape[0] != len(ids):
            raise InvalidUpdatesError(
                f"foolsgold state has {len(ids)} client ids but history of shape {hist.shape}"
            )
        if len(set(ids)) != len(ids):
            raise InvalidUpdatesError("foolsgold state has duplicate client ids")
        if not np.isfinite(hist).all():
            raise InvalidUpdatesError("foolsgold state history must be finite")
        view = hist.view()  # read-only view: the caller's array keeps its own flags
        view.flags.writeable = False
        object.__setattr__(self, "history", view)
        object.__setattr__(self, "client_ids", ids)

    def as_arrays(self) -> dict[str, np.ndarray]:
        """``{"client_ids": str array, "history": float32 (clients, d) array}``."""
        return {"client_ids": np.array(self.client_ids, dtype=np.str_), "history": self.history}

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> FoolsGoldState:
        """Rebuild from :meth:`as_arrays` output (e.g. a loaded npz file)."""
        try:
            ids = tuple(str(c) for c in np.asarray(data["client_ids"]).tolist())
            hist = np.asarray(data["history"], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidUpdatesError(
                "foolsgold state must have 'client_ids' and a numeric 'history'"
            ) from exc
        if hist.ndim == 1 and hist.size == 0:
            hist = hist.reshape(0, 0)
        return cls(ids, hist)


def _coerce_state(state: Any, d: int) -> FoolsGoldState | None:
    if state is None:
        return None
    if isinstance(state, Mapping):
        state = FoolsGoldState.from_mapping(state)
    if not isinstance(state, FoolsGoldState):
        raise InvalidUpdatesError(
            f"foolsgold state must be a FoolsGoldState or a mapping, got {type(state).__name__}"
        )
    if state.client_ids and state.history.shape[1] != d:
        raise InvalidUpdatesError(
            f"foolsgold state history has d={state.history.shape[1]}, updates have d={d}"
        )
    return state


def _histories(
    updates: np.ndarray, ids: Sequence[str], previous: FoolsGoldState | None
) -> tuple[np.ndarray, FoolsGoldState]:
    """This round's client histories (K, d) and the new state holding every known client.

    Clients absent this round keep their history (first in the new state, in their old order);
    this round's clients follow in row order.
    """
    current = np.array(updates, dtype=np.float32, copy=True)
    if previous is None:
        state = FoolsGoldState(tuple(ids), current)
        return state.history, state
    known = {c: i for i, c in enumerate(previous.client_ids)}
    for row, cid in enumerate(ids):
        if cid in known:
            current[row] += previous.history[known[cid]]
    present = set(ids)
    absent = [c for c in previous.client_ids if c not in present]
    if absent:
        kept = previous.history[[known[c] for c in absent]]
        current = np.concatenate([kept, current], axis=0)
    state = FoolsGoldState((*absent, *ids), current)
    return state.history[len(absent) :], state


def cosine_matrix(vectors: np.ndarray, device: str = "numpy") -> np.ndarray:
    """``(K, K)`` cosine similarities via a float64 Gram matrix (computed on ``device``);
    zero vectors give 0."""
    gram = gram_matrix(vectors, device=device)
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    denom = np.outer(norms, norms)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(denom > 0, gram / denom, 0.0)
    return np.clip(cos, -1.0, 1.0)


def foolsgold_rates(cos: np.ndarray, kappa: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FoolsGold learning rates from a cosine matrix (steps 2-5 of the module notes).

    Returns ``(rates, max_similarity, pardoned_max_similarity)``. Pardoning only applies when
    ``v_j > 0``; a client with ``v_i <= 0`` (similar to nobody) has its similarities scaled to 0
    rather than sign-flipped by a negative ratio. If every client is maximally similar to some
    other (all ``1 - max cs = 0``, e.g. identical updates) the rates are all 0 and the caller
    decides what to do.
    """
    k = cos.shape[0]
    cs = cos.copy()
    np.fill_diagonal(cs, -np.inf)
    v = cs.max(axis=1)
    ratio = np.maximum(v, 0.0)[:, None] / np.where(v > 0, v, 1.0)[None, :]
    pardon = (v[None, :] > v[:, None]) & (v[None, :] > 0) & ~np.eye(k, dtype=bool)
    cs = np.where(pardon, cos * ratio, cs)
    pardoned = cs.max(axis=1)
    alpha = np.clip(1.0 - pardoned, 0.0, 1.0)
    top = alpha.max() if k else 0.0
    if not top > 0:
        return np.zeros(k), v, pardoned
    alpha = alpha / top
    with np.errstate(divide="ignore"):
        logit = kappa * (np.log(alpha) - np.log1p(-alpha) + 0.5)
    rates = np.where(alpha >= 1.0, 1.0, np.where(alpha <= 0.0, 0.0, np.clip(logit, 0.0, 1.0)))
    return rates, v, pardoned


@register("foolsgold", stateful=True)
def foolsgold(
    updates: np.ndarray,
    ctx: AggregationContext,
    *,
    kappa: float = 1.0,
    history: bool = True,
    normalize: bool = True,
    client_ids: tuple[str, ...] | None = None,
) -> AggregationResult:
    """FoolsGold: down-weight clients whose update histories point the same way (Fung et al.).

    See the module notes for the steps. ``kappa`` is the logit confidence (1 in the original).

    Choices:

    * ``history=True`` (default, as in FoolsGold's Algorithm 1): similarities use each client's
      summed updates, kept in the explicit state; ``ctx.state`` is None, a
      :class:`FoolsGoldState` or its ``as_arrays()`` mapping, and clients are matched by
      ``client_ids`` (default: row index). ``history=False`` uses this round only, no state.
    * ``normalize=True`` (default) returns ``sum alpha_i Delta_i / sum alpha_i`` so the result is
      on the scale of one update like the other rules; ``normalize=False`` treats the rates as
      per-client learning rates on the plain mean, ``sum alpha_i Delta_i / K`` (equal to the mean
      when every rate is 1). The original adds ``sum alpha_i Delta_i`` to the model.
    * If every rate is 0 (all histories mutually parallel, e.g. identical updates), nothing
      separates sybils from honest clients and the plain mean is returned.
    * Sample counts are not used.

    Verdicts: ``weight`` = the client's share of the aggregate, ``score`` = its rate ``alpha_i``,
    kept when the rate is > 0.

    Preconditions: K >= 2, kappa > 0. Complexity: O(K^2 d) for the float64 Gram matrix, plus
    O(K d) to update the history; memory: the new history (K, d) float32 in the state.
    """
    k, d = updates.shape
    if k < 2:
        raise ByzantineBoundError(f"foolsgold needs K >= 2 clients to compare, got K={k}")
    if not kappa > 0:
        raise InvalidParameterError(f"foolsgold needs kappa > 0, got kappa={kappa}")
    state: FoolsGoldState | None = None
    if history:
        ids = resolve_client_ids(client_ids, k, "foolsgold")
        hist, state = _histories(updates, ids, _coerce_state(ctx.state, d))
    else:
        hist = updates
    cos = cosine_matrix(hist, ctx.device)
    rates, v, pardoned = foolsgold_rates(cos, kappa)
    all_parallel = not rates.sum() > 0
    if all_parallel:
        share = np.full(k, 1.0 / k)
    elif normalize:
        share = rates / rates.sum()
    else:
        share = rates / k
    vector = weighted_combination(updates, share)
    verdicts = []
    for i in range(k):
        if all_parallel:
            reason = "foolsgold: every client parallel to another; plain mean"
        else:
            reason = (
                f"foolsgold: max similarity {v[i]:.3f} (pardoned {pardoned[i]:.3f}), "
                f"rate {rates[i]:.3f}"
            )
        verdicts.append(Verdict(bool(share[i] > 0), float(share[i]), float(rates[i]), reason))
    info = {"similarity": cos, "rates": rates, "all_parallel": all_parallel}
    return AggregationResult(vector, tuple(verdicts), state=state, info=info)
