"""The coordinator service: the round state machine over MQTT, persisted in SQLite.

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
:class:`CoordinatorService` connects it to the broker. Network callbacks only enqueue:
admission, aggregation and evaluation run on the service's own thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from nacl.signing import SigningKey, VerifyKey

from coordinator.audit import AuditEntry, make_entry, round_body
from coordinator.config import ConfigError, CoordinatorConfig
from coordinator.rounds import (
    REFUSALS,
    RuleStrategy,
    StepResult,
    Strategy,
    Submission,
    guarded_step,
    jsonable,
    make_strategy,
)
from coordinator.store import CoordinatorStore, GlobalVersion, StoredUpdate
from models.tf_setup import freeze_startup_objects
from protocol.admission import Admission, AdmissionDecision, AdmissionPolicy
from protocol.envelope import MAX_HEADER_INT, ZERO_SHA256, Kind, decode_message, encode_global
from protocol.errors import (
    FutureRoundError,
    InvalidMessageError,
    Reason,
    TopicError,
    TopicMismatchError,
    WrongKindError,
    WrongRunError,
    brief,
)
from protocol.keys import key_fingerprint
from protocol.layout import TensorLayout, weights_sha256
from protocol.mqtt import make_mqtt_client, wait_for_broker
from protocol.topics import (
    KIND_STATUS,
    KIND_UPDATE,
    global_topic,
    parse_topic,
    status_subscription,
    update_subscription,
)

logger = logging.getLogger(__name__)

QOS = 1

#: Size limit of a status message (it carries no payload: a header of a few hundred bytes).
STATUS_MAX_BYTES = 64 * 1024


@dataclass
class CoordinatorRuntime:
    """What the coordinator computes with.

    Attributes
    ----------
    layout : TensorLayout
        The model's tensor layout.
    initial_weights : ndarray of float32
        ``g_1``.
    strategy : Strategy
        The server rule (aggregator or SIREN).
    evaluate : callable or None
        ``weights -> (loss, accuracy)`` on a test split, or ``None``.
    model_name : str
        Zoo name, for records.
    undefended : Strategy or None
        Plain FedAvg used before ``defense_start_round`` (SIREN §5.9), else ``None``.
    """

    layout: TensorLayout
    initial_weights: np.ndarray
    strategy: Strategy
    evaluate: Callable[[np.ndarray], tuple[float, float]] | None = None
    model_name: str = ""
    undefended: Strategy | None = None


def _needs_oracle(name: str) -> bool:
    if name == "siren":
        return True
    from coordinator.aggregators import get_rule

    return "server_update" in get_rule(name).params


def load_initial_model(path: Any) -> tuple[np.ndarray, TensorLayout]:
    """Read an npz with ``weights`` (float32 vector) and ``layout`` (its JSON text).

    Raises
    ------
    ConfigError
        If the file is missing or inconsistent.
    """
    import json

    try:
        with np.load(path, allow_pickle=False) as data:
            weights = np.asarray(data["weights"], dtype=np.float32)
            layout = TensorLayout.from_json_value(json.loads(str(data["layout"])))
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"cannot read the initial model {path}: {exc}") from None
    if weights.shape != (layout.size,):
        raise ConfigError(
            f"initial model {path}: {weights.shape[0]} weights, the layout needs {layout.size}"
        )
    return weights, layout


def save_initial_model(path: Any, weights: np.ndarray, layout: TensorLayout) -> None:
    """Write the npz read by :func:`load_initial_model`."""
    import json

    np.savez(
        path,
        weights=np.asarray(weights, dtype=np.float32),
        layout=np.array(json.dumps(layout.to_json_value())),
    )


def build_runtime(config: CoordinatorConfig, num_clients: int) -> CoordinatorRuntime:
    """Model, strategy and evaluation per ``config``.

    TensorFlow is imported only when something needs the model: no ``[model] initial`` file,
    a strategy that needs the root set (SIREN, FLTrust), or test-set evaluation. The root set
    with ``data.root = "split"`` is the one the seeded federated split sets aside (as in the
    in-process engine), drawn from the same dataset subset.
    """
    name = config.aggregator.name
    needs_oracle = _needs_oracle(name)
    initial: np.ndarray | None = None
    layout: TensorLayout | None = None
    if config.model.initial is not None:
        initial, layout = load_initial_model(config.model.initial)
    needs_tf = needs_oracle or config.data.evaluate or initial is None
    oracle = None
    evaluate = None
    model_name = config.model.name or ""
    if needs_tf:
        from coordinator.oracle import RootSetOracle
        from models.datasets import load_dataset
        from models.partition import make_federated_split
        from models.tf_setup import seed_everything
        from models.training import TrainConfig, Trainer
        from models.zoo import DEFAULT_MODEL

        seed_everything(config.seed)
        data = config.data
        ds = load_dataset(data.dataset)
        if data.train_samples is not None or data.test_samples is not None:
            ds = ds.subset(data.train_samples, data.test_samples)
        model_name = config.model.name or DEFAULT_MODEL[ds.name]
        train_cfg = TrainConfig(
            epochs=config.training.epochs,
            batch_size=config.training.batch_size,
            learning_rate=config.training.resolved_lr(model_name),
            optimizer=config.training.optimizer,
        )
        trainer = Trainer(model_name, ds.input_shape, ds.num_classes, train_cfg, seed=config.seed)
        trainer_layout = TensorLayout(trainer.layout.as_list())
        if layout is not None and layout != trainer_layout:
            raise ConfigError(
                f"the initial model's layout differs from the layout of model {model_name!r}"
            )
        if initial is None:
            initial, layout = trainer.initial_weights.copy(), trainer_layout
        if data.root == "split":
            split = make_federated_split(
                ds.y_train,
                data.clients,
                data.partition,
                p=data.noniid_p,
                alpha=data.dirichlet_alpha,
                root_size=data.root_size,
                local_test_fraction=data.local_test_fraction,
                seed=data.split_seed,
            )
            oracle = RootSetOracle(
                trainer, ds.x_train[split.root_idx], ds.y_train[split.root_idx], seed=config.seed
            )
        elif data.root == "npz":
            assert data.root_path is not None
            with np.load(data.root_path, allow_pickle=False) as arrays:
                oracle = RootSetOracle(
                    trainer,
                    np.asarray(arrays["x"], dtype=np.float32),
                    np.asarray(arrays["y"], dtype=np.int64),
                    seed=config.seed,
                )
        if data.evaluate:
            x_test, y_test = ds.x_test, ds.y_test

            def evaluate(weights: np.ndarray) -> tuple[float, float]:
                return trainer.evaluate(weights, x_test, y_test)

    if needs_oracle and oracle is not None:
        oracle.warm_up()
    if needs_oracle and oracle is None:
        raise ConfigError(f"aggregator {name!r} needs a root set: set data.root to split or npz")
    assert initial is not None and layout is not None
    params = dict(config.aggregator.params)
    if name == "siren":
        params.setdefault("seed", config.seed)  # seeds SIREN's probes of banned boards
    strategy = make_strategy(
        name,
        params,
        oracle=oracle,
        num_clients=num_clients,
        num_rounds=config.rounds,
        profile=config.aggregator.profile,
        seed=config.seed,
    )
    undefended = None
    if config.defense_start_round > 1:
        undefended = RuleStrategy("fedavg", seed=config.seed)
    if evaluate is None:
        logger.info(
            "test accuracy is not reported: [data] evaluate = false (set it, with the dataset, "
            "to evaluate every global model)"
        )
    return CoordinatorRuntime(layout, initial, strategy, evaluate, model_name, undefended)


def expected_clients(
    config: CoordinatorConfig,
    allow: Mapping[str, VerifyKey],
    revoked: Mapping[str, VerifyKey] | None = None,
) -> dict[str, VerifyKey]:
    """The expected boards in index order with their keys (``clients`` or the allow-list).

    ``revoked``: boards whose key was revoked during the run (:func:`revoked_keys`); they keep
    their place in the run with their old key, which no longer admits anything.

    Raises
    ------
    ConfigError
        If an expected board has no key in the allow-list, or there is no board at all.
    """
    gone = dict(revoked or {})
    clients = list(config.clients) or sorted({*allow, *gone})
    missing = [c for c in clients if c not in allow and c not in gone]
    if missing:
        raise ConfigError(f"expected boards without a key in {config.allow_list}: {missing}")
    if not clients:
        raise ConfigError(f"no boards: {config.allow_list} is empty and coordinator.clients too")
    return {c: allow[c] if c in allow else gone[c] for c in clients}


def revoked_keys(store: CoordinatorStore) -> dict[str, VerifyKey]:
    """The boards whose key an operator revoked in this run, with the revoked key."""
    raw = json.loads(store.get_meta("revoked") or "{}")
    return {str(c): VerifyKey(bytes.fromhex(h)) for c, h in raw.items()}


class _KeyView(Mapping[str, VerifyKey]):
    """The boards' keys without the banned or revoked boards (a live view of both)."""

    def __init__(self, keys: dict[str, VerifyKey], banned: Any) -> None:
        self._keys = keys
        self._banned = banned

    def __getitem__(self, client: str) -> VerifyKey:
        if client in self._banned:
            raise KeyError(client)
        return self._keys[client]

    def __iter__(self) -> Iterator[str]:
        return (c for c in self._keys if c not in self._banned)

    def __len__(self) -> int:
        return sum(1 for c in self._keys if c not in self._banned)


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


