"""Long-running services move their start-up objects out of the garbage collector's way."""

from __future__ import annotations

import gc

from models.tf_setup import freeze_startup_objects


def test_freeze_moves_live_objects_to_the_permanent_generation() -> None:
    before = gc.get_freeze_count()
    keep = [object() for _ in range(1000)]
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() >= before + len(keep)
    finally:
        gc.unfreeze()
