"""The compiled loops against the numpy they stand for (tandem.compression.kernels)."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.compression import kernels


@pytest.mark.parametrize(
    "size", [0, 1, 7, 8, 9, 127, 128, 129, 255, 256, 300, 1031, 5000]
)
def test_the_pairwise_sum_is_numpys_bit_for_bit(size):
    """In float64, where the order of a sum shows: magnitudes over 60 decades,
    so that a one-by-one sum, another lane order or another cut of the halves
    each give other bits on some of these rows."""
    rng = np.random.default_rng(size)
    frames = np.zeros((64, 3), dtype=np.int64)
    partial = np.zeros(64, dtype=np.float64)
    rows = rng.laplace(size=(40, size)) * 10.0 ** rng.uniform(-30, 30, (40, size))
    for row in rows.astype(np.float32):
        expected = np.abs(row, dtype=np.float64).sum()
        got = kernels._abs_sum(row, size, frames, partial)
        assert got == expected or (np.isnan(got) and np.isnan(expected))
        assert np.float64(got).tobytes() == np.float64(expected).tobytes()


def test_the_cases_tell_sum_orders_apart():
    """The rows above do tell a one-by-one sum from numpy's."""
    rng = np.random.default_rng(1031)
    row = (rng.laplace(size=1031) * 10.0 ** rng.uniform(-30, 30, 1031)).astype(
        np.float32
    )
    wide = np.abs(row, dtype=np.float64)
    assert sum(wide.tolist(), 0.0) != wide.sum()


def test_the_scan_refuses_groups_out_of_range():
    with pytest.raises(ValueError, match=r"group indices must lie in \[0, 2\)"):
        kernels.scan(np.array([0, 2]), np.array([1, 1]), 5, 2)


def test_warm_up_readies_the_edge_rounds_loops_once(monkeypatch):
    """The loops compress_update calls are compiled (or loaded) by warm_up,
    in the types it passes; a second call does nothing."""
    monkeypatch.setattr(kernels, "_WARM", False)
    assert kernels.warm_up() > 0.0
    for loop in (
        kernels._int8_groups_in_place,
        kernels._sign_groups,
        kernels._scan,
        kernels._zero_counts,
    ):
        assert loop.signatures, loop
    assert kernels.warm_up() == 0.0