class _Union:
    """Membership in any of several live collections (banned ids, revoked keys)."""

    def __init__(self, *parts: Any) -> None:
        self._parts = parts

    def __contains__(self, item: object) -> bool:
        return any(item in part for part in self._parts)


@dataclass
class _Admitted:
    client: str
    index: int
    delta: np.ndarray
    samples: int
    alarm: bool
    nbytes: int
    received_at: float


@dataclass
class RoundState:
    """The open round in memory (mirrors the database)."""

    round: int
    opened_at: float
    glob: GlobalVersion
    admitted: dict[str, _Admitted] = field(default_factory=dict)
    update_bytes: int = 0
    postponed_at: int = -1


class RoundEngine:
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
        self.policy = AdmissionPolicy(
            runtime.layout,
            max_message_bytes=config.max_message_bytes,
            max_samples=config.max_samples,
        )
        self.state: RoundState | None = None
        self.admission: Admission | None = None
        self.finished = False
        self.final: GlobalVersion | None = None
        self.admin_banned: set[str] = set()
        self.revoked: dict[str, VerifyKey] = {}
        self.paused = False
        # Admission looks keys up through this view: a banned or revoked board has no key.
        self.key_view = _KeyView(self.keys, _Union(self.admin_banned, self.revoked))

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
            logger.info("run %s is finished (final model of round %d)", self.config.run, current)
            return self.final.message
        glob = store.global_version(current)
        row = store.round_row(current)
        assert row is not None
        state = RoundState(current, row.opened_at, glob)
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
            state.admitted[upd.client] = _Admitted(
                upd.client,
                upd.client_index,
                upd.delta,
                upd.samples,
                upd.alarm,
                upd.nbytes,
                upd.received_at,
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
                "seen": seen,
                "nonces": nonces,
                "counters": store.decision_counts(),
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

    def expected(self) -> list[str]:
        """The boards a round waits for: the run's boards minus those an operator banned or
        whose key was revoked."""
        return [c for c in self.clients if c not in self.admin_banned and c not in self.revoked]

    def missing(self) -> list[str]:
        """Expected boards without an admitted update in the open round."""
        if self.state is None:
            return []
        return [c for c in self.expected() if c not in self.state.admitted]

    # -- operator actions (the HTTP API's admin endpoints, through ServiceControls) ---------

    def set_paused(self, paused: bool) -> bool:
        """Stop (or resume) closing rounds; updates are still admitted. Returns whether it
        changed. Persisted: a restarted coordinator stays paused."""
        if self.paused == paused:
            return False
        self.paused = paused
        self.store.set_meta("paused", "1" if paused else "0")
        self._audit("operator", action="pause" if paused else "resume", round=self.round)
        logger.warning("closing rounds %s by an operator", "paused" if paused else "resumed")
        return True

    def set_banned(self, client: str, banned: bool) -> bool:
        """Ban (or unban) a board: while banned its signed updates are refused as ``banned``
        and rounds do not wait for it. Returns whether it changed; persisted.

        Raises
        ------
        LookupError
            If ``client`` is not one of the run's boards.
        """
        if client not in self.keys:
            raise LookupError(f"{client!r} is not a board of run {self.config.run!r}")
        if (client in self.admin_banned) == banned:
            return False
        if banned:
            self.admin_banned.add(client)
        else:
            self.admin_banned.discard(client)
        self.store.set_meta("admin_banned", json.dumps(sorted(self.admin_banned)))
        self._audit(
            "operator", action="ban" if banned else "unban", client=client, round=self.round
        )
        logger.warning("board %s %s by an operator", client, "banned" if banned else "unbanned")
        return True

    def register_key(self, client: str, key: VerifyKey) -> bool:
        """Rotate a board's public key, in memory and in the allow-list file.

        Raises
        ------
        ValueError
            If ``client`` is not one of the run's boards (a round's boards are fixed when the
            run starts), or the key already belongs to another board.
        """
        from protocol.errors import AllowListError
        from protocol.keys import AllowList

        if client not in self.keys:
            raise ValueError(
                f"{client!r} is not a board of run {self.config.run!r}; the run's boards are "
                "fixed when it starts"
            )
        readmit = client in self.revoked
        if readmit and bytes(self.revoked[client]) == bytes(key):
            raise ValueError(f"that key of {client!r} was revoked: register a new key")
        if not readmit and bytes(self.keys[client]) == bytes(key):
            return False
        try:
            allow = AllowList.load(self.config.allow_list, missing_ok=True)
            allow.add(client, key, replace=True)
            allow.save(self.config.allow_list)
        except AllowListError as exc:
            raise ValueError(str(exc)) from None
        self.keys[client] = key
        action = "readmit" if readmit else "rotate"
        if readmit:
            del self.revoked[client]
            self._save_revoked()
        self._audit(
            "keys", action=action, client=client, key=key_fingerprint(key), round=self.round
        )
        logger.warning(
            "board %s %s by an operator (key %s)",
            client,
            "re-admitted with a new key" if readmit else "has a new public key",
            key_fingerprint(key)[:16],
        )
        return True

    def revoke_key(self, client: str) -> bool:
        """Revoke a board's key now: it leaves the allow-list, admission has no key for it (its
        signed updates count as ``revoked``), rounds stop waiting for it; persisted and logged.
        Returns whether it changed. Re-admit the board with :meth:`register_key` (a new key).

        Raises
        ------
        LookupError
            If ``client`` is not one of the run's boards.
        """
        from protocol.errors import AllowListError
        from protocol.keys import AllowList

        if client not in self.keys:
            raise LookupError(f"{client!r} is not a board of run {self.config.run!r}")
        if client in self.revoked:
            return False
        try:
            allow = AllowList.load(self.config.allow_list, missing_ok=True)
            if client in allow:
                allow.remove(client)
                allow.save(self.config.allow_list)
        except AllowListError as exc:
            raise ValueError(str(exc)) from None
        self.revoked[client] = self.keys[client]
        self._save_revoked()
        self._audit(
            "keys",
            action="revoke",
            client=client,
            key=key_fingerprint(self.keys[client]),
            round=self.round,
        )
        logger.warning("key of board %s revoked by an operator", client)
        return True

    def _save_revoked(self) -> None:
        self.store.set_meta(
            "revoked", json.dumps({c: bytes(k).hex() for c, k in sorted(self.revoked.items())})
        )

    def handle_update(
        self, payload: bytes, *, topic: str | None = None, received_at: float | None = None
    ) -> AdmissionDecision:
        """Admit (and commit) or count one message of an update topic.

        A message whose exact bytes were already admitted -- in this round or an earlier one --
        is a ``duplicate``; anything else goes through :meth:`Admission.admit`.
        """
        at = self.clock() if received_at is None else received_at
        current = self.round
        digest = hashlib.sha256(payload).hexdigest()
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
            entry = _Admitted(
                client,
                self.index_of[client],
                message.weights,
                message.header.samples,
                message.header.alarm,
                len(payload),
                at,
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
                )
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

        The decoding checks run with every board's key (an operator-banned board still
        announces its status), then: kind ``status`` (``wrong_kind``), the topic, when given, is
        the signer's status topic of the signed run (``topic_mismatch``), the run is this run
        (``wrong_run``), and a status carrying telemetry figures describes a round no later
        than the current one (the run's last once it is finished; ``future_round``), which
        bounds what a board can store to one row per round. A message passing them is
        ``accepted``, sets the board's status and stores its figures for that board and round.
        Every outcome is counted in the store's status counts, apart from the updates'
        admission counts. Statuses carry no freshness rule: a resent status is accepted again
        (it only sets what the dashboard shows).
        """
        current = self.round
        try:
            message = decode_message(payload, self.keys, max_message_bytes=STATUS_MAX_BYTES)
            client = message.client
            if message.kind is not Kind.STATUS:
                raise WrongKindError(
                    f"expected a status, got a {message.kind.value} message", client_id=client
                )
            if topic is not None:
                try:
                    parsed = parse_topic(topic)
                except TopicError as exc:
                    raise TopicMismatchError(str(exc), client_id=client) from None
                if (
                    parsed.kind != KIND_STATUS
                    or parsed.run != message.run
                    or parsed.client != client
                ):
                    raise TopicMismatchError(
                        f"topic {brief(topic)} does not match the signed run {message.run!r} "
                        f"and client {client!r}",
                        client_id=client,
                    )
            if message.run != self.config.run:
                raise WrongRunError(
                    f"status is for run {message.run!r}, current is {self.config.run!r}",
                    client_id=client,
                )
            figures = message.telemetry
            latest = min(current, self.config.rounds)
            if figures and message.round > latest:
                raise FutureRoundError(
                    f"status carries figures of round {message.round}; the latest round of "
                    f"this run so far is {latest}",
                    client_id=client,
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
            telemetry=figures,
        )
        self.store.count_status(current, Reason.ACCEPTED.value)
        return AdmissionDecision(Reason.ACCEPTED, client, status, message=message)

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
        submissions = [Submission(e.index, e.delta, e.samples, e.alarm) for e in entries]
        defended = t >= self.config.defense_start_round or self.runtime.undefended is None
        strategy = self.runtime.strategy if defended else self.runtime.undefended
        assert strategy is not None
        t0 = time.perf_counter()
        failure: str | None = None
        try:
            result = guarded_step(
                strategy,
                t,
                state.glob.weights,
                submissions,
                factor=self.config.aggregator.guard_factor,
                max_abs=self.config.aggregator.guard_max_abs,
            )
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
            )
        sha = weights_sha256(new_global)
        closed_at = self.clock()
        counts = self.store.decision_counts(t)
        record: dict[str, Any] = {
            "round": t,
            "test_accuracy": test_acc,
            "test_loss": test_loss,
            "seconds": closed_at - state.opened_at,
            "server_seconds": aggregate_seconds,
            "selected": [e.index for e in entries],
            "clients": {str(e.index): e.client for e in entries},
            "missing": self.missing(),
            "close_reason": reason,
            "sample_counts": {str(e.index): e.samples for e in entries},
            "alarms": {str(e.index): bool(e.alarm) for e in entries},
            "defense_active": defended,
            "verdicts": {str(k): jsonable(v) for k, v in result.verdicts.items()},
            "decision": jsonable(result.record),
            "failure": failure,
            "global_before": state.glob.sha256,
            "global_after": sha,
            "samples_total": samples,
            "network": {
                "updates": len(entries),
                "update_bytes": state.update_bytes,
                "global_bytes": len(message),
                "duplicates": counts.get(Reason.DUPLICATE.value, 0),
                "rejected": {
                    k: v
                    for k, v in counts.items()
                    if k not in (Reason.ACCEPTED.value, Reason.DUPLICATE.value)
                },
            },
            "timing": {
                "collect_seconds": (max(e.received_at for e in entries) - state.opened_at)
                if entries
                else 0.0,
                "wait_seconds": started - state.opened_at,
                "aggregate_seconds": aggregate_seconds,
                "evaluate_seconds": evaluate_seconds,
            },
        }
        version = GlobalVersion(t + 1, new_global, sha, state.glob.sha256, message, samples)
        self.store.close_round(
            t,
            record=record,
            strategy_state=jsonable(self.runtime.strategy.state_dict()),
            next_global=version,
            finished=final,
            now=closed_at,
            audit=self._audit_entry(
                "round", round_body(record, self.store.update_digests(t)), closed_at
            ),
        )
        if final:
            self.finished = True
            self.final = version
            self.state = None
            self.admission = None
        else:
            self.state = RoundState(t + 1, closed_at, version)
            assert self.admission is not None
            self.admission.start_round(t + 1, sha)
        acc = "" if test_acc is None else f", test accuracy {100 * test_acc:.2f}%"
        logger.info("round %d closed (%s) with %d update(s)%s", t, reason, len(entries), acc)
        return message


@dataclass(frozen=True)
class _Inbound:
    kind: str
    topic: str = ""
    payload: bytes = b""
    mid: int = 0
    qos: int = 0
    received_at: float = 0.0


class CoordinatorService:
    """Runs a :class:`RoundEngine` against the broker.

    Parameters
    ----------
    config : CoordinatorConfig
        Broker settings, resend interval, ``exit_when_done``.
    engine : RoundEngine
        The round logic (already constructed; :meth:`run` starts it).
    """

    def __init__(self, config: CoordinatorConfig, engine: RoundEngine) -> None:
        self.config = config
        self.engine = engine
        self.inbox: queue.Queue[_Inbound] = queue.Queue()
        self.connected = threading.Event()
        self.announcements = 0
        self._client: Any = None
        self._last_info: Any = None
        self._last_progress = 0.0
        self._resend_after = config.resend_interval
        self._commands: queue.Queue[tuple[Callable[[], Any], queue.Queue[Any]]] = queue.Queue()
        self.running = threading.Event()

    def _make_client(self, resumed: bool) -> Any:
        """The paho client. A resumed run reconnects to its broker session (clean start off),
        so updates queued by the broker while the coordinator was down are delivered; a new run
        starts a clean session (nothing left over from an earlier run of the same id) and keeps
        it across reconnects. (MQTT 3.1.1 has no such choice per connection: the session is
        always kept.)"""
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        s = self.config.broker
        v5 = s.protocol == 5
        client = make_mqtt_client(
            s,
            s.username or f"coordinator-{self.config.run}",
            manual_ack=True,
            persistent_session=True,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = lambda c, u: logger.warning(
            "cannot connect to the broker %s:%d; retrying", s.host, s.port
        )
        client.on_message = self._on_message
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = s.session_expiry
            client.connect_async(
                s.host,
                s.port,
                keepalive=s.keepalive,
                clean_start=False if resumed else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                properties=props,
            )
        else:
            client.connect_async(s.host, s.port, keepalive=s.keepalive)
        return client

    # -- paho callbacks: enqueue only --------------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            logger.warning("broker refused the coordinator: %s", reason)
            return
        run = self.config.run
        client.subscribe([(update_subscription(run), QOS), (status_subscription(run), QOS)])
        self.connected.set()
        self.inbox.put(_Inbound("connected"))

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if self.connected.is_set():
            logger.warning("disconnected from the broker (%s); reconnecting", reason)
        self.connected.clear()
        self.inbox.put(_Inbound("disconnected"))

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self.inbox.put(
            _Inbound(
                "message",
                message.topic,
                bytes(message.payload),
                int(message.mid),
                int(message.qos),
                time.time(),
            )
        )

    # -- main loop ---------------------------------------------------------------------------

    def _announce(self, *, new_round: bool = False) -> None:
        self._last_info = self._client.publish(
            global_topic(self.config.run), self.engine.global_message, qos=QOS, retain=True
        )
        self.announcements += 1
        self._last_progress = time.monotonic()
        if new_round:
            self._resend_after = self.config.resend_interval

    def _maybe_reannounce(self) -> None:
        """Re-announce the global model of a round that made no progress for a while.

        Boards that already trained answer with their pending update (a duplicate for those
        that got through), so an update lost anywhere -- in a crashed broker, in a coordinator
        killed before its commit -- is sent again. The wait starts at ``resend_interval``, is
        counted from the last admitted update, and doubles after every re-announcement (up to
        8 times), so slow rounds are not flooded with copies of the model.
        """
        interval = self.config.resend_interval
        missing = self.engine.missing()
        if interval <= 0 or not self.connected.is_set() or not missing:
            return
        if time.monotonic() - self._last_progress < self._resend_after:
            return
        logger.info(
            "round %d: no progress for %.0f s, %d board(s) missing; re-announcing the model",
            self.engine.round,
            self._resend_after,
            len(missing),
        )
        self._announce()
        self._resend_after = min(2 * self._resend_after, 8 * interval)

    def run(self, stop: threading.Event | None = None) -> int:
        """Serve rounds until the run is finished (and ``exit_when_done``) or ``stop`` is set."""
        stop = stop or threading.Event()
        engine = self.engine
        resumed = engine.store.initialized
        engine.start()
        freeze_startup_objects()
        s = self.config.broker
        if not wait_for_broker(
            s, stop, lambda m: logger.error("broker %s:%d: %s", s.host, s.port, m)
        ):
            return 0
        self._client = self._make_client(resumed)
        self._last_progress = time.monotonic()
        self._resend_after = self.config.resend_interval
        self._client.loop_start()
        done_at: float | None = None
        self.running.set()
        try:
            while not stop.is_set():
                try:
                    event = self.inbox.get(timeout=0.1)
                except queue.Empty:
                    event = None
                if event is not None:
                    self._handle_burst(event)
                if engine.finished:
                    if done_at is None:
                        done_at = time.monotonic()
                    if self.config.exit_when_done and self._flushed(done_at):
                        break
                    continue
                self._run_commands()
                reason = None if engine.paused else engine.close_reason()
                if reason is not None and self.connected.is_set():
                    message = engine.close_round(reason=reason)
                    if message is not None:
                        self._announce(new_round=True)
                        continue
                self._maybe_reannounce()
        finally:
            self.running.clear()
            self._run_commands()
            self.connected.clear()  # a disconnect we asked for is not worth a warning
            try:
                self._client.disconnect()
            finally:
                self._client.loop_stop()
        return 0

    def call(self, action: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Run ``action`` on the service's thread (between two messages) and return its result
        or raise its exception.

        Raises
        ------
        TimeoutError
            If the service is not running or did not get to it within ``timeout`` seconds.
        """
        if not self.running.is_set():
            raise TimeoutError("the coordinator service is not running")
        answer: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._commands.put((action, answer))
        try:
            ok, value = answer.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"the coordinator service did not act within {timeout} s") from None
        if not ok:
            raise value
        return value

    def _run_commands(self) -> None:
        while True:
            try:
                action, answer = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                answer.put((True, action()))
            except Exception as exc:
                answer.put((False, exc))

    def _flushed(self, done_at: float) -> bool:
        """The final model was acknowledged by the broker (or 10 s passed)."""
        info = self._last_info
        if info is not None and info.rc == 0 and info.is_published():
            return True
        if (info is None or info.rc != 0) and self.connected.is_set():
            self._announce()  # the last attempt was made while disconnected: publish again
        return time.monotonic() - done_at > 30.0

    def _handle_burst(self, first: _Inbound, limit: int = 256) -> None:
        """Handle ``first`` and the messages queued behind it in one database transaction,
        then acknowledge them: one commit (one fsync) per burst instead of per update."""
        if first.kind != "message":
            self._handle(first)
            return
        burst = [first]
        following: _Inbound | None = None
        while len(burst) < limit:
            try:
                event = self.inbox.get_nowait()
            except queue.Empty:
                break
            if event.kind != "message":
                following = event
                break
            burst.append(event)
        with self.engine.store.transaction():
            for event in burst:
                self._handle(event, ack=False)
        # Acknowledge only after the outcome is committed: an uncommitted update is redelivered.
        for event in burst:
            self._client.ack(event.mid, event.qos)
        if following is not None:
            self._handle(following)

    def _handle(self, event: _Inbound, *, ack: bool = True) -> None:
        if event.kind == "connected":
            logger.info("connected to the broker; announcing round %d", self.engine.round)
            self._announce()
            return
        if event.kind != "message":
            return
        try:
            kind = parse_topic(event.topic).kind
        except ValueError:
            kind = KIND_UPDATE
        if kind == KIND_STATUS:
            self.engine.handle_status(
                event.payload, topic=event.topic, received_at=event.received_at
            )
        else:
            decision = self.engine.handle_update(
                event.payload, topic=event.topic, received_at=event.received_at
            )
            if decision.accepted:
                self._last_progress = time.monotonic()
                self._resend_after = self.config.resend_interval
        if ack:
            self._client.ack(event.mid, event.qos)


