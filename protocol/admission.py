"""Coordinator-side admission of board updates.

:class:`Admission` holds the state of the current round (run, round, hash of the current global
model, which client sent which update, nonces seen) and decides for every received message,
before anything reaches an aggregator. :meth:`Admission.admit` never raises for bad input: it
returns an :class:`AdmissionDecision` whose :class:`~protocol.errors.Reason` is counted and logged.

Rules, checked in this order (the first failure is the reason):

1. the whole message is within the size limit                          ``payload_too_large``
2. it decodes: framing, canonical header, valid fields                 ``malformed``,
   ``unsupported_version``, ``invalid_header``
3. the client id has a registered key, and the signature verifies      ``unknown_client``,
   ``bad_signature``
4. the payload has the signed length and hash, every value is finite   ``payload_length``,
   ``payload_hash_mismatch``, ``non_finite``
5. it is an update                                                     ``wrong_kind``
6. the topic (when given) is this run's update topic of that client    ``topic_mismatch``
7. current run                                                         ``wrong_run``
8. current round                                                       ``stale_round``,
   ``future_round``
9. base model = current global model                                   ``wrong_base_model``
9a. the round's selection, when it has one, names the client            ``not_selected``
10. layout = the model's layout                                        ``layout_mismatch``
11. sample count within [min_samples, max_samples]                     ``bad_sample_count``
12. optional: timestamp within max_clock_skew_ms of the local clock    ``clock_skew``
13. first update of this client this round; an identical resend is ``duplicate`` (not an
    error, not admitted twice), a different one is                     ``conflicting_update``
14. nonce not used by another message this round                       ``replayed_nonce``

**Buffered asynchronous mode** (``AdmissionPolicy.max_staleness = S``, ``docs/protocol.md``
8.9): the "round" is the open buffer of global version ``v``. Rule 8 admits an update trained
on any version ``r`` with ``v − S ≤ r ≤ v`` (older: ``too_stale``; newer: ``future_round``) and
rule 9 compares its base model with version ``r``'s hash; an update with ``r < v`` is admitted
as ``stale`` (``ADMITTED`` outcomes: ``accepted``, ``stale``). Rule 13 allows one update per
client in the open buffer (another one: ``buffered``) and one per client and base version
(``conflicting_update``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.envelope import (
    MAX_HEADER_BYTES,
    MAX_HEADER_INT,
    PREFIX_BYTES,
    SIGNATURE_BYTES,
    ZERO_SHA256,
    KeySource,
    Kind,
    Message,
    decode_message,
    now_ms,
)
from protocol.errors import (
    ADMITTED,
    AdmissionStateError,
    BufferedError,
    ClockSkewError,
    ConflictingUpdateError,
    FutureRoundError,
    InvalidMessageError,
    LayoutMismatchError,
    NotSelectedError,
    PayloadTooLargeError,
    Reason,
    ReplayedNonceError,
    SampleCountError,
    StaleRoundError,
    TooStaleError,
    TopicError,
    TopicMismatchError,
    WrongBaseModelError,
    WrongKindError,
    WrongRunError,
    brief,
)
from protocol.layout import TensorLayout
from protocol.topics import KIND_UPDATE, is_valid_id, parse_topic

logger = logging.getLogger(__name__)

#: Default size limit, in multiples of the model's payload size (plus room for the header).
DEFAULT_SIZE_FACTOR = 4

#: Default largest sample count of one update (one billion: far above any board's data set, and
#: small enough that the sum over a million boards stays exactly representable in a header).
DEFAULT_MAX_SAMPLES = 1_000_000_000

#: Format tag and version of the saved admission state.
STATE_FORMAT = "siren-admission-state"
STATE_VERSION = 1

_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class AdmissionPolicy:
    """Configuration of the admission rules.

    Attributes
    ----------
    layout : TensorLayout
        The model's tensor layout; every update must carry exactly this layout.
    max_message_bytes : int, optional
        Size limit of a whole message. Default: ``DEFAULT_SIZE_FACTOR`` (4) times the model's
        payload size plus 256 KiB for the header (≈3.9 MB for the 225,034-parameter SIREN CNN).
    min_samples : int
        Smallest admitted sample count (default 1: an update trained on nothing is refused).
    max_samples : int, optional
        Largest admitted sample count; bounds the weight attack (a board lying about its
        dataset size to gain weight in sample-weighted averaging). Default (None):
        :data:`DEFAULT_MAX_SAMPLES`; at most :data:`~protocol.envelope.MAX_HEADER_INT`.
    max_clock_skew_ms : int, optional
        When set, refuse updates whose signed timestamp differs from the coordinator's clock by
        more than this. Off by default: boards' clocks are not trusted to be synchronised.
    max_staleness : int, optional
        ``None`` (default): synchronous rounds, an update must be for the current round.
        ``S >= 0``: buffered asynchronous mode (module docstring).
    """

    layout: TensorLayout
    max_message_bytes: int | None = None
    min_samples: int = 1
    max_samples: int | None = None
    max_clock_skew_ms: int | None = None
    max_staleness: int | None = None

    def __post_init__(self) -> None:
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")
        if not isinstance(self.layout, TensorLayout) or self.layout.size == 0:
            raise ValueError("AdmissionPolicy.layout must be a non-empty TensorLayout")
        if self.max_message_bytes is not None and self.max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be positive, got {self.max_message_bytes}")
        if self.min_samples < 0:
            raise ValueError(f"min_samples must be >= 0, got {self.min_samples}")
        if self.sample_limit < self.min_samples:
            raise ValueError(
                f"max_samples ({self.sample_limit}) is below min_samples ({self.min_samples})"
            )
        if self.sample_limit > MAX_HEADER_INT:
            raise ValueError(
                f"max_samples ({self.sample_limit}) is above the protocol's limit {MAX_HEADER_INT}"
            )
        if self.max_clock_skew_ms is not None and self.max_clock_skew_ms < 0:
            raise ValueError(f"max_clock_skew_ms must be >= 0, got {self.max_clock_skew_ms}")

    @property
    def sample_limit(self) -> int:
        """The effective largest admitted sample count."""
        return DEFAULT_MAX_SAMPLES if self.max_samples is None else self.max_samples

    @property
    def size_limit(self) -> int:
        """The effective message size limit in bytes."""
        if self.max_message_bytes is not None:
            return self.max_message_bytes
        return (
            DEFAULT_SIZE_FACTOR * self.layout.nbytes
            + PREFIX_BYTES
            + MAX_HEADER_BYTES
            + SIGNATURE_BYTES
        )


@dataclass(frozen=True)
class AdmissionDecision:
    """Outcome of :meth:`Admission.admit`.

    Attributes
    ----------
    reason : Reason
        ``ACCEPTED``, ``DUPLICATE``, or the rejection reason.
    client_id : str or None
        Client id from the header when it could be read (authenticated only from reason
        ``payload_length`` on, i.e. after the signature check).
    detail : str
        Human-readable explanation.
    message : Message or None
        The verified update, only when accepted: the one thing to pass on to aggregation.
    """

    reason: Reason
    client_id: str | None
    detail: str
    message: Message | None = None

    @property
    def accepted(self) -> bool:
        """Whether the update is new and admitted for aggregation (``accepted`` or, in
        buffered asynchronous mode, ``stale``)."""
        return self.reason in ADMITTED

    @property
    def rejected(self) -> bool:
        """Whether the message was refused (a duplicate is neither accepted nor rejected)."""
        return self.reason not in ADMITTED and self.reason is not Reason.DUPLICATE


class Admission:
    """Stateful per-round gatekeeper of updates on the coordinator.

    Parameters
    ----------
    run : str
        Current run id.
    keys : KeySource
        Board public keys, normally an :class:`~protocol.keys.AllowList` (consulted on every
        message, so keys added later count).
    policy : AdmissionPolicy
        Layout and limits.
    round : int
        Current round.
    base_sha256 : str
        Model hash of the current global model (``weights_sha256`` of it, equivalently the
        ``payload_sha256`` of the published global message).
    selected : collection of str, optional
        The boards drawn for the current round (client sampling: the ``selected`` of the
        global message); ``None``: every board may send an update.
    clock : callable, optional
        Returns the current Unix time in ms; used only for the optional skew check.

    Notes
    -----
    Not thread-safe: call it from one thread (the coordinator's round loop), never from the
    MQTT client's network thread.
    """

    def __init__(
        self,
        *,
        run: str,
        keys: KeySource,
        policy: AdmissionPolicy,
        round: int = 0,
        base_sha256: str = ZERO_SHA256,
        selected: Collection[str] | None = None,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        if not is_valid_id(run):
            raise ValueError(f"invalid run id {run!r}")
        self._check_round(round, base_sha256)
        self.run = run
        self.keys = keys
        self.policy = policy
        self.clock = clock
        self._round = round
        self._base = base_sha256
        self._selected = None if selected is None else frozenset(selected)
        self._bases: dict[int, str] = {round: base_sha256}
        self._based: set[tuple[str, int]] = set()
        self._seen: dict[str, str] = {}
        self._nonces: set[str] = set()
        self._counters: Counter[Reason] = Counter()

    @staticmethod
    def _check_round(round: int, base_sha256: str) -> None:
        if type(round) is not int or round < 0:
            raise ValueError(f"round must be a non-negative int, got {round!r}")
        if not isinstance(base_sha256, str) or _HEX64.fullmatch(base_sha256) is None:
            raise ValueError(f"base_sha256 must be 64 lower-case hex digits, got {base_sha256!r}")

    @property
    def round(self) -> int:
        """Current round."""
        return self._round

    @property
    def base_sha256(self) -> str:
        """Model hash of the current global model."""
        return self._base

    @property
    def selected(self) -> frozenset[str] | None:
        """The boards drawn for the current round (``None``: every board)."""
        return self._selected

    @property
    def accepted_clients(self) -> frozenset[str]:
        """Clients with an admitted update in the current round."""
        return frozenset(self._seen)

    @property
    def counters(self) -> dict[Reason, int]:
        """Number of decisions per reason since creation (persisted with the state)."""
        return dict(self._counters)

    def _decode(self, data: bytes | bytearray | memoryview, limit: int) -> Message:
        """Rules 2-4: parse and verify ``data`` (:func:`~protocol.envelope.decode_message`).

        A subclass may accept messages decoded and verified elsewhere (a coordinator's
        admission processes) here; the rules from 5 on are the same for every message.
        """
        return decode_message(data, self.keys, max_message_bytes=limit)

    def start_round(
        self, round: int, base_sha256: str, selected: Collection[str] | None = None
    ) -> None:
        """Move to a new round whose updates must be based on ``base_sha256``.

        Forgets which clients sent updates (each may send one again) and the nonces.
        ``selected``: the boards drawn for the new round (``None``: every board).

        Raises
        ------
        ValueError
            If ``round`` is not greater than the current round or the hash is malformed.
        """
        self._check_round(round, base_sha256)
        if round <= self._round:
            raise ValueError(f"new round {round} must be greater than the current {self._round}")
        self._round = round
        self._base = base_sha256
        self._selected = None if selected is None else frozenset(selected)
        self._bases[round] = base_sha256
        oldest = round - (self.policy.max_staleness or 0)
        self._bases = {r: h for r, h in self._bases.items() if r >= oldest}
        self._based = {(c, r) for c, r in self._based if r >= oldest}
        self._seen.clear()
        self._nonces.clear()

    def admit(
        self, data: bytes | bytearray | memoryview, *, topic: str | None = None
    ) -> AdmissionDecision:
        """Decide on one received message; never raises for any ``data`` or ``topic``.

        Parameters
        ----------
        data : bytes-like
            The raw message.
        topic : str, optional
            MQTT topic it arrived on; when given it must be this run's update topic of the
            signing client.

        Returns
        -------
        AdmissionDecision
            ``accepted`` carries the verified message; anything else must not be aggregated.
            Cost: one SHA-256 pass over the payload, one finite check, one copy and one
            signature verification.
        """
        try:
            message, duplicate = self._check(data, topic)
        except InvalidMessageError as exc:
            decision = AdmissionDecision(exc.reason, exc.client_id, str(exc))
        else:
            if duplicate:
                decision = AdmissionDecision(
                    Reason.DUPLICATE, message.client, "identical resend of the admitted update"
                )
            else:
                self._seen[message.client] = message.message_id
                self._nonces.add(message.header.nonce)
                stale = message.round < self._round
                if self.policy.max_staleness is not None:
                    self._based.add((message.client, message.round))
                decision = AdmissionDecision(
                    Reason.STALE if stale else Reason.ACCEPTED,
                    message.client,
                    f"admitted, {self._round - message.round} version(s) stale"
                    if stale
                    else "admitted",
                    message=message,
                )
        self._counters[decision.reason] += 1
        self._log(decision, topic)
        return decision

    def _check(
        self, data: bytes | bytearray | memoryview, topic: str | None
    ) -> tuple[Message, bool]:
        """Run every rule; return the message and whether it is a duplicate, else raise."""
        limit = self.policy.size_limit
        try:
            length = len(data)
        except TypeError:
            length = 0
        if length > limit:
            raise PayloadTooLargeError(f"message is {length} bytes, more than the limit of {limit}")
        message = self._decode(data, limit)
        header = message.header
        client = header.client

        def fail(error: type[InvalidMessageError], text: str) -> InvalidMessageError:
            return error(text, client_id=client)

        if header.kind is not Kind.UPDATE:
            raise fail(WrongKindError, f"expected an update, got a {header.kind.value} message")
        if topic is not None:
            try:
                parsed = parse_topic(topic)
            except TopicError as exc:
                raise fail(TopicMismatchError, str(exc)) from None
            if parsed.kind != KIND_UPDATE or parsed.run != header.run or parsed.client != client:
                raise fail(
                    TopicMismatchError,
                    f"topic {brief(topic)} does not match the signed run {header.run!r} and "
                    f"client {client!r}",
                )
        if header.run != self.run:
            raise fail(WrongRunError, f"update is for run {header.run!r}, current is {self.run!r}")
        bound = self.policy.max_staleness
        if bound is None and header.round < self._round:
            raise fail(
                StaleRoundError,
                f"update is for round {header.round}, current round is {self._round}",
            )
        if bound is not None and header.round < self._round - bound:
            raise fail(
                TooStaleError,
                f"update was trained on version {header.round}, {self._round - header.round} "
                f"versions before the current {self._round} (staleness bound {bound})",
            )
        if header.round > self._round:
            raise fail(
                FutureRoundError,
                f"update is for round {header.round}, current round is {self._round}",
            )
        base = self._base if bound is None else self._bases.get(header.round, self._base)
        if header.base_sha256 != base:
            raise fail(
                WrongBaseModelError,
                f"update is based on model {header.base_sha256[:16]}, the global model of "
                f"round {header.round} is {base[:16]}",
            )
        if self._selected is not None and client not in self._selected:
            raise fail(
                NotSelectedError,
                f"client {client!r} was not drawn for round {self._round} "
                f"({len(self._selected)} board(s) were)",
            )
        expected = self.policy.layout
        if header.layout != expected:
            raise fail(
                LayoutMismatchError,
                f"update layout (fingerprint {header.layout.fingerprint[:16]}, "
                f"{header.layout.size} values) differs from the model layout "
                f"(fingerprint {expected.fingerprint[:16]}, {expected.size} values)",
            )
        low, high = self.policy.min_samples, self.policy.sample_limit
        if not low <= header.samples <= high:
            raise fail(SampleCountError, f"sample count {header.samples} is not in [{low}, {high}]")
        skew_limit = self.policy.max_clock_skew_ms
        if skew_limit is not None:
            skew = abs(self.clock() - header.timestamp_ms)
            if skew > skew_limit:
                raise fail(
                    ClockSkewError,
                    f"timestamp is {skew} ms from the coordinator clock (limit {skew_limit} ms)",
                )
        previous = self._seen.get(client)
        if previous is not None:
            if previous == message.message_id:
                return message, True
            if bound is not None:
                raise fail(
                    BufferedError,
                    f"client {client!r} already has an update in the buffer of version "
                    f"{self._round}; send the next one on a newer version",
                )
            raise fail(
                ConflictingUpdateError,
                f"client {client!r} already has a different update admitted in round {self._round}",
            )
        if (client, header.round) in self._based:
            raise fail(
                ConflictingUpdateError,
                f"client {client!r} already has an update trained on version {header.round} "
                "admitted",
            )
        if header.nonce in self._nonces:
            raise fail(ReplayedNonceError, f"nonce {header.nonce} was already used this round")
        return message, False

    def _log(self, decision: AdmissionDecision, topic: str | None = None) -> None:
        # An unreadable message names no client; its topic says which board's credentials sent
        # it (the broker's ACL lets a board write only its own update topic).
        who = decision.client_id or (f"? (on {topic})" if topic else "?")
        if decision.rejected:
            logger.warning(
                "rejected update from %s (run %s, round %d): %s: %s",
                who,
                self.run,
                self._round,
                decision.reason.value,
                decision.detail,
            )
        elif decision.reason is Reason.DUPLICATE:
            logger.info("duplicate update from %s in round %d ignored", who, self._round)
        else:
            logger.debug("admitted update from %s for round %d", who, self._round)

    # -- persistence -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: run, round, base model, admitted updates, nonces, counters.

        Keys and policy are configuration and are not included.
        """
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "run": self.run,
            "round": self._round,
            "base_sha256": self._base,
            "layout_sha256": self.policy.layout.fingerprint,
            "selected": None if self._selected is None else sorted(self._selected),
            "bases": {str(r): h for r, h in sorted(self._bases.items())},
            "based": sorted([c, r] for c, r in self._based),
            "seen": dict(sorted(self._seen.items())),
            "nonces": sorted(self._nonces),
            "counters": {r.value: n for r, n in sorted(self._counters.items())},
        }

    @classmethod
    def from_state_dict(
        cls,
        state: Any,
        *,
        keys: KeySource,
        policy: AdmissionPolicy,
        clock: Callable[[], int] = now_ms,
    ) -> Admission:
        """Rebuild an :class:`Admission` from :meth:`state_dict` output.

        Raises
        ------
        AdmissionStateError
            If the state is malformed, of another format version, or was saved for a model
            with a different layout.
        """
        try:
            if state["format"] != STATE_FORMAT or state["version"] != STATE_VERSION:
                raise AdmissionStateError(
                    f"admission state has format {state['format']!r} version "
                    f"{state['version']!r}; expected {STATE_FORMAT!r} version {STATE_VERSION}"
                )
            if state["layout_sha256"] != policy.layout.fingerprint:
                raise AdmissionStateError(
                    "admission state was saved for a model with another layout"
                )
            admission = cls(
                run=state["run"],
                keys=keys,
                policy=policy,
                round=state["round"],
                base_sha256=state["base_sha256"],
                selected=_selection(state.get("selected")),
                clock=clock,
            )
            seen = state["seen"]
            nonces = state["nonces"]
            counters = state["counters"]
            if not isinstance(seen, dict) or not isinstance(nonces, list):
                raise AdmissionStateError(
                    "admission state: 'seen' must be an object and 'nonces' a list"
                )
            for client, message_id in seen.items():
                if not is_valid_id(client) or not isinstance(message_id, str):
                    raise AdmissionStateError(f"admission state: bad seen entry {client!r}")
                admission._seen[client] = message_id
            admission._nonces = {str(n) for n in nonces}
            for r, h in dict(state.get("bases") or {}).items():
                admission._check_round(int(r), h)
                admission._bases[int(r)] = h
            admission._based = {(str(c), int(r)) for c, r in state.get("based") or []}
            for reason, count in dict(counters).items():
                if type(count) is not int or count < 0:
                    raise AdmissionStateError(f"admission state: bad counter {reason!r}")
                admission._counters[Reason(reason)] = count
        except AdmissionStateError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise AdmissionStateError(f"admission state is malformed: {exc!r}") from None
        return admission

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`state_dict` as JSON, atomically (temporary file + rename)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(json.dumps(self.state_dict(), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, target)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        keys: KeySource,
        policy: AdmissionPolicy,
        clock: Callable[[], int] = now_ms,
    ) -> Admission:
        """Read a state file written by :meth:`save` (see :meth:`from_state_dict`)."""
        try:
            state = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise AdmissionStateError(f"cannot read admission state {path}: {exc}") from None
        return cls.from_state_dict(state, keys=keys, policy=policy, clock=clock)


def _selection(value: Any) -> list[str] | None:
    """The ``selected`` entry of a saved state (absent in states saved before sampling)."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(c, str) and is_valid_id(c) for c in value):
        raise AdmissionStateError(f"admission state: bad selection {brief(value)}")
    return value
