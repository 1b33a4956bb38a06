"""The streaming round state: buffer, Gram matrix, per-row figures (coordinator.streaming).

The Gram entries must not depend on the order updates arrive in or on how many are flushed
together, must be exactly symmetric and give bit-identical rows bit-identical entries, and stay
within the documented error bound of the exact dot products.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from coordinator.streaming import (
    StreamingRound,
    chain_length,
    dot_error_factor,
    pair_dots,
    server_dot_products,
)

RNG = np.random.default_rng(20)


def _stream(x: np.ndarray, order: np.ndarray, flush_every: int) -> StreamingRound:
    s = StreamingRound(x.shape[0], x.shape[1])
    for n, row in enumerate(order, start=1):
        s.add(int(row), x[row])
        if n % flush_every == 0:
            s.flush()
    s.flush()
    return s


def test_gram_entries_do_not_depend_on_arrival_order_or_flush_size() -> None:
    x = RNG.standard_normal((23, 5003), dtype=np.float32)
    x[7] = x[3]
    x[19] = x[3]
    reference = _stream(x, np.arange(23), 1).gram_of(range(23))
    for order, every in ((RNG.permutation(23), 5), (RNG.permutation(23), 23), (np.arange(23), 2)):
        gram = _stream(x, order, every).gram_of(range(23))
        np.testing.assert_array_equal(gram, reference)
    np.testing.assert_array_equal(reference, reference.T)
    # Bit-identical rows: identical Gram rows, and their mutual product is their squared norm.
    np.testing.assert_array_equal(reference[3], reference[7])
    np.testing.assert_array_equal(reference[3], reference[19])
    assert reference[3, 7] == reference[3, 3] == reference[7, 7]


def test_gram_entries_are_within_the_documented_bound_of_the_exact_products() -> None:
    d = 3001
    x = (RNG.standard_normal((6, d)) * np.exp(RNG.uniform(-8, 8, (6, d)))).astype(np.float32)
    gram = pair_dots(x, range(6), range(6))
    gamma = dot_error_factor(d, 6)
    for i in range(6):
        for j in range(6):
            exact = sum(Fraction(float(a)) * Fraction(float(b)) for a, b in zip(x[i], x[j]))
            scale = float(np.sum(np.abs(x[i].astype(np.float64) * x[j])))
            assert abs(float(Fraction(gram[i, j]) - exact)) <= gamma * scale
    assert chain_length(d) < d  # the kernel's chains are shorter than a plain loop's


def test_rows_figures_and_views() -> None:
    x = RNG.standard_normal((4, 1000), dtype=np.float32)
    s = StreamingRound(6, 1000)
    view = s.add(4, x[1])
    assert np.shares_memory(view, s.buffer[4]) and not view.flags.writeable
    np.testing.assert_array_equal(view, x[1])
    assert s.max_abs[4] == np.abs(x[1]).max()
    assert s.sq_norms[4] == pytest.approx(float(np.dot(x[1].astype(np.float64), x[1])), rel=1e-12)
    s.add(0, x[0])
    assert s.rows == [0, 4] and s.order == [4, 0]
    np.testing.assert_array_equal(s.matrix([0, 4]), x[[0, 1]])
    with pytest.raises(ValueError, match="already holds"):
        s.add(4, x[2])
    with pytest.raises(ValueError, match="not in"):
        s.add(6, x[2])
    with pytest.raises(ValueError, match="values, expected"):
        s.add(1, x[2][:10])
    gram = s.gram_of([0, 4])
    assert gram[0, 1] == gram[1, 0] and gram[1, 1] == s.sq_norms[4]
    with pytest.raises(ValueError, match="hold no update"):
        s.gram_of([0, 1])
    s.reset(2)
    assert s.rows == [] and s.round == 2
    s.add(4, x[2])  # a new round reuses the row
    np.testing.assert_array_equal(s.buffer[4], x[2])


def test_server_dots_before_and_after_the_server_update_is_known() -> None:
    x = RNG.standard_normal((5, 2000), dtype=np.float32)
    g0 = RNG.standard_normal(2000, dtype=np.float32)
    early = StreamingRound(5, 2000)
    for r in range(2):
        early.add(r, x[r])
    early.set_server_update(g0)
    for r in range(2, 5):
        early.add(r, x[r])
    expected = server_dot_products(x, range(5), g0)
    np.testing.assert_array_equal(early.server_dots[:5], expected)
    np.testing.assert_allclose(expected, x.astype(np.float64) @ g0, rtol=1e-12)
    # The same function as a Gram entry: the server update as one more row.
    both = np.vstack([x, g0[None]])
    np.testing.assert_array_equal(pair_dots(both, range(5), [5])[:, 0], expected)


def test_groups_follow_the_digests() -> None:
    x = RNG.standard_normal((4, 100), dtype=np.float32)
    s = StreamingRound(4, 100, pairwise=False)
    s.add(0, x[0])
    s.add(1, x[1])
    s.add(2, x[0])  # same values, digest computed from them
    s.add(3, x[3], digest="given")
    assert s.groups([0, 1, 2, 3]).tolist() == [0, 1, 0, 3]
    assert s.flush() == 0 and s.gram is None
    with pytest.raises(ValueError, match="no Gram"):
        s.gram_of([0])
