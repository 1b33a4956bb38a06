"""The coordinator's round state machine, persisted in SQLite, without network I/O.

Round ``t`` (the global model ``g_t`` that starts it is published retained on
``siren/v1/<run>/global``):

1. **open** -- admit every message on ``siren/v1/<run>/update/+`` with the protocol's rules
   (:class:`protocol.admission.Admission`); each admitted update is committed to SQLite
   before its MQTT acknowledgement is sent (paho ``manual_ack``), so the broker redelivers
   whatever was not committed;
2. **close** -- when every expected board reported, or the round deadline passed with a quorum
   of admitted updates, run the strategy (an aggregation rule or SIREN,
   :func:`coordinator.rounds.make_strategy`) on the updates *in client-index order* (as the
   in-process engine does), evaluate ``g_{t+1}``, and commit, in one transaction, the round's
   record, the strategy state and ``g_{t+1}`` with its signed message;
3. **publish** ``g_{t+1}`` retained; round ``t+1`` is open. After round ``rounds`` the model
   published is the final one and the service exits.

Restarted after any crash, :meth:`RoundEngine.start` reloads the open round (its admitted
updates, the admission state rebuilt from them, the strategy state of the last closed round)
and the service republishes the stored global message byte for byte. Boards that already
trained for the round answer the re-announcement with their identical pending update, which
is counted as a duplicate; a redelivered update of a closed round is recognised by its digest
and also counted as a duplicate. Nothing is lost and nothing is counted twice.

:class:`RoundEngine` holds the logic and has no network I/O (unit-tested directly);
:class:`coordinator.service.CoordinatorService` connects it to the broker. The operator's
actions on a run (pause, ban, key rotation and revocation) are in :mod:`coordinator.controls`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from nacl.signing import SigningKey, VerifyKey

from coordinator.audit import AuditEntry, make_entry, round_body
from coordinator.boards import AnyOf, KeyView, revoked_keys
from coordinator.config import ConfigError, CoordinatorConfig
from coordinator.controls import OperatorActions
from coordinator.round_state import Admitted, RoundState, closed_round_record
from coordinator.rounds import REFUSALS, StepResult, Submission, guarded_step, jsonable
from coordinator.runtime import CoordinatorRuntime
from coordinator.selection import announced_selection, check_selection_fits
from coordinator.status import check_status
from coordinator.store import CoordinatorStore, GlobalVersion, StoredUpdate
from protocol.admission import Admission, AdmissionDecision, AdmissionPolicy
from protocol.envelope import MAX_HEADER_INT, ZERO_SHA256, decode_message, encode_global
from protocol.errors import InvalidMessageError, Reason
from protocol.keys import key_fingerprint
from protocol.layout import weights_sha256

logger = logging.getLogger(__name__)

#: Rejections decided before the sender is authenticated (signature over the header, payload
#: matching the signed hash): their client id is only claimed, so they are not counted against
#: that board.
UNAUTHENTICATED = frozenset(
    {
        Reason.PAYLOAD_TOO_LARGE,
        Reason.MALFORMED,
        Reason.UNSUPPORTED_VERSION,
        Reason.INVALID_HEADER,
        Reason.UNKNOWN_CLIENT,
        Reason.BAD_SIGNATURE,
        Reason.PAYLOAD_LENGTH,
        Reason.PAYLOAD_HASH_MISMATCH,
    }
)


class RoundEngine(OperatorActions):
    """The coordinator's round state machine, without network I/O.

    Parameters
    ----------
    config : CoordinatorConfig
        Settings (run, rounds, deadline, quorum, limits).
    runtime : CoordinatorRuntime
        Layout, initial model, strategy, evaluation.
    store : CoordinatorStore
        The run's database.
    signing_key : SigningKey
        Signs the global models.
    keys : mapping of str to VerifyKey
        The expected boards, in index order, with their public keys.
    clock : callable
        Wall clock (``time.time``).
    """

    def __init__(
        self,
        config: CoordinatorConfig,
        runtime: CoordinatorRuntime,
        store: CoordinatorStore,
        signing_key: SigningKey,
        keys: Mapping[str, VerifyKey],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.store = store
        self.signing_key = signing_key
        self.keys = dict(keys)
        self.clients = list(self.keys)
        self.index_of = {c: i for i, c in enumerate(self.clients)}
        self.clock = clock
        self.sampling = config.sampling
        try:
            check_selection_fits(self.sampling, self.clients)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.policy = AdmissionPolicy(
            runtime.layout,
            max_message_bytes=config.max_message_bytes,
            max_samples=config.max_samples,
            max_staleness=config.staleness_bound if config.mode == "async" else None,
        )
        self.state: RoundState | None = None
        self.admission: Admission | None = None
        self.finished = False
        self.final: GlobalVersion | None = None
        self.admin_banned: set[str] = set()
        self.revoked: dict[str, VerifyKey] = {}
        self.paused = False
        # Admission looks keys up through this view: a banned or revoked board has no key.
        self.key_view = KeyView(self.keys, AnyOf(self.admin_banned, self.revoked))

    # -- start / resume ----------------------------------------------------------------------

    def start(self) -> bytes:
        """Start a new run or resume the stored one; return the global message to publish."""
        layout_fp = self.runtime.layout.fingerprint
        if not self.store.initialized:
            weights = np.asarray(self.runtime.initial_weights, dtype=np.float32)
            message = encode_global(
                run=self.config.run,
                round=1,
                signing_key=self.signing_key,
                weights=weights,
                layout=self.runtime.layout,
                previous_sha256=ZERO_SHA256,
                selected=self.draw(1),
            )
            first = GlobalVersion(1, weights, weights_sha256(weights), ZERO_SHA256, message)
            self.store.initialize(
                run=self.config.run,
                layout_fingerprint=layout_fp,
                config={"clients": self.clients, "rounds": self.config.rounds},
                first=first,
                strategy_state=jsonable(self.runtime.strategy.state_dict()),
                now=self.clock(),
            )
            self._audit(
                "keys",
                action="start",
                round=1,
                global_after=first.sha256,
                keys={c: key_fingerprint(k) for c, k in sorted(self.keys.items())},
                aggregator=self.config.aggregator.name,
            )
            logger.info("run %s started: round 1 of %d", self.config.run, self.config.rounds)
        else:
            self.store.check_identity(self.config.run, layout_fp)
            self._admit_new_boards()
        return self._load()

    def _admit_new_boards(self) -> None:
        """Boards listed after the run's own ones (``siren deploy add-board``) join a resumed
        run from its open round on; the run's boards must keep their place.

        Raises
        ------
        StoreError
            If the configuration drops or reorders a board of the run.
        """
        from coordinator.store import StoreError

        stored = json.loads(self.store.get_meta("config") or "{}")
        before = [str(c) for c in stored.get("clients", [])]
        if not before or before == self.clients:
            return
        if self.clients[: len(before)] != before:
            raise StoreError(
                f"the run's boards are {before}, in this order; the configuration lists "
                f"{self.clients}: a run's boards keep their place, new boards come after them"
            )
        new = self.clients[len(before) :]
        stored["clients"] = self.clients
        self.store.set_meta("config", json.dumps(stored))
        self._audit(
            "keys",
            action="join",
            round=self.store.current_round,
            keys={c: key_fingerprint(self.keys[c]) for c in new},
        )
        logger.warning("boards %s join run %s", ", ".join(new), self.config.run)

    def _load(self) -> bytes:
        store = self.store
        current = store.current_round
        self.admin_banned.clear()
        self.admin_banned.update(json.loads(store.get_meta("admin_banned") or "[]"))
        self.revoked.clear()
        self.revoked.update(revoked_keys(store))
        for client, key in self.revoked.items():
            if client in self.keys:
                self.keys[client] = key
        self.paused = store.get_meta("paused") == "1"
        saved = store.latest_strategy_state()
        if saved is not None:
            self.runtime.strategy.load_state_dict(saved)
        if store.finished:
            self.finished = True
            self.final = store.global_version(current)
            self.state = None
            logger.info(
                "run %s is finished: %d round(s) closed, serving the final global model",
                self.config.run,
                current - 1,
            )
            return self.final.message
        glob = store.global_version(current)
        row = store.round_row(current)
        assert row is not None
        state = RoundState(current, row.opened_at, glob, selected=announced_selection(glob.message))
        seen: dict[str, str] = {}
        nonces: list[str] = []
        for upd in store.updates(current):
            problem = self._stored_update_problem(upd)
            if problem is not None:
                logger.error(
                    "round %d: the stored update of %s breaks the admission rules (%s); "
                    "quarantined",
                    current,
                    upd.client,
                    problem,
                )
                store.quarantine(current, upd.client, problem)
                continue
            assert upd.delta is not None
            state.admitted[upd.client] = Admitted(
                upd.client,
                upd.client_index,
                upd.delta,
                upd.samples,
                upd.alarm,
                upd.nbytes,
                upd.received_at,
                upd.trained_on,
            )
            state.update_bytes += upd.nbytes
            seen[upd.client] = upd.message_id
            nonces.append(upd.nonce)
        self.state = state
        self.admission = Admission.from_state_dict(
            {
                "format": "siren-admission-state",
                "version": 1,
                "run": self.config.run,
                "round": current,
                "base_sha256": glob.sha256,
                "layout_sha256": self.runtime.layout.fingerprint,
                "selected": None if state.selected is None else list(state.selected),
                "seen": seen,
                "nonces": nonces,
                "counters": store.decision_counts(),
                **self._admission_window(current, glob.sha256),
            },
            keys=self.key_view,
            policy=self.policy,
        )
        if state.admitted:
            logger.info(
                "resumed round %d with %d admitted update(s): %s",
                current,
                len(state.admitted),
                ", ".join(sorted(state.admitted)),
            )
        return glob.message

    def _audit_entry(self, kind: str, body: dict[str, Any], at: float) -> AuditEntry:
        """The next signed audit record (see :mod:`coordinator.audit`)."""
        seq, prev = self.store.audit_head()
        return make_entry(
            self.signing_key,
            seq=seq,
            prev=prev,
            run=self.config.run,
            kind=kind,
            at_ms=int(at * 1000),
            body=body,
        )

    def _audit(self, kind: str, **body: Any) -> None:
        """Append an operator or key-change record to the audit log now."""
        self.store.append_audit(self._audit_entry(kind, body, self.clock()))

    def _stored_update_problem(self, upd: StoredUpdate) -> str | None:
        """Why a stored update of the open round would not be admitted today, or None.

        A store written under looser rules (an older version, or a larger ``max_samples``) may
        hold an update that poisons every close of its round; it is quarantined on start.
        """
        if upd.client not in self.index_of:
            return f"{upd.client!r} is not a board of this run"
        low, high = self.policy.min_samples, self.policy.sample_limit
        if not low <= upd.samples <= high:
            return f"sample count {upd.samples} is not in [{low}, {high}]"
        if upd.delta is None or upd.delta.size != self.runtime.layout.size:
            return "its update does not have the model's layout"
        if not np.isfinite(upd.delta).all():
            return "its update holds non-finite values"
        return None

    # -- messages ----------------------------------------------------------------------------

    @property
    def round(self) -> int:
        """The open round (``rounds + 1`` once finished)."""
        if self.state is not None:
            return self.state.round
        assert self.final is not None
        return self.final.round

    @property
    def global_message(self) -> bytes:
        """The signed global message of the open round (or the final one)."""
        if self.state is not None:
            return self.state.glob.message
        assert self.final is not None
        return self.final.message

    def draw(self, round_index: int) -> list[str] | None:
        """The client ids drawn for ``round_index`` (client sampling), ``None`` without it."""
        if not self.sampling.active:
            return None
        drawn = self.sampling.select(len(self.clients), round_index, self.config.seed)
        return [self.clients[i] for i in drawn]

    def expected(self) -> list[str]:
        """The boards a round waits for: all (or those drawn) but banned, revoked or dropped."""
        selected = self.state.selected if self.state is not None else None
        boards = self.clients if selected is None else [c for c in self.clients if c in selected]
        skip = {*self.admin_banned, *self.revoked, *(self.state.dropped if self.state else ())}
        return [c for c in boards if c not in skip]

    def missing(self) -> list[str]:
        """Expected boards without an admitted update in the open round."""
        if self.state is None:
            return []
        return [c for c in self.expected() if c not in self.state.admitted]

    def handle_update(
        self, payload: bytes, *, topic: str | None = None, received_at: float | None = None
    ) -> AdmissionDecision:
        """Admit (and commit) or count one message of an update topic.

        A message whose exact bytes were already admitted -- in this round or an earlier one --
        is a ``duplicate``; anything else goes through :meth:`Admission.admit`.
        """
        at = self.clock() if received_at is None else received_at
        current = self.round
        digest = self._digest(payload)
        if self.store.digest_round(digest) is not None:
            self.store.count(current, Reason.DUPLICATE.value)
            return AdmissionDecision(
                Reason.DUPLICATE, None, "identical resend of an admitted update"
            )
        if self.state is None or self.admission is None:
            self.store.count(
                current, Reason.STALE_ROUND.value, detail="the run is finished", log=True, at=at
            )
            return AdmissionDecision(Reason.STALE_ROUND, None, "the run is finished")
        decision = self.admission.admit(payload, topic=topic)
        if decision.accepted:
            message = decision.message
            assert message is not None and message.weights is not None
            client = message.client
            entry = Admitted(
                client,
                self.index_of[client],
                message.weights,
                message.header.samples,
                message.header.alarm,
                len(payload),
                at,
                message.round,
            )
            self.store.admit(
                StoredUpdate(
                    round=current,
                    client=client,
                    client_index=entry.index,
                    message_id=message.message_id,
                    digest=digest,
                    nonce=message.header.nonce,
                    samples=entry.samples,
                    alarm=entry.alarm,
                    nbytes=entry.nbytes,
                    received_at=at,
                    delta=entry.delta,
                    base_round=message.round,
                ),
                decision.reason.value,
            )
            self.state.admitted[client] = entry
            self.state.update_bytes += len(payload)
        elif decision.reason is Reason.DUPLICATE:
            self.store.count(current, Reason.DUPLICATE.value)
        else:
            if decision.reason is Reason.UNKNOWN_CLIENT and self._signed_by_banned(
                payload, decision.client_id
            ):
                revoked = decision.client_id in self.revoked
                decision = AdmissionDecision(
                    Reason.REVOKED if revoked else Reason.BANNED,
                    decision.client_id,
                    f"board {decision.client_id!r} "
                    + ("has a revoked key" if revoked else "is banned by an operator"),
                )
            # A message is the board's own only once its signature verified and its payload is
            # the one signed; before that, the client id is merely claimed (anyone can write
            # any name into a header) and is not credited to that board.
            authenticated = decision.reason not in UNAUTHENTICATED
            claimed = decision.client_id
            self.store.count(
                current,
                decision.reason.value,
                client=claimed if authenticated else None,
                detail=decision.detail
                if authenticated or claimed is None
                else f"claims to be {claimed!r}: {decision.detail}",
                log=True,
                at=at,
            )
        return decision

    def _digest(self, payload: bytes) -> str:
        """SHA-256 of a whole message: what a resent copy is recognised by."""
        return hashlib.sha256(payload).hexdigest()

    def _signed_by_banned(self, payload: bytes, client: str | None) -> bool:
        """Whether ``payload`` is a valid message signed by ``client``, an operator-banned board.

        Admission sees no key for a banned board (``unknown_client``); only a message that
        verifies against the board's own key is counted as ``banned``, so a stranger naming a
        banned board stays ``unknown_client``.
        """
        if client is None or client not in self.keys:
            return False
        if client not in self.admin_banned and client not in self.revoked:
            return False
        assert self.admission is not None
        try:
            decode_message(
                payload,
                {client: self.keys[client]},
                max_message_bytes=self.admission.policy.size_limit,
            )
        except InvalidMessageError:
            return False
        return True

    def handle_status(
        self, payload: bytes, *, topic: str | None = None, received_at: float | None = None
    ) -> AdmissionDecision:
        """Verify, count and record one message of a status topic (docs/protocol.md 8.8).

        The checks are :func:`coordinator.status.check_status`'s, with every board's key (an
        operator-banned board still announces its status) and the current round as the latest
        one figures may describe (the run's last once it is finished). A message passing them
        is ``accepted``, sets the board's status and stores its figures for that board and
        round. Every outcome is counted in the store's status counts, apart from the updates'
        admission counts. Statuses carry no freshness rule: a resent status is accepted again
        (it only sets what the dashboard shows).
        """
        current = self.round
        try:
            message = check_status(
                payload,
                self.keys,
                run=self.config.run,
                latest_round=min(current, self.config.rounds),
                topic=topic,
            )
        except InvalidMessageError as exc:
            self.store.count_status(current, exc.reason.value)
            logger.debug("ignored a status message: %s: %s", exc.reason.value, exc)
            return AdmissionDecision(exc.reason, exc.client_id, str(exc))
        status = message.header.status
        self.store.set_status(
            message.client,
            status,
            message.round,
            self.clock() if received_at is None else received_at,
            telemetry=message.telemetry,
        )
        self.store.count_status(current, Reason.ACCEPTED.value)
        return AdmissionDecision(Reason.ACCEPTED, message.client, status, message=message)

    # -- closing -----------------------------------------------------------------------------

    def close_reason(self, now: float | None = None) -> str | None:
        """``"all"`` when every expected board reported, ``"deadline"`` when the deadline passed
        with a quorum, else ``None``."""
        state = self.state
        if state is None:
            return None
        count = len(state.admitted)
        expected = self.expected()
        if count and all(c in state.admitted for c in expected):
            return "all"
        timeout = self.config.round_timeout
        at = self.clock() if now is None else now
        if (
            timeout > 0
            and at - state.opened_at >= timeout
            and count >= self.config.quorum_count(len(expected))
            and count != state.postponed_at
        ):
            return "deadline"
        return None

    def _aggregate(
        self, strategy: Any, t: int, weights: np.ndarray, entries: list[Admitted]
    ) -> StepResult:
        """The round's step: the strategy behind the global-model guard, in board order."""
        submissions = [Submission(e.index, e.delta, e.samples, e.alarm) for e in entries]
        guard = self.config.aggregator
        return guarded_step(
            strategy,
            t,
            weights,
            submissions,
            factor=guard.guard_factor,
            max_abs=guard.guard_max_abs,
        )

    def _kept_rounds(self) -> int:
        """Closed rounds whose update vectors stay stored (0: none)."""
        return 0

    def _admission_window(self, current: int, base: str) -> dict[str, Any]:
        """Extra admission state to restore (buffered asynchronous mode: the window of recent
        versions; :class:`coordinator.async_engine.AsyncRoundEngine`)."""
        return {}

    def close_round(self, now: float | None = None, reason: str = "all") -> bytes | None:
        """Aggregate the open round, commit it with ``g_{t+1}``, and return ``g_{t+1}``'s message.

        Returns ``None`` when the strategy refuses the round's updates while boards are still
        missing (e.g. too few for a Byzantine bound): the round stays open for more updates.
        Otherwise the round always closes: the global-model guard
        (:func:`coordinator.rounds.guarded_step`) re-aggregates without outsized updates or keeps
        ``g_t``, and a strategy that fails with every board reported, or a model that cannot be
        encoded, closes the round with ``g_t`` and the failure in the round's record.
        """
        state = self.state
        assert state is not None
        t = state.round
        started = self.clock() if now is None else now
        entries = sorted(state.admitted.values(), key=lambda e: e.index)
        defended = t >= self.config.defense_start_round or self.runtime.undefended is None
        strategy = self.runtime.strategy if defended else self.runtime.undefended
        assert strategy is not None
        t0 = time.perf_counter()
        failure: str | None = None
        try:
            result = self._aggregate(strategy, t, state.glob.weights, entries)
        except Exception as exc:
            saved = self.store.latest_strategy_state()
            if saved is not None:
                self.runtime.strategy.load_state_dict(saved)
            if isinstance(exc, REFUSALS) and self.missing():
                logger.warning(
                    "round %d: the strategy refused %d update(s) (%s); waiting for more",
                    t,
                    len(entries),
                    exc,
                )
                state.postponed_at = len(entries)
                return None
            # Every expected board reported and the round still cannot be aggregated (a bound
            # the configuration cannot meet, or a defect): close it without moving the model,
            # record why, and keep serving. Crashing here would crash again on every restart.
            failure = f"{type(exc).__name__}: {exc}"
            logger.error("round %d: aggregation failed (%s); the global model is kept", t, failure)
            result = StepResult(
                np.asarray(state.glob.weights, dtype=np.float32).copy(),
                {
                    e.index: {
                        "kept": False,
                        "weight": 0.0,
                        "score": None,
                        "reason": "the round failed; the global model was kept",
                    }
                    for e in entries
                },
                {"failure": failure},
            )
        aggregate_seconds = time.perf_counter() - t0
        new_global = np.asarray(result.new_global, dtype=np.float32)
        guard = result.record.get("guard")
        if guard is not None:
            logger.warning(
                "round %d: global-model guard: %s (%s)", t, guard["problem"], guard["action"]
            )
        test_loss = test_acc = None
        evaluate_seconds = 0.0
        if self.runtime.evaluate is not None:
            t1 = time.perf_counter()
            try:
                test_loss, test_acc = self.runtime.evaluate(new_global)
            except Exception:
                logger.exception("round %d: evaluating the new global model failed", t)
            evaluate_seconds = time.perf_counter() - t1
        final = t >= self.config.rounds
        following = None if final else self.draw(t + 1)
        # The header's sample total saturates (admission bounds each count, so it never should).
        samples = min(int(sum(e.samples for e in entries)), MAX_HEADER_INT)
        try:
            message = encode_global(
                run=self.config.run,
                round=t + 1,
                signing_key=self.signing_key,
                weights=new_global,
                layout=self.runtime.layout,
                previous_sha256=state.glob.sha256,
                samples=samples,
                selected=following,
            )
        except Exception as exc:
            failure = f"encoding the new global model failed: {type(exc).__name__}: {exc}"
            logger.error("round %d: %s; the global model is kept", t, failure)
            new_global = np.asarray(state.glob.weights, dtype=np.float32).copy()
            samples = 0
            message = encode_global(
                run=self.config.run,
                round=t + 1,
                signing_key=self.signing_key,
                weights=new_global,
                layout=self.runtime.layout,
                previous_sha256=state.glob.sha256,
                selected=following,
            )
        sha = weights_sha256(new_global)
        closed_at = self.clock()
        record = closed_round_record(
            state,
            entries,
            result,
            index_of=self.index_of,
            missing=self.missing(),
            reason=reason,
            defended=defended,
            failure=failure,
            evaluation=(test_loss, test_acc),
            global_after=sha,
            samples=samples,
            global_bytes=len(message),
            counts=self.store.decision_counts(t),
            times={
                "started": started,
                "closed": closed_at,
                "aggregate": aggregate_seconds,
                "evaluate": evaluate_seconds,
            },
        )
        version = GlobalVersion(t + 1, new_global, sha, state.glob.sha256, message, samples)
        self.store.close_round(
            t,
            record=record,
            strategy_state=jsonable(self.runtime.strategy.state_dict()),
            next_global=version,
            finished=final,
            now=closed_at,
            audit=self._audit_entry(
                "round", round_body(record, self.store.update_digests(t), state.selected), closed_at
            ),
            keep_vectors=self._kept_rounds(),
        )
        if final:
            self.finished = True
            self.final = version
            self.state = None
            self.admission = None
        else:
            selected = None if following is None else tuple(sorted(following))
            self.state = RoundState(t + 1, closed_at, version, selected=selected)
            assert self.admission is not None
            self.admission.start_round(t + 1, sha, following)
        acc = "" if test_acc is None else f", test accuracy {100 * test_acc:.2f}%"
        logger.info("round %d closed (%s) with %d update(s)%s", t, reason, len(entries), acc)
        return message
