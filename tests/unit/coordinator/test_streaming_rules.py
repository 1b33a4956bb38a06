"""Closing from the streaming state gives the batch rules' results (coordinator.streaming_rules).

Every case feeds the same updates, in a shuffled order, to a StreamingRound and to the batch
rule: selections must be equal exactly, aggregates within float tolerance (and in practice bit
for bit). The adversarial cases are those where rounding could decide: exact duplicates (ties
that must stay ties), near-duplicates, huge-norm updates, and updates equal to within float32
resolution (where the streamed scores cannot be certified and the batch rule must be used).
"""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.aggregators import aggregate
from coordinator.errors import ByzantineBoundError
from coordinator.siren import cosine
from coordinator.streaming import StreamingRound
from coordinator.streaming_rules import StreamedClose, StreamingCosines

RNG = np.random.default_rng(7)
K, D = 31, 4000


def _cases() -> dict[str, np.ndarray]:
    base = RNG.standard_normal((K, D), dtype=np.float32)
    dup = base.copy()
    dup[4:12] = dup[4]  # a block of identical attackers
    near = base.copy()
    near[4:12] = near[4] + 1e-5 * RNG.standard_normal((8, D), dtype=np.float32)
    huge = base.copy()
    huge[:6] *= np.float32(1e6)
    flat = np.repeat(base[:1], K, axis=0)
    flat[1:] += np.float32(1e-7) * RNG.standard_normal((K - 1, D), dtype=np.float32)
    return {"random": base, "duplicates": dup, "near-duplicates": near, "huge": huge, "flat": flat}


CASES = _cases()
RULES = [
    ("krum", {"f": 6}),
    ("multi_krum", {"f": 6}),
    ("multi_krum", {"f": 6, "m": 9, "weighted": True}),
    ("bulyan", {"f": 7}),
    ("fltrust", {"server_update": RNG.standard_normal(D, dtype=np.float32)}),
    ("median", {}),
    ("trimmed_mean", {"beta": 0.2}),
    ("fedavg", {}),
]


def _orthogonal(v: np.ndarray) -> np.ndarray:
    """A vector whose exact dot product with ``v`` is 0 (pairs ``(v1, -v0)``)."""
    out = np.empty_like(v)
    out[0::2] = v[1::2]
    out[1::2] = -v[0::2]
    return out


def _close(x: np.ndarray, rows: list[int] | None = None) -> StreamedClose:
    stream = StreamingRound(x.shape[0], x.shape[1])
    for r in RNG.permutation(x.shape[0]):
        stream.add(int(r), x[r])
        if RNG.random() < 0.3:
            stream.flush()
    return StreamedClose(stream, list(range(x.shape[0])) if rows is None else rows)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(("rule", "params"), RULES)
def test_streamed_close_equals_the_batch_rule(case: str, rule: str, params: dict) -> None:
    x = CASES[case]
    weights = RNG.integers(1, 50, K).astype(np.float64)
    close = _close(x)
    got = close.aggregate(rule, weights=weights, **params)
    want = aggregate(rule, x, weights=weights, **params)
    assert [v.kept for v in got.verdicts] == [v.kept for v in want.verdicts]
    assert set(np.atleast_1d(got.info.get("selected", []))) == set(
        np.atleast_1d(want.info.get("selected", []))
    )
    np.testing.assert_allclose(
        [v.weight for v in got.verdicts], [v.weight for v in want.verdicts], rtol=1e-9, atol=0
    )
    np.testing.assert_allclose(got.vector, want.vector, rtol=1e-6, atol=1e-6)
    if rule in ("krum", "bulyan", "median", "trimmed_mean", "multi_krum"):
        np.testing.assert_array_equal(got.vector, want.vector)
    if case == "flat" and rule in ("krum", "multi_krum", "bulyan"):
        assert close.how.startswith("batch"), close.how  # equal within rounding: not certified
    elif rule != "fedavg":
        assert close.how == "streamed"


