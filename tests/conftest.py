"""Shared test fixtures: quiet TensorFlow, small real datasets."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled digits, split train/test (always available)."""
    from models.datasets import load_digits

    return load_digits()
