"""SIREN's server decision process: Algorithm 2, the four cases of Figure 3, weight analysis,
rollback, penalty and award (SIREN §4.3-4.6, Table 2).

Every round the server receives from each board ``i`` its alarm bit ``A_t^(i)`` (about the global
model ``g_t`` it was sent) and its update ``Δ^(i) = g_{t+1}^(i) − g_t``. It rebuilds the client
model ``g_{t+1}^(i) = g_t + Δ^(i)`` when it needs to test it, and ``ω^(i)`` below is the
accuracy of that model on the server's root test set (100 samples, :mod:`coordinator.oracle`).

Decision (Fig. 3 / Alg. 2), over the *admitted* clients (banned ones are refused, see penalty):

* **Cases 1-2** — nobody alarms: ``S_b`` = every admitted client, ``g_{t+1} = g_t + Σ α Δ``
  with no test at all. Case 1 (clean round) and case 2 (poisoned updates in the first attacked
  round) look identical to the server; both are recorded as ``case = 1``.
* Otherwise ``S_a`` = alarming clients, ``S_s`` = silent ones, ``r_a`` = the alarming client of
  highest ``ω`` (ties: lowest client id), ``max_a = ω^(r_a)``.
* **Case 3** — every ``i ∈ S_a`` has ``max_a − ω^(i) < C_s`` and passes the weight analysis
  against ``r_a``. Then the silent clients are tested, ``max_s`` is their best accuracy:

  - ``max_a − max_s ≤ C_s`` → *false alarms* (branch ``false-alarm``): ``g_t`` is clean, the
    alarming clients are judged malicious, ``S_b`` = silent clients with ``max_s − ω^(i) < C_s``
    that pass the weight analysis against the best silent client; base ``g_t``.
  - otherwise (branch ``poisoned-global``) the silent clients are judged malicious,
    ``S_b = S_a`` and ``g_t`` is judged poisoned: **rollback** to ``g_{t−1}``.

* **Case 4** — otherwise (divergent alarming clients): ``S_b`` = alarming clients with
  ``max_a − ω^(i) < C_s`` that pass the weight analysis against ``r_a``; the other alarming
  clients are judged malicious; rollback to ``g_{t−1}``.

**Weight analysis** (§4.5): an update whose angle with the reference update (the one of highest
root accuracy in the set being tested) exceeds π/2, i.e. ``cos < 0``, is malicious. A zero
vector has no direction; its cosine is recorded as ``None`` and it passes (angle taken as π/2).

**Penalty** (§4.6): every judgement "malicious" adds 1 to the client's count (its *malicious
index*, Figs. 11-14). A count ``> C_p`` bans the client: from the next round its update is
refused without checking. **Award**: a banned client judged benign loses
``C_a`` from its count and rejoins, from the next round, once the count is ``< C_p`` (the gap
between ``> C_p`` and ``< C_p`` is a hysteresis: a count of exactly ``C_p`` keeps the status).

**Profiles.** The paper's text and its authors' public code differ in how C_s and C_p are
applied (and in the boards' alarm rule); :mod:`protocol.siren_profiles` names both readings and
derives the relative threshold. ``profile="authors"`` (the default) applies C_s relative to the
reference accuracy of each test — ``max − ω^(i) < C_s·max`` wherever the list above says
``max − ω^(i) < C_s``, and ``max_a − max_s ≤ C_s·max_a`` for the false-alarm test — and bans
above ``C_p = int(0.45·T)`` penalties (T = rounds of the run); ``profile="paper-text"`` applies
C_s as an absolute difference and bans above ``C_p = 0.45·K``. ``server_threshold`` and
``penalty_basis`` override the profile one at a time.

Choices where the paper is ambiguous (all documented on the parameters of
:class:`coordinator.siren_params.SirenParams`):

1. *How can a refused client be judged benign?* §4.6 says banned clients are refused without
   checking (to save the server's work) yet also that the server may find a banned client
   benign and let it rejoin "with a probability". We read it as a random **probe**: each round
   each banned client is checked with probability ``probe_probability`` (a deterministic draw
   from ``(seed, round, client)``, so a restarted server makes the same draws). A probed update
   is never aggregated in that round and never enters ``S_a``/``S_s``; it is judged against the
   round's reference, the ``S_b`` member of highest root accuracy: benign iff
   ``ω_ref − ω^(i) < C_s`` and it passes the weight analysis against that reference. Benign →
   award (``−C_a``); malicious → penalty (``+1``). Unprobed banned clients are not touched.
2. *Rollback arithmetic.* Alg. 2 writes ``g_{t+1} = g_{t−1} + Σ_{S_b} α Δ^(i)``, but ``Δ^(i)``
   is taken against ``g_t`` (Alg. 1 line 11), so the sum literally carries the offset
   ``g_{t−1} − g_t``, i.e. minus the poison. The default ``rollback="rebase"`` re-expresses each
   benign client model against the base: ``g_{t+1} = b + Σ α (g_{t+1}^(i) − b)``. With ``α``
   summing to one this is the weighted mean of the benign client models whatever the base; the
   base matters when ``α`` does not sum to one (``alpha="all"``) or ``S_b`` is empty, and the
   server's memory follows Step 5: after a rollback it keeps ``g_{t−1}`` (the last global it
   trusts) as the next round's "previous global", so a poisoned ``g_t`` never becomes a base.
   ``rollback="literal"`` applies the formula as printed.
3. *α.* ``alpha="benign"`` (default): ``n_i / Σ_{j∈S_b} n_j`` with the declared sample counts;
   ``"all"``: ``n_i / Σ_{j admitted} n_j`` (FedAvg's weights, the rejected mass stays on the
   base); ``"uniform"``: ``1/|S_b|``. A set whose counts sum to zero leaves the base unchanged.
4. *Case 3 with no silent client* (everybody alarms and agrees): ``max_s`` over an empty set is
   taken as −∞, so the ``poisoned-global`` branch fires: all alarming clients are benign and
   ``g_t`` is dropped.
5. *Silent clients in case 4*: the paper's argument is that a poisoned ``g_t`` makes every
   benign client alarm, so silent clients are not benign; ``case4_silent="malicious"`` (default)
   penalizes them, ``"ignored"`` only leaves them out of the aggregate.
6. *False-alarm branch*: the paper judges every alarming client malicious there. With
   ``false_alarm_check=True`` an alarming client is instead tested like a silent one (against
   the best silent client) and joins ``S_b`` when it passes — useful with the paper alarm rule,
   under which benign boards also alarm in clean rounds.
7. *S_b empty* (only possible with no admitted client or when probing with nothing to compare
   to): the global model stays at the base (``g_t``, or ``g_{t−1}`` after a rollback).
8. Threshold comparisons allow 1e-9 of rounding: accuracy differences that equal ``C_s`` in
   exact arithmetic (e.g. 0.85 − 0.75) count as equal to it.
9. *Stale silent updates* (buffered asynchronous mode, :mod:`coordinator.async_rounds`): a
   board whose update was trained on an older version than the current ``g_t`` never saw
   ``g_t``, so its silence is no evidence that it trusts it. Where a board is judged malicious
   for being silent -- case 4 with ``case4_silent="malicious"`` and the ``poisoned-global``
   branch of case 3 -- a silent update with ``staleness > 0`` is ignored instead (left out of
   the aggregate, not penalized). Synchronous rounds have no stale updates.

Interaction with the printed alarm rule (profile ``paper-text``): a benign board alarms whenever
``g_t`` is not ``C_c`` better than its own previous model, which in IID training is most rounds
after the first few. It then trains from its own model, so its ``Δ^(i)`` carries the offset
``g_t^(i) − g_t``; the offsets of models around their mean are negatively correlated, so two
benign updates are often slightly more than π/2 apart and the weight analysis rejects (and
penalizes) benign boards in clean rounds. The accuracy check alone still rejects boosted
sign-flipped updates, so ``weight_analysis=False`` removes those false rejections; the authors'
relative alarm rule removes the false alarms instead, but then attackers that stay silent poison
every round in which no board alarms (Fig. 3 case 2), which the printed rule prevents.

**Client sampling** (:mod:`coordinator.selection`; SIREN §2.1 selects ``|K|`` clients per
round). Only the boards drawn for a round send an update, and everything above is over them:
``S_a``, ``S_s`` and ``S_b`` are subsets of the round's participants, and penalties and awards
change only the counts of boards that took part (a board that was not drawn is neither judged,
nor probed, nor awarded; its count and its ban carry over to the next round it is drawn for).
A participant's alarm compares ``g_t`` with *its own latest local model*, from the last round
it took part in, possibly several rounds old (:func:`edge_client.board.board_step`); a board
taking part for the first time has none and never alarms. ``C_p`` is not rescaled: it stays
``0.45·K`` (all boards of the run) or ``int(0.45·T)`` (all rounds), so a board drawn for a
fraction ``f`` of the rounds needs as many malicious judgements as with full participation, in
about ``f·T`` rounds, to be banned. Measured in the README's demo with half of the boards drawn:
no honest board is banned, and attackers are often not banned either -- SIREN then rejects their
updates round by round (rollback, case 3/4) instead (``docs/participation.md``); set ``c_p`` to
ban them sooner.

Complexity per round: at most ``K + probes`` root-set evaluations (none in cases 1-2 without
probes), ``O(K d)`` for the weight analysis and the weighted sum.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from coordinator.siren_params import SirenParams
from coordinator.strategy import RootOracle, StepResult, Submission

#: Tolerance of the threshold comparisons (choice 8 of the module docstring).
EPS = 1e-9

#: Version of the :meth:`SirenStrategy.state_dict` layout.
STATE_VERSION = 1


def encode_vector(vector: np.ndarray) -> dict[str, Any]:
    """A float32 vector as JSON: base64 of its little-endian bytes (exact, ~1.33 bytes/byte).

    A 225,034-parameter model takes 1.2 MB this way against about 4.5 MB as a list of decimals.
    """
    data = np.ascontiguousarray(vector, dtype="<f4")
    return {
        "encoding": "base64-float32-le",
        "size": int(data.size),
        "data": base64.b64encode(data.tobytes()).decode("ascii"),
    }


def decode_vector(blob: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`encode_vector` (checks the encoding and the length)."""
    if blob.get("encoding") != "base64-float32-le":
        raise ValueError(f"unknown vector encoding {blob.get('encoding')!r}")
    raw = base64.b64decode(blob["data"], validate=True)
    vec = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if vec.size != int(blob["size"]):
        raise ValueError(f"vector of {vec.size} values, header says {blob['size']}")
    return vec


def cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    """Cosine of the angle between two vectors (float64); None when either is zero."""
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    na, nb = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
    if na == 0.0 or nb == 0.0:
        return None
    return float(np.clip(np.dot(a64, b64) / (na * nb), -1.0, 1.0))


def _by_staleness(view: _RoundView, silent: list[int]) -> tuple[list[int], list[int]]:
    """Silent clients that saw the current global model (judged by their silence) and stale
    ones that did not (ignored): choice 9 of the module docstring."""
    fresh = [c for c in silent if view.by_id[c].staleness <= 0]
    stale = [c for c in silent if view.by_id[c].staleness > 0]
    return fresh, stale


class _RoundView:
    """One round's submissions with cached root accuracies and weight-analysis results."""

    def __init__(
        self,
        oracle: RootOracle,
        g_t: np.ndarray,
        by_id: dict[int, Submission],
        params: SirenParams,
        cosine_of: Callable[[int, int], float | None] | None = None,
    ) -> None:
        self.oracle = oracle
        self.g_t = g_t
        self.by_id = by_id
        self.params = params
        self.cosine_of = cosine_of
        self.acc: dict[int, float] = {}
        self.wa: dict[int, dict[str, Any]] = {}

    def accuracy(self, cid: int) -> float:
        """``ω^(i)``: root accuracy of the client model ``g_t + Δ^(i)`` (computed once)."""
        if cid not in self.acc:
            model = self.g_t + np.asarray(self.by_id[cid].delta, dtype=np.float32)
            self.acc[cid] = float(self.oracle.accuracy(model))
        return self.acc[cid]

    def prefetch(self, group: list[int]) -> None:
        """Compute the root accuracies of ``group`` not yet known, in one oracle call."""
        todo = [cid for cid in group if cid not in self.acc]
        batch = getattr(self.oracle, "accuracies", None)
        if len(todo) < 2 or batch is None:
            return
        models = [self.g_t + np.asarray(self.by_id[c].delta, dtype=np.float32) for c in todo]
        for cid, acc in zip(todo, batch(models), strict=True):
            self.acc[cid] = float(acc)

    def best(self, group: list[int]) -> int:
        """The client of highest root accuracy in ``group``; ties go to the lowest id."""
        self.prefetch(group)
        return max(group, key=lambda c: (self.accuracy(c), -c))

    def close(self, cid: int, top: float) -> bool:
        """``top − ω^(i) < C_s`` (``< C_s · top`` when relative), with the rounding allowance."""
        return top - self.accuracy(cid) < self.params.threshold(top) - EPS

    def aligned(self, cid: int, ref: int) -> bool:
        """Weight analysis: the angle between ``Δ^(i)`` and ``Δ^(ref)`` is at most π/2."""
        if not self.params.weight_analysis:
            return True
        if self.cosine_of is not None:
            cos = self.cosine_of(cid, ref)
        else:
            cos = cosine(self.by_id[cid].delta, self.by_id[ref].delta)
        ok = cos is None or cos >= 0.0
        self.wa[cid] = {"reference": ref, "cosine": cos, "passed": ok}
        return ok

    def benign_against(self, cid: int, ref: int) -> bool:
        """Accuracy within C_s of ``ref`` and aligned with it (both always evaluated)."""
        close = self.close(cid, self.accuracy(ref))
        aligned = self.aligned(cid, ref)
        return close and aligned


