"""The residual-reweighting anatomy script: its masks over the output layer and its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.residual_anatomy import _output_columns, main
from models.weights import WeightLayout


def test_output_columns_pick_the_class_columns_of_the_last_dense_layer() -> None:
    # conv kernel (2,2,1,3) + bias 3, dense kernel (4, 5) + bias 5: d = 12 + 3 + 20 + 5 = 40
    layout = WeightLayout((("c/k", (2, 2, 1, 3)), ("c/b", (3,)), ("fc/k", (4, 5)), ("fc/b", (5,))))
    masks = _output_columns(layout, layout.size, source=1, target=3)
    kernel = np.arange(20).reshape(4, 5) + 15  # flat positions of the dense kernel
    assert np.flatnonzero(masks["source"]).tolist() == [*kernel[:, 1].tolist(), 36]
    assert np.flatnonzero(masks["target"]).tolist() == [*kernel[:, 3].tolist(), 38]
    assert np.flatnonzero(masks["other layers"]).tolist() == list(range(15))
    together = masks["source"] | masks["target"] | masks["output"] | masks["other layers"]
    assert together.all()
    assert sum(int(m.sum()) for m in masks.values()) == 40  # a partition


def test_refuses_a_folder_without_a_finished_cell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["--cell", str(tmp_path), "--rounds", "1"])
    assert "holds no finished cell" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--cell", str(tmp_path), "--rounds", "one"])
    assert "comma-separated round numbers" in capsys.readouterr().err