class ServiceControls:
    """The admin actions of the HTTP API (``coordinator.api.CoordinatorControls``), applied on
    the running service's thread.

    Parameters
    ----------
    service : CoordinatorService
        The running service.
    timeout : float
        Seconds an action may wait for the service (then ``TimeoutError``).
    """

    def __init__(self, service: CoordinatorService, timeout: float = 5.0) -> None:
        self.service = service
        self.timeout = timeout

    def is_paused(self) -> bool:
        """Whether closing rounds is paused."""
        return self.service.engine.paused

    def admin_banned(self) -> frozenset[str]:
        """Boards banned by an operator."""
        return frozenset(self.service.engine.admin_banned)

    def pause(self) -> bool:
        """Stop closing rounds; ``True`` if it was running."""
        return bool(self.service.call(lambda: self.service.engine.set_paused(True), self.timeout))

    def resume(self) -> bool:
        """Close rounds again; ``True`` if it was paused."""
        return bool(self.service.call(lambda: self.service.engine.set_paused(False), self.timeout))

    def ban(self, client_id: str) -> bool:
        """Refuse the board's updates; ``True`` if it was not banned."""
        engine = self.service.engine
        return bool(self.service.call(lambda: engine.set_banned(client_id, True), self.timeout))

    def unban(self, client_id: str) -> bool:
        """Accept the board's updates again; ``True`` if it was banned."""
        engine = self.service.engine
        return bool(self.service.call(lambda: engine.set_banned(client_id, False), self.timeout))

    def register_key(self, client_id: str, public_key: VerifyKey) -> bool:
        """Rotate a board's public key (or re-admit a revoked board); ``True`` if it changed."""
        engine = self.service.engine
        return bool(
            self.service.call(lambda: engine.register_key(client_id, public_key), self.timeout)
        )

    def revoke(self, client_id: str) -> bool:
        """Revoke the board's key; ``True`` if it was not revoked."""
        engine = self.service.engine
        return bool(self.service.call(lambda: engine.revoke_key(client_id), self.timeout))

    def revoked(self) -> frozenset[str]:
        """Boards whose key is revoked."""
        return frozenset(self.service.engine.revoked)
