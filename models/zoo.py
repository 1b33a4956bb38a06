"""Keras model zoo. Every model outputs logits (no softmax) for ``num_classes`` classes.

* ``siren-cnn`` — the SIREN paper's CNN (§5.1: "two CNN layers and two dense layers"):
  Conv2D(32, 3x3, ReLU) → MaxPool 2x2 → Conv2D(64, 3x3, ReLU) → MaxPool 2x2 → Dense(128, ReLU)
  → Dense(C). 225,034 parameters on 28x28x1.
* ``dspo-mlp`` — DSPO's MLP (one hidden layer of 256 ReLU units). 203,530 parameters on 28x28x1.
* ``digits-mlp`` — a small MLP (Dense(64, ReLU) → Dense(C)) for the 8x8 digits, 4,810 parameters.
* ``digits-cnn`` — a small CNN for 8x8 digits:
  Conv2D(16, 3x3 same, ReLU) → MaxPool → Dense(64) → Dense(C).
* ``rr-cnn`` — the MNIST CNN of residual-based reweighting (its Table 5): Conv2D(4, 5x5, ReLU)
  → MaxPool 2x2 → Conv2D(8, 5x5, ReLU) → MaxPool 2x2 → Dense(16, ReLU) → Dense(C). 3,146
  parameters on 28x28x1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from models.errors import ModelInputError, UnknownModelError
from models.tf_setup import quiet_tensorflow


def _siren_cnn(input_shape: tuple[int, ...], num_classes: int) -> Any:
    import keras
    from keras import layers

    return keras.Sequential(
        [
            keras.Input(input_shape),
            layers.Conv2D(32, 3, activation="relu", name="conv1"),
            layers.MaxPooling2D(2, name="pool1"),
            layers.Conv2D(64, 3, activation="relu", name="conv2"),
            layers.MaxPooling2D(2, name="pool2"),
            layers.Flatten(name="flatten"),
            layers.Dense(128, activation="relu", name="dense1"),
            layers.Dense(num_classes, name="logits"),
        ],
        name="siren_cnn",
    )


def _dspo_mlp(input_shape: tuple[int, ...], num_classes: int) -> Any:
    import keras
    from keras import layers

    return keras.Sequential(
        [
            keras.Input(input_shape),
            layers.Flatten(name="flatten"),
            layers.Dense(256, activation="relu", name="hidden"),
            layers.Dense(num_classes, name="logits"),
        ],
        name="dspo_mlp",
    )


def _digits_mlp(input_shape: tuple[int, ...], num_classes: int) -> Any:
    import keras
    from keras import layers

    return keras.Sequential(
        [
            keras.Input(input_shape),
            layers.Flatten(name="flatten"),
            layers.Dense(64, activation="relu", name="hidden"),
            layers.Dense(num_classes, name="logits"),
        ],
        name="digits_mlp",
    )


def _digits_cnn(input_shape: tuple[int, ...], num_classes: int) -> Any:
    import keras
    from keras import layers

    return keras.Sequential(
        [
            keras.Input(input_shape),
            layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1"),
            layers.MaxPooling2D(2, name="pool1"),
            layers.Flatten(name="flatten"),
            layers.Dense(64, activation="relu", name="hidden"),
            layers.Dense(num_classes, name="logits"),
        ],
        name="digits_cnn",
    )


def _rr_cnn(input_shape: tuple[int, ...], num_classes: int) -> Any:
    import keras
    from keras import layers

    return keras.Sequential(
        [
            keras.Input(input_shape),
            layers.Conv2D(4, 5, activation="relu", name="conv1"),
            layers.MaxPooling2D(2, name="pool1"),
            layers.Conv2D(8, 5, activation="relu", name="conv2"),
            layers.MaxPooling2D(2, name="pool2"),
            layers.Flatten(name="flatten"),
            layers.Dense(16, activation="relu", name="fc1"),
            layers.Dense(num_classes, name="logits"),
        ],
        name="rr_cnn",
    )


MODEL_BUILDERS: dict[str, Callable[[tuple[int, ...], int], Any]] = {
    "siren-cnn": _siren_cnn,
    "dspo-mlp": _dspo_mlp,
    "digits-mlp": _digits_mlp,
    "digits-cnn": _digits_cnn,
    "rr-cnn": _rr_cnn,
}

#: The model used when the user does not choose one, per dataset.
DEFAULT_MODEL = {"fashion-mnist": "siren-cnn", "digits": "digits-mlp"}

#: Smallest image side each model can take (its unpadded convolutions and poolings shrink the
#: image to nothing below it); the models were built for the sizes of :data:`MODEL_INPUT`.
MIN_SIDE = {"siren-cnn": 10, "dspo-mlp": 1, "digits-mlp": 1, "digits-cnn": 2, "rr-cnn": 16}
#: The images each model was made for.
MODEL_INPUT = {
    "siren-cnn": "28x28 (Fashion-MNIST)",
    "dspo-mlp": "28x28 (Fashion-MNIST)",
    "digits-mlp": "8x8 (digits)",
    "digits-cnn": "8x8 (digits)",
    "rr-cnn": "28x28 (MNIST; Fashion-MNIST here)",
}


def check_model_input(name: str, input_shape: tuple[int, ...], dataset: str = "") -> None:
    """Check, without TensorFlow, that zoo model ``name`` can take images of ``input_shape``.

    Raises
    ------
    UnknownModelError
        ``name`` is not in the zoo (the message lists the valid names).
    ModelInputError
        The images are too small for the model (the message says what it needs and which
        models fit).
    """
    if name not in MODEL_BUILDERS:
        raise UnknownModelError(
            f"unknown model {name!r}; valid: {', '.join(sorted(MODEL_BUILDERS))}"
        )
    side = min(input_shape[:2])
    if side >= MIN_SIDE[name]:
        return
    size = "x".join(str(n) for n in input_shape[:2])
    fits = sorted(m for m, smallest in MIN_SIDE.items() if side >= smallest)
    what = f"{dataset} images are {size}" if dataset else f"the images are {size}"
    raise ModelInputError(
        f"model {name!r} needs images of at least {MIN_SIDE[name]}x{MIN_SIDE[name]} (it was made "
        f"for {MODEL_INPUT[name]}); {what}: use --model {' or '.join(fits)}"
        + (", or --dataset fashion-mnist" if dataset == "digits" else "")
    )


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int = 0) -> Any:
    """Build an uncompiled Keras model from the zoo with seeded initial weights.

    Raises
    ------
    UnknownModelError
        ``name`` is not in :data:`MODEL_BUILDERS` (the message lists the valid names).
    ModelInputError
        The images are too small for the model (:func:`check_model_input`).
    """
    check_model_input(name, tuple(input_shape))
    quiet_tensorflow()
    import keras

    keras.utils.set_random_seed(seed)
    return MODEL_BUILDERS[name](tuple(input_shape), num_classes)