def test_duplicates_keep_their_exact_tie_and_the_lowest_index_wins() -> None:
    x = CASES["duplicates"]
    close = _close(x)
    got = close.aggregate("krum", f=6)
    assert close.how == "streamed"
    scores = [v.score for v in got.verdicts]
    assert len({scores[i] for i in range(4, 12)}) == 1  # bit-identical scores
    assert got.info["selected"] == aggregate("krum", x, f=6).info["selected"] == 4


def test_a_subset_of_rows_is_aggregated_like_the_stacked_subset() -> None:
    x = CASES["random"]
    rows = [r for r in range(K) if r % 4 != 1]  # boards that did not report
    for rule, params in RULES:
        params = {"f": 4} if rule == "bulyan" else params  # 23 boards: 4f+3 <= 23
        close = _close(x, rows)
        got = close.aggregate(rule, **params)
        want = aggregate(rule, x[rows], **params)
        assert [v.kept for v in got.verdicts] == [v.kept for v in want.verdicts], rule
        np.testing.assert_allclose(got.vector, want.vector, rtol=1e-6, atol=1e-6)


def test_bounds_are_checked_like_the_batch_rules() -> None:
    close = _close(CASES["random"][:7])
    with pytest.raises(ByzantineBoundError, match="krum needs K >= 2f\\+3 = 9"):
        close.aggregate("krum", f=3)
    with pytest.raises(ByzantineBoundError, match="bulyan"):
        close.aggregate("bulyan", f=2)


def test_fltrust_uses_dots_taken_on_admission() -> None:
    x = CASES["random"]
    g0 = RNG.standard_normal(D, dtype=np.float32)
    stream = StreamingRound(K, D, pairwise=False)
    stream.set_server_update(g0)
    for r in range(K):
        stream.add(r, x[r])
    dots = stream.server_dots.copy()
    close = StreamedClose(stream, list(range(K)))
    got = close.aggregate("fltrust", server_update=g0)
    np.testing.assert_array_equal(stream.server_dots, dots)  # nothing recomputed
    want = aggregate("fltrust", x, server_update=g0)
    np.testing.assert_allclose(got.vector, want.vector, rtol=1e-6, atol=1e-7)
    # A client orthogonal to the server update within rounding: only the batch rule can say
    # which side of 0 its cosine falls on.
    y = x.copy()
    y[3] = _orthogonal(g0)
    close = _close(y)
    got = close.aggregate("fltrust", server_update=g0)
    assert close.how.startswith("batch")
    assert [v.kept for v in got.verdicts] == [
        v.kept for v in aggregate("fltrust", y, server_update=g0).verdicts
    ]


def test_siren_cosines_give_the_batch_verdicts() -> None:
    x = CASES["huge"].copy()
    ref = 9
    x[10] = _orthogonal(x[ref])
    x[11] = 0.0
    stream = StreamingRound(K, D)
    for r in range(K):
        stream.add(r, x[r])
    cos = StreamingCosines(stream, cosine, K)
    for i in range(K):
        got, want = cos(i, ref), cosine(x[i], x[ref])
        assert (got is None) == (want is None)
        if want is not None:
            assert got is not None
            assert (got >= 0.0) == (want >= 0.0)
            assert got == pytest.approx(want, abs=1e-9)
    assert cos.exact_calls >= 1  # the near-orthogonal pair was recomputed exactly
    # Without the Gram matrix: one dot product per pair, same verdicts.
    plain = StreamingRound(K, D, pairwise=False)
    for r in range(K):
        plain.add(r, x[r])
    cos2 = StreamingCosines(plain, cosine, K)
    assert [cos2(i, ref) is None or cos2(i, ref) >= 0 for i in range(K)] == [
        cosine(x[i], x[ref]) is None or cosine(x[i], x[ref]) >= 0 for i in range(K)
    ]
