"""The soak's message generators, offline: deterministic per seed, and every message gets the
reason it declares -- from ``protocol.admission.Admission`` for the update topics, and from the
coordinator's round engine (real SQLite store, real keys) for every topic.

Two rounds of a three-board run (two honest boards, one compromised) with a six-value model:
round 1 without any earlier traffic, round 2 with round 1's admitted updates, statuses and
global models to replay.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from nacl.signing import SigningKey

from benchmarks import soak
from benchmarks.soak_messages import (
    FUZZ,
    FUZZ_GENERATORS,
    NONCANONICAL,
    STATUS,
    STOLEN_KEY,
    UPDATE,
    RoundContext,
    Sent,
    _Maker,
    _noncanonical_resigned,
    channel_of,
    round_batch,
    stolen_key_messages,
)
from coordinator.config import CoordinatorConfig
from coordinator.engine import RoundEngine
from coordinator.rounds import RuleStrategy
from coordinator.runtime import CoordinatorRuntime
from coordinator.status import STATUS_MAX_BYTES
from coordinator.store import CoordinatorStore
from protocol.admission import Admission, AdmissionPolicy
from protocol.envelope import check_global, encode_status, encode_update
from protocol.errors import Reason
from protocol.layout import TensorLayout, weights_sha256
from protocol.topics import status_topic, update_topic

RUN = "soak"
LAYOUT = TensorLayout([("dense/kernel", [2, 2]), ("dense/bias", [2])])
KEYS = {f"board-{i:03d}": SigningKey(bytes([i + 1]) * 32) for i in range(3)}
HONEST = ("board-000", "board-001")
COMPROMISED = "board-002"
COORD = SigningKey(b"c" * 32)
INITIAL = np.linspace(-1.0, 1.0, LAYOUT.size).astype(np.float32)
POLICY = AdmissionPolicy(LAYOUT)
ALLOW = {c: k.verify_key for c, k in KEYS.items()}


def _context(t: int, base: str, previous: str | None = None) -> RoundContext:
    return RoundContext(
        run=RUN,
        round=t,
        base_sha256=base,
        previous_sha256=previous,
        layout=LAYOUT,
        compromised=COMPROMISED,
        key=KEYS[COMPROMISED],
        honest=HONEST,
        size_limit=POLICY.size_limit,
        max_samples=POLICY.sample_limit,
    )


def _engine(tmp_path: Path) -> RoundEngine:
    cfg = CoordinatorConfig(
        run=RUN,
        key_dir=tmp_path / "k",
        allow_list=tmp_path / "a",
        db=tmp_path / "c.sqlite",
        clients=tuple(KEYS),
        rounds=3,
    )
    runtime = CoordinatorRuntime(LAYOUT, INITIAL.copy(), RuleStrategy("fedavg"))
    return RoundEngine(cfg, runtime, CoordinatorStore(cfg.db), COORD, ALLOW)


def _dispatch(engine: RoundEngine, s: Sent) -> Reason:
    """What the coordinator service does with a message on ``s.topic``."""
    if channel_of(s.topic) == STATUS:
        return engine.handle_status(s.payload, topic=s.topic).reason
    return engine.handle_update(s.payload, topic=s.topic).reason


def _honest_traffic(t: int, base: str) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    updates = [
        (
            update_topic(RUN, c),
            encode_update(
                run=RUN,
                round=t,
                client=c,
                signing_key=KEYS[c],
                delta=np.full(LAYOUT.size, 0.01 * (i + 1), np.float32),
                layout=LAYOUT,
                base_sha256=base,
                samples=50,
                alarm=False,
            ),
        )
        for i, c in enumerate(HONEST)
    ]
    statuses = [
        (status_topic(RUN, c), encode_status(run=RUN, client=c, signing_key=KEYS[c], online=True))
        for c in HONEST
    ]
    return updates, statuses


def _check_round(
    engine: RoundEngine, admission: Admission, batch: list[Sent], admitted: set[str]
) -> Counter[str]:
    """Feed ``batch`` to both; return mismatches as ``generator: expected != observed``."""
    wrong: Counter[str] = Counter()
    with engine.store.transaction():
        for s in batch:
            observed = _dispatch(engine, s)
            if observed is not s.expected:
                wrong[f"{s.generator}: {s.expected.value} != {observed.value}"] += 1
            if s.channel != UPDATE:
                continue
            digest = hashlib.sha256(s.payload).hexdigest()
            decision = admission.admit(s.payload, topic=s.topic)
            if digest in admitted:
                # The coordinator's whole-message check answers first: a byte-identical copy of
                # an admitted update is a duplicate in any round and on any update topic;
                # admission alone calls it a duplicate in its round, stale later, and a topic
                # mismatch on another board's topic.
                assert s.expected is Reason.DUPLICATE
                assert decision.reason in (
                    Reason.DUPLICATE,
                    Reason.STALE_ROUND,
                    Reason.TOPIC_MISMATCH,
                )
            elif decision.reason is not s.expected:
                wrong[f"admission {s.generator}: {s.expected.value} != {decision.reason}"] += 1
            if decision.accepted:
                admitted.add(digest)
    return wrong


def test_two_rounds_of_messages_get_the_reasons_they_declare(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    first = engine.start()
    g1 = check_global(first, COORD.verify_key, run=RUN)
    base1 = weights_sha256(INITIAL)
    admission = Admission(run=RUN, keys=ALLOW, policy=POLICY, round=1, base_sha256=base1)
    admitted: set[str] = set()
    ctx = _context(1, base1)
    batch1 = round_batch(ctx, seed=11, fuzz_count=600)
    assert _check_round(engine, admission, batch1, admitted) == Counter()
    # Round 1 closes with the honest boards' updates, which round 2 replays.
    updates, statuses = _honest_traffic(1, base1)
    for topic, data in updates:
        assert engine.handle_update(data, topic=topic).accepted
        assert admission.admit(data, topic=topic).accepted
        admitted.add(hashlib.sha256(data).hexdigest())
    for topic, data in statuses:
        assert engine.handle_status(data, topic=topic).accepted
    second = engine.close_round()
    assert second is not None
    g2 = check_global(second, COORD.verify_key, run=RUN)
    assert np.isfinite(g2.weights).all()  # the guard left the 1e15 update out
    base2 = g2.header.payload_sha256
    admission.start_round(2, base2)
    ctx2 = _context(2, base2, base1)
    ctx2.own_admitted = [batch1[0].payload]
    ctx2.sniffed_updates = updates
    ctx2.sniffed_statuses = statuses
    ctx2.globals_seen = [first, second]
    batch2 = round_batch(ctx2, seed=11, fuzz_count=600)
    assert _check_round(engine, admission, batch2, admitted) == Counter()
    assert g1.round == 1 and engine.round == 2
    # Every generator was used, and the batches cover the reason codes a peer can cause.
    used = {s.generator.split(":")[0] for s in batch1 + batch2 if s.family == FUZZ}
    assert {n.replace("noncanonical_resigned", "noncanonical") for n in FUZZ_GENERATORS} <= used | {
        "replay_update_other_topic",
        "replay_update_on_status",
        "replay_status_other_topic",
        "replay_status_on_update",
    }
    reasons = {s.expected for s in batch1 + batch2}
    assert reasons >= set(Reason) - {
        Reason.WRONG_RUN,  # a topic of this run never carries another run's header
        Reason.CLOCK_SKEW,  # the check is off by default
        Reason.REPLAYED_NONCE,  # needs two board keys
        Reason.BANNED,
        Reason.QUARANTINED,
        Reason.REVOKED,  # an operator action, like a ban
        Reason.NOT_SELECTED,  # the soak's run draws no boards (no client sampling)
        Reason.STALE,  # ... and its rounds are synchronous (no buffered asynchronous mode)
        Reason.TOO_STALE,
        Reason.BUFFERED,
    }
    # The engine counted exactly what was declared.
    counted = engine.store.decision_counts()
    declared = Counter(s.expected.value for s in batch1 + batch2 if s.channel == UPDATE)
    declared[Reason.ACCEPTED.value] += len(updates)
    assert counted == dict(declared)


def test_batches_are_deterministic_per_seed() -> None:
    base = weights_sha256(INITIAL)
    one = round_batch(_context(1, base), seed=3, fuzz_count=200)
    two = round_batch(_context(1, base), seed=3, fuzz_count=200)
    other = round_batch(_context(1, base), seed=4, fuzz_count=200)
    assert [(s.topic, s.payload, s.expected) for s in one] == [
        (s.topic, s.payload, s.expected) for s in two
    ]
    assert [s.payload for s in one] != [s.payload for s in other]
    assert [s.payload for s in round_batch(_context(2, base), seed=3, fuzz_count=200)] != [
        s.payload for s in one
    ]


def test_the_stolen_key_family_puts_every_numeric_field_at_its_extremes() -> None:
    messages = stolen_key_messages(_context(2, "ab" * 32, "cd" * 32), np.random.default_rng(0))
    assert all(s.family == STOLEN_KEY for s in messages)
    assert messages[0].expected is Reason.ACCEPTED and messages[0].generator.startswith("admitted")
    names = {s.generator for s in messages}
    for field in ("samples", "round", "timestamp"):
        assert {n for n in names if n.startswith(f"{field}=")} >= {f"{field}=0", f"{field}=2^53-1"}
    assert {"samples=1", "samples=max_samples", "samples=max_samples+1"} <= names
    assert {"round=previous", "round=current", "round=next"} <= names
    payloads = {"1e15", "float32_max", "-float32_max", "denormal", "zeros", "nan", "inf"}
    assert {f"payload={p}" for p in payloads} <= names
    assert len(messages) >= 40
    # A round that kept the model (guard, failed aggregation) has no "previous" base to forge.
    kept = stolen_key_messages(_context(2, "ab" * 32, "ab" * 32), np.random.default_rng(0))
    assert "base=previous" in names and "base=previous" not in {s.generator for s in kept}


@pytest.mark.parametrize("variant", sorted(NONCANONICAL))
def test_each_noncanonical_header_variant_is_refused_before_the_key_lookup(variant: str) -> None:
    base = weights_sha256(INITIAL)
    ctx = _context(1, base)
    admission = Admission(run=RUN, keys=ALLOW, policy=POLICY, round=1, base_sha256=base)
    for seed in range(200):  # until the generator picks this variant
        s = _noncanonical_resigned(_Maker(ctx, np.random.default_rng(seed)), [])
        if s.generator == f"noncanonical:{variant}":
            break
    else:
        pytest.fail(f"variant {variant} never drawn")
    assert s.expected in (NONCANONICAL[variant], Reason.PAYLOAD_TOO_LARGE)
    limit = STATUS_MAX_BYTES if s.channel == STATUS else POLICY.size_limit
    if len(s.payload) <= limit:
        assert s.expected is NONCANONICAL[variant]
        assert admission.admit(s.payload).reason is NONCANONICAL[variant]


def test_report_tables_agree_with_the_counts() -> None:
    outcome = soak.SoakOutcome(soak.SMOKE, RUN, COMPROMISED)
    outcome.expected.update({(UPDATE, "malformed"): 5, (UPDATE, "accepted"): 2,
                             (UPDATE, "duplicate"): 1, (STATUS, "accepted"): 1})  # fmt: skip
    outcome.db = {
        "update_counts": {"malformed": 5, "accepted": 6, "duplicate": 3},
        "status_counted": True,
        "status_counts": {"accepted": 4, "bad_signature": 1},
        "admitted": [(1, c, "d", 1) for c in (*HONEST, COMPROMISED)] * 2,
        "models": [],
        "rounds": [],
        "finished": False,
    }
    rows = {(r.channel, r.reason): r for r in soak.count_rows(outcome)}
    assert rows[(UPDATE, "accepted")].ok and rows[(UPDATE, "accepted")].honest == 4
    assert rows[(UPDATE, "duplicate")].ok and rows[(UPDATE, "duplicate")].honest == 2
    assert rows[(STATUS, "accepted")].ok
    assert not rows[(STATUS, "bad_signature")].ok  # counted but never sent
    names = {name: ok for name, ok, _ in soak.checks(outcome)}
    assert names["every message counted under its documented reason"] is False
    assert names["the run completes"] is False


class _FakeDb:
    def __init__(self, updates: dict[str, int], statuses: dict[str, int]) -> None:
        self.updates, self.statuses = updates, statuses

    def has_status_counts(self) -> bool:
        return True

    def update_counts(self) -> dict[str, int]:
        return self.updates

    def status_counts(self) -> dict[str, int]:
        return self.statuses

    def admitted(self) -> list[tuple[int, str, str, int]]:
        return [(1, "board-000", "d", 1), (1, COMPROMISED, "e", 1)]


def test_waiting_ends_on_exact_counts_or_on_settled_disagreeing_ones(monkeypatch) -> None:
    expected = Counter({(UPDATE, "accepted"): 1, (UPDATE, "malformed"): 3, (STATUS, "accepted"): 1})
    db = _FakeDb({"accepted": 2, "malformed": 2}, {"accepted": 2})
    settled = soak._Settled(expected, db, COMPROMISED)  # type: ignore[arg-type]
    assert not settled() and not settled.exact  # one malformed message not counted yet
    db.updates["malformed"] = 3
    assert settled() and settled.exact
    # Counted under another reason: the totals match; done once the counts stop moving.
    monkeypatch.setattr(soak._Settled, "QUIET", 0.0)
    db.updates = {"accepted": 2, "malformed": 2, "bad_signature": 1}
    settled = soak._Settled(expected, db, COMPROMISED)  # type: ignore[arg-type]
    assert not settled()  # first look: counts just changed
    assert settled() and not settled.exact
    # A message that was never counted keeps it waiting.
    db.updates, db.statuses = {"accepted": 2, "malformed": 2}, {"accepted": 1}
    settled = soak._Settled(expected, db, COMPROMISED)  # type: ignore[arg-type]
    assert not settled() and not settled()
