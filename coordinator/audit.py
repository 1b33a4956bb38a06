"""The tamper-evident round log: every closed round and key change, hash-chained and signed.

Each entry is a *record* -- a JSON object -- encoded canonically (keys sorted, no whitespace,
ASCII, integers and strings only where the protocol's headers allow them, floats written by
Python's shortest round-trip repr) and signed with the coordinator's Ed25519 key::

    record = {"v": 1, "seq": n, "run": RUN, "kind": "round" | "keys" | "operator",
              "at_ms": unix milliseconds, "prev": SHA-256 of record n-1 (64 zeros for n = 0),
              "body": {...}}
    hash = hex SHA-256 of the record's canonical bytes
    sig  = hex Ed25519 signature of the same bytes

A ``round`` body holds the round, why it closed, the previous and the new global model's hash,
the samples aggregated, the SHA-256 of every admitted update message (the exact bytes the board
signed), each board's verdict (kept, weight), the strategy's decision summary (SIREN's case, bans
and rollback; the guard's action; a failure), and the round's admission counts by reason. A
``keys`` or ``operator`` body names the board and what changed (key registered, rotated or
revoked; ban, unban, pause, resume) with the new key's fingerprint.

Anyone holding only the coordinator's public key can check a log (:func:`verify_chain`): each
record re-encodes to its own bytes, its hash matches, its signature verifies, ``seq`` counts up by
one and ``prev`` is the previous record's hash. Changing any byte of any record breaks its
signature (and the next record's ``prev``); removing or reordering records breaks ``seq`` or
``prev``; the first record that fails is named with the reason. What the chain cannot show is
truncation of its tail: compare the last ``seq`` with a copy kept elsewhere (the exported log,
the dashboard).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

#: Format version of a record (``v``).
AUDIT_VERSION = 1
#: ``prev`` of the first record.
GENESIS = "0" * 64
#: Record kinds.
KINDS = ("round", "keys", "operator")


def _check_value(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: a non-finite number cannot be logged")
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: keys must be strings")
            _check_value(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_value(v, f"{where}[{i}]")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise ValueError(f"{where}: {type(value).__name__} cannot be logged")


def canonical_bytes(record: Mapping[str, Any]) -> bytes:
    """The canonical encoding of a record (what is hashed and signed).

    Raises
    ------
    ValueError
        For values JSON cannot hold exactly (non-finite numbers, other types).
    """
    _check_value(record, "record")
    return json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


@dataclass(frozen=True)
class AuditEntry:
    """One signed record: its canonical bytes, their hash and the signature."""

    seq: int
    data: bytes
    hash: str
    signature: str

    @property
    def record(self) -> dict[str, Any]:
        """The decoded record."""
        return dict(json.loads(self.data))

    def to_json(self) -> str:
        """One line of an exported log: ``{"record": ..., "hash": ..., "sig": ...}``."""
        return json.dumps(
            {"record": self.data.decode("ascii"), "hash": self.hash, "sig": self.signature},
            separators=(",", ":"),
        )


def make_entry(
    key: SigningKey,
    *,
    seq: int,
    prev: str,
    run: str,
    kind: str,
    at_ms: int,
    body: Mapping[str, Any],
) -> AuditEntry:
    """Encode, hash and sign the record ``seq`` that follows the record hashed ``prev``."""
    if kind not in KINDS:
        raise ValueError(f"audit kind must be one of {KINDS}, got {kind!r}")
    record = {
        "v": AUDIT_VERSION,
        "seq": seq,
        "run": run,
        "kind": kind,
        "at_ms": at_ms,
        "prev": prev,
        "body": dict(body),
    }
    data = canonical_bytes(record)
    signature = key.sign(data).signature.hex()
    return AuditEntry(seq, data, hashlib.sha256(data).hexdigest(), signature)


@dataclass(frozen=True)
class ChainReport:
    """Outcome of :func:`verify_chain`.

    Attributes
    ----------
    records : int
        Records that verified, in order, before the first failure (all of them when ``ok``).
    ok : bool
        Whether every record verified.
    problem : str
        The first failure: which record (``seq``, kind and round), what failed.
    last : dict or None
        The last record that verified.
    """

    records: int
    ok: bool
    problem: str = ""
    last: dict[str, Any] | None = None


def _describe(record: Mapping[str, Any] | None, position: int) -> str:
    """Names a record by its place in the log (seq should equal it), then by what it says."""
    where = f"record {position} (line {position + 1}"
    if record:
        where += f": {record.get('kind')}"
        body = record.get("body")
        if isinstance(body, Mapping) and "round" in body:
            where += f", round {body['round']}"
        if record.get("seq") != position:
            where += f", claims seq {record.get('seq')}"
    return where + ")"


def verify_chain(
    entries: Iterable[tuple[bytes, str, str]], key: VerifyKey, run: str | None = None
) -> ChainReport:
    """Check a log: every ``(record bytes, hash, signature)`` in order (see the module
    docstring). Stops at the first record that fails and says why."""
    prev, count, last = GENESIS, 0, None
    for position, (data, claimed_hash, signature) in enumerate(entries):
        record: dict[str, Any] | None = None
        try:
            record = dict(json.loads(data))
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            return ChainReport(
                count, False, f"{_describe(None, position)}: not a JSON record ({exc})", last
            )
        where = _describe(record, position)
        try:
            again = canonical_bytes(record)
        except ValueError as exc:
            return ChainReport(count, False, f"{where}: {exc}", last)
        if again != data:
            return ChainReport(count, False, f"{where}: not in canonical form", last)
        digest = hashlib.sha256(data).hexdigest()
        if digest != claimed_hash:
            return ChainReport(
                count, False, f"{where}: hash {claimed_hash[:16]}... does not match", last
            )
        try:
            key.verify(data, bytes.fromhex(signature))
        except (BadSignatureError, ValueError):
            return ChainReport(count, False, f"{where}: the signature does not verify", last)
        if record.get("v") != AUDIT_VERSION:
            return ChainReport(count, False, f"{where}: unknown version {record.get('v')!r}", last)
        if record.get("seq") != position:
            return ChainReport(
                count, False, f"{where}: seq {record.get('seq')} where {position} was due", last
            )
        if record.get("prev") != prev:
            return ChainReport(
                count, False, f"{where}: does not chain to the record before it", last
            )
        if run is not None and record.get("run") != run:
            return ChainReport(count, False, f"{where}: run {record.get('run')!r}, not {run!r}")
        prev, count, last = digest, count + 1, record
    return ChainReport(count, True, "", last)


def read_log(path: Path) -> Iterator[tuple[bytes, str, str]]:
    """The entries of an exported log (one JSON object per line, see
    :meth:`AuditEntry.to_json`); a line that is not such an object yields empty fields, which
    :func:`verify_chain` reports."""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            yield str(obj["record"]).encode("ascii", "replace"), str(obj["hash"]), str(obj["sig"])
        except (ValueError, KeyError, TypeError):
            yield line.encode("utf-8", "replace"), "", ""


def round_body(
    record: Mapping[str, Any],
    digests: Mapping[str, str],
    selected: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The audit body of a closed round, from the round's record (``coordinator.service``),
    the SHA-256 of each admitted update message by board and, with client sampling, the
    client ids drawn for the round (``selected``, only then in the body)."""
    decision = record.get("decision") or {}
    summary = {
        k: decision[k]
        for k in ("rule", "case", "rollback", "banned", "newly_banned", "profile")
        if k in decision
    }
    guard = decision.get("guard")
    if guard:
        summary["guard"] = {k: guard[k] for k in ("action", "problem", "excluded") if k in guard}
    verdicts = {
        str(record["clients"].get(k, k)): {
            "kept": bool(v.get("kept")),
            "weight": float(v.get("weight") or 0.0),
        }
        for k, v in (record.get("verdicts") or {}).items()
    }
    network = record.get("network") or {}
    body: dict[str, Any] = {
        "round": int(record["round"]),
        "close_reason": record.get("close_reason"),
        "global_before": record.get("global_before"),
        "global_after": record.get("global_after"),
        "samples": int(record.get("samples_total", 0)),
        "updates": dict(sorted(digests.items())),
        "verdicts": dict(sorted(verdicts.items())),
        "decision": _jsonable(summary),
        "failure": record.get("failure"),
        "refused": dict(sorted((network.get("rejected") or {}).items())),
    }
    if selected is not None:
        body["selected"] = sorted(selected)
    return body


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
