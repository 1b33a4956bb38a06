"""The zoo's paper models have the architectures their papers give."""

from __future__ import annotations

import pytest

from models.errors import ModelInputError
from models.zoo import build_model, check_model_input


def test_rr_cnn_is_the_residual_papers_mnist_cnn():
    """Residual-based reweighting, Table 5: conv 4@5x5, pool, conv 8@5x5, pool, fc 16, fc 10."""
    model = build_model("rr-cnn", (28, 28, 1), 10)
    shapes = {layer.name: tuple(layer.output.shape[1:]) for layer in model.layers}
    assert shapes["conv1"] == (24, 24, 4) and shapes["pool1"] == (12, 12, 4)
    assert shapes["conv2"] == (8, 8, 8) and shapes["pool2"] == (4, 4, 8)
    assert shapes["fc1"] == (16,) and shapes["logits"] == (10,)
    assert model.count_params() == 3146


def test_rr_cnn_refuses_digits_images():
    with pytest.raises(ModelInputError, match="at least 16x16"):
        check_model_input("rr-cnn", (8, 8, 1), "digits")