@dataclass
class _Decision:
    """Outcome of the case analysis of one round (before penalties)."""

    case: int
    branch: str
    alarming: list[int]
    silent: list[int]
    benign: list[int] = field(default_factory=list)
    malicious: list[int] = field(default_factory=list)
    ignored: list[int] = field(default_factory=list)
    reference: dict[str, int | None] = field(
        default_factory=lambda: {"alarming": None, "silent": None}
    )
    max_alarming: float | None = None
    max_silent: float | None = None
    rollback: bool = False


class SirenStrategy:
    """The SIREN server as a stateful round strategy (see the module docstring).

    Parameters
    ----------
    oracle : RootOracle
        Root-set accuracy of flat weight vectors (``accuracy(weights) -> float``).
    num_clients : int
        K, the size of the fleet (sets ``C_p = c_p_fraction · K`` with
        ``penalty_basis="clients"``, unless ``c_p`` is given).
    num_rounds : int
        T, the rounds of the run (sets ``C_p = int(c_p_fraction · T)`` with
        ``penalty_basis="rounds"``, unless ``c_p`` is given).
    **params
        Fields of :class:`SirenParams`.

    Attributes
    ----------
    previous : np.ndarray or None
        ``g_{t−1}``: the last global model the server trusts (None before the first round).
    counts : dict[int, float]
        Penalty count (malicious index) of every client seen or declared.
    banned : set[int]
        Clients whose updates are refused.
    """

    name = "siren"

    def __init__(
        self, oracle: RootOracle, num_clients: int = 0, num_rounds: int = 0, **params: Any
    ) -> None:
        self.oracle = oracle
        self.params = SirenParams.from_kwargs(params)
        if num_clients < 0 or num_rounds < 0:
            raise ValueError(
                f"num_clients and num_rounds must be >= 0, got {num_clients} and {num_rounds}"
            )
        p = self.params
        self.num_clients = num_clients
        self.num_rounds = num_rounds
        if p.c_p is not None:
            self.c_p = float(p.c_p)
        elif p.penalty_basis == "rounds":
            if num_rounds == 0:
                raise ValueError(
                    f"siren profile {p.profile!r} bans after int({p.c_p_fraction}·T) penalties: "
                    "pass num_rounds (T), an explicit c_p, or penalty_basis=clients"
                )
            self.c_p = float(int(p.c_p_fraction * num_rounds))
        else:
            if num_clients == 0:
                raise ValueError(
                    f"siren needs num_clients (K) for C_p = {p.c_p_fraction}·K, or an explicit c_p"
                )
            self.c_p = p.c_p_fraction * num_clients
        self.previous: np.ndarray | None = None
        self.counts: dict[int, float] = {i: 0.0 for i in range(num_clients)}
        self.banned: set[int] = set()
        self.last_round: int | None = None

    # ------------------------------------------------------------------ decision

    def step(
        self,
        round_index: int,
        global_weights: np.ndarray,
        submissions: Sequence[Submission],
        *,
        cosine: Callable[[int, int], float | None] | None = None,
    ) -> StepResult:
        """Run Algorithm 2 for one round; return ``g_{t+1}``, verdicts and the decision record.

        Parameters
        ----------
        round_index : int
            The round t (used for the probe draws and recorded).
        global_weights : np.ndarray
            ``g_t``, the model the boards were sent and their updates are relative to.
        submissions : sequence of Submission
            One per client (duplicate client ids are an error).
        cosine : callable, optional
            ``cosine(i, j)`` of two clients' updates for the weight analysis, in place of
            :func:`cosine` on their vectors (a streaming round reads it from its Gram matrix;
            it must give the same verdicts ``cos >= 0``).

        Returns
        -------
        StepResult
            ``record`` holds: ``case`` (0 = nothing admitted, 1 = no alarm, 3, 4), ``branch``,
            ``alarming`` (S_a), ``silent`` (S_s), ``benign`` (S_b), ``malicious``, ``ignored``,
            ``refused``, ``probed``, ``root_accuracy``, ``max_alarming_accuracy``,
            ``max_silent_accuracy``, ``reference``, ``weight_analysis``, ``alpha``,
            ``rollback``, ``base``, ``penalty_counts``, ``banned``, ``newly_banned``,
            ``rejoined``, ``awarded`` and the thresholds.
        """
        p = self.params
        g_t = np.asarray(global_weights, dtype=np.float32)
        ids = [int(s.client_id) for s in submissions]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate client ids in round {round_index}: {sorted(ids)}")
        by_id = {int(s.client_id): s for s in submissions}
        for cid in ids:
            self.counts.setdefault(cid, 0.0)
        ordered = sorted(ids)
        admitted = [c for c in ordered if c not in self.banned]
        refused = [c for c in ordered if c in self.banned]
        probed = [c for c in refused if p.award and self._probe(round_index, c)]
        view = _RoundView(self.oracle, g_t, by_id, p, cosine)

        d = self._decide(view, admitted)
        base_is_previous = d.rollback and self.previous is not None
        base = self.previous if base_is_previous and self.previous is not None else g_t
        alphas = self._alphas(d.benign, admitted, by_id)
        new_global = self._combine(g_t, base, base_is_previous, alphas, by_id)

        # Probed banned clients: judged against the best benign update of the round.
        awarded: list[int] = []
        probe_malicious: list[int] = []
        probe_reference = view.best(d.benign) if probed and d.benign else None
        if probe_reference is not None:
            for c in probed:
                ok = view.benign_against(c, probe_reference)
                (awarded if ok else probe_malicious).append(c)
        newly_banned, rejoined = self._apply_penalties(d.malicious + probe_malicious, awarded)

        if not d.rollback:
            self.previous = g_t.copy()
        self.last_round = round_index

        verdicts = self._verdicts(
            ordered, d, refused, probed, awarded, probe_malicious, alphas, view.acc
        )
        record: dict[str, Any] = {
            "rule": "siren",
            "round": round_index,
            "case": d.case,
            "branch": d.branch,
            "alarming": d.alarming,
            "silent": d.silent,
            "benign": d.benign,
            "malicious": d.malicious,
            "ignored": d.ignored,
            "refused": refused,
            "probed": probed,
            "probe_reference": probe_reference,
            "awarded": awarded,
            "probe_malicious": probe_malicious,
            "root_accuracy": {str(c): view.acc[c] for c in sorted(view.acc)},
            "max_alarming_accuracy": d.max_alarming,
            "max_silent_accuracy": d.max_silent,
            "reference": d.reference,
            "weight_analysis": {str(c): view.wa[c] for c in sorted(view.wa)},
            "alpha": {str(c): a for c, a in sorted(alphas.items())},
            "rollback": d.rollback,
            "base": "g_{t-1}" if base_is_previous else "g_t",
            "penalty_counts": {str(c): self.counts[c] for c in sorted(self.counts)},
            "banned": sorted(self.banned),
            "newly_banned": newly_banned,
            "rejoined": rejoined,
            "c_s": p.c_s,
            "c_p": self.c_p,
            "c_a": p.c_a,
            "profile": p.profile,
            "server_threshold": p.server_threshold,
            "penalty_basis": p.penalty_basis,
        }
        return StepResult(new_global, verdicts, record)

    def _decide(self, view: _RoundView, admitted: list[int]) -> _Decision:
        """The case analysis of Fig. 3 / Alg. 2 over the admitted clients (module docstring)."""
        p = self.params
        alarming = [c for c in admitted if view.by_id[c].alarm]
        silent = [c for c in admitted if not view.by_id[c].alarm]
        if not admitted:
            return _Decision(0, "nothing-admitted", alarming, silent)
        if not alarming:
            return _Decision(1, "no-alarm", alarming, silent, benign=list(admitted))
        d = _Decision(3, "", alarming, silent)
        r_a = view.best(alarming)
        d.reference["alarming"] = r_a
        d.max_alarming = max_a = view.accuracy(r_a)
        passed = {c: view.benign_against(c, r_a) for c in alarming}
        if not all(passed.values()):
            # Case 4: divergent alarming clients.
            d.case, d.branch, d.rollback = 4, "divergent", True
            d.benign = [c for c in alarming if passed[c]]
            d.malicious = [c for c in alarming if not passed[c]]
            if p.case4_silent == "malicious":
                blamed, d.ignored = _by_staleness(view, silent)
                d.malicious = sorted(d.malicious + blamed)
            else:
                d.ignored = list(silent)
            return d
        # Case 3: similar alarming clients; test the silent ones.
        if silent:
            r_s = view.best(silent)
            d.reference["silent"] = r_s
            d.max_silent = view.accuracy(r_s)
        if d.max_silent is None or max_a - d.max_silent > p.threshold(max_a) + EPS:
            d.branch, d.rollback = "poisoned-global", True
            d.benign = list(alarming)
            d.malicious, d.ignored = _by_staleness(view, silent)
            return d
        d.branch = "false-alarm"
        ref_s = d.reference["silent"]
        assert ref_s is not None  # max_silent is set exactly when the silent reference is
        tested = silent + (alarming if p.false_alarm_check else [])
        # An alarming client re-tested here is compared with the best silent one, not r_a.
        verdict = {c: view.benign_against(c, ref_s) for c in sorted(tested)}
        d.benign = [c for c in sorted(tested) if verdict[c]]
        rejected = [c for c in sorted(tested) if not verdict[c]]
        if not p.false_alarm_check:
            rejected += alarming
        d.malicious = sorted(rejected)
        return d

    def _apply_penalties(
        self, judged_malicious: list[int], awarded: list[int]
    ) -> tuple[list[int], list[int]]:
        """+1 per malicious judgement, −C_a per award; ban above C_p, rejoin below it.

        Returns the newly banned and the rejoined client ids.
        """
        for c in judged_malicious:
            self.counts[c] = self.counts.get(c, 0.0) + 1.0
        for c in awarded:
            self.counts[c] = max(0.0, self.counts[c] - self.params.c_a)
        newly_banned: list[int] = []
        rejoined: list[int] = []
        if self.params.penalty:
            for c in sorted(self.counts):
                if c not in self.banned and self.counts[c] > self.c_p + EPS:
                    self.banned.add(c)
                    newly_banned.append(c)
                elif c in self.banned and self.counts[c] < self.c_p - EPS:
                    self.banned.discard(c)
                    rejoined.append(c)
        return newly_banned, rejoined

    def _probe(self, round_index: int, client_id: int) -> bool:
        """Whether banned ``client_id`` is checked this round (deterministic in seed/round/id)."""
        prob = self.params.probe_probability
        if prob >= 1.0:
            return True
        if prob <= 0.0:
            return False
        draw = np.random.default_rng([self.params.seed, round_index, client_id, 4099]).random()
        return bool(draw < prob)

    def _alphas(
        self, benign: list[int], admitted: list[int], by_id: dict[int, Submission]
    ) -> dict[int, float]:
        """α^(i) for ``i ∈ S_b`` (choice 3 of the module docstring)."""
        if not benign:
            return {}
        mode = self.params.alpha
        if mode == "uniform":
            return {c: 1.0 / len(benign) for c in benign}
        pool = benign if mode == "benign" else admitted
        total = float(sum(max(0, by_id[c].num_samples) for c in pool))
        if total <= 0.0:
            return {c: 0.0 for c in benign}
        return {c: max(0, by_id[c].num_samples) / total for c in benign}

    def _combine(
        self,
        g_t: np.ndarray,
        base: np.ndarray,
        rebased: bool,
        alphas: dict[int, float],
        by_id: dict[int, Submission],
    ) -> np.ndarray:
        """``b + Σ α (g_t + Δ − b)`` (rebase) or ``b + Σ α Δ`` (literal), in float64."""
        step = np.zeros(g_t.shape, dtype=np.float64)
        for c, a in alphas.items():
            if a:
                step += a * np.asarray(by_id[c].delta, dtype=np.float64)
        out = np.asarray(base, dtype=np.float64) + step
        if rebased and self.params.rollback == "rebase":
            out += sum(alphas.values()) * (g_t.astype(np.float64) - base.astype(np.float64))
        return out.astype(np.float32)

    def _verdicts(
        self,
        ordered: list[int],
        d: _Decision,
        refused: list[int],
        probed: list[int],
        awarded: list[int],
        probe_malicious: list[int],
        alphas: dict[int, float],
        acc: dict[int, float],
    ) -> dict[int, dict[str, Any]]:
        """Per-client ``kept`` / ``weight`` / ``score`` (root accuracy) / ``reason``."""
        out: dict[int, dict[str, Any]] = {}
        for c in ordered:
            if c in refused:
                if c in awarded:
                    reason = f"siren: banned, probed and judged benign (award -{self.params.c_a})"
                elif c in probe_malicious:
                    reason = "siren: banned, probed and judged malicious"
                elif c in probed:
                    reason = "siren: banned, probed without a benign reference"
                else:
                    reason = "siren: banned, refused without checking"
            elif c in d.benign:
                reason = f"siren case {d.case}: benign"
            elif c in d.malicious:
                reason = f"siren case {d.case}: judged malicious"
            elif c in d.ignored:
                reason = f"siren case {d.case}: silent client ignored"
            else:
                reason = f"siren case {d.case}: not aggregated"
            out[c] = {
                "kept": bool(alphas.get(c, 0.0) > 0),
                "weight": float(alphas.get(c, 0.0)),
                "score": acc.get(c),
                "reason": reason,
            }
        return out

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state: ``g_{t−1}`` (base64 float32), counts, bans, parameters.

        ``previous_global`` is :func:`encode_vector` output (or None); client ids are string keys.
        """
        return {
            "version": STATE_VERSION,
            "params": asdict(self.params),
            "num_clients": self.num_clients,
            "num_rounds": self.num_rounds,
            "c_p": self.c_p,
            "last_round": self.last_round,
            "previous_global": None if self.previous is None else encode_vector(self.previous),
            "penalty_counts": {str(c): v for c, v in sorted(self.counts.items())},
            "banned": sorted(self.banned),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (parameters stay those of this object).

        Raises
        ------
        ValueError
            Unknown state version or malformed vector.
        """
        version = state.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"siren state version {version!r}, expected {STATE_VERSION}")
        blob = state.get("previous_global")
        self.previous = None if blob is None else decode_vector(blob)
        self.counts = {int(c): float(v) for c, v in state.get("penalty_counts", {}).items()}
        self.banned = {int(c) for c in state.get("banned", [])}
        last = state.get("last_round")
        self.last_round = None if last is None else int(last)
