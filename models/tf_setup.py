"""Quiet, deterministic TensorFlow start-up shared by every program that trains or evaluates."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at ``/dev/null`` for the block, unless ``TF_CPP_MIN_LOG_LEVEL=0``.

    For native libraries (TensorFlow, LiteRT) that log to stderr directly while they load,
    ignoring Python's logging. Exceptions raised in the block still propagate.
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2") == "0":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def quiet_tensorflow() -> None:
    """Import TensorFlow without its C++ start-up chatter, unless the user asked for it.

    TensorFlow's native library logs lines such as "oneDNN custom operations are on" while it
    loads, before its own log-level setting is read, so the first import runs with the
    process's stderr (file descriptor 2) pointed at ``/dev/null``. Import errors still raise.
    Setting ``TF_CPP_MIN_LOG_LEVEL=0`` keeps every message.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return
    with native_stderr_silenced():
        import tensorflow  # noqa: F401


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and TensorFlow; optionally make TensorFlow ops deterministic.

    With ``deterministic`` the same seed gives bit-identical training on the same machine.
    """
    quiet_tensorflow()
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def freeze_startup_objects() -> None:
    """Exclude every object alive now from Python's cyclic garbage collector.

    A process with TensorFlow loaded holds some 370,000 objects; a full collection walks all of
    them (about 0.2 s here), which stalls a service at random moments. Called once a service
    has built its models and is about to serve: those objects live as long as the process, and
    later collections only walk what was allocated afterwards.
    """
    gc.collect()
    gc.freeze()
