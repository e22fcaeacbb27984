"""Side-by-side comparison: same inputs and seed through every method, one grid row each."""

import numpy as np
import pytest

from clusca_trt.errors import ConfigError, InputError
from clusca_trt.runtime.compare import compare_methods, comparison_grid, write_comparison_png


def test_grid_has_one_row_per_method_with_a_label_margin():
    rows = [(f"m{i}\n1.00x", np.full((3, 8, 8, 1), i / 3, np.float32)) for i in range(4)]
    grid = comparison_grid(rows, scale=2, label_width=50)
    assert grid.shape == (4 * 16, 50 + 3 * 16, 1) and grid.dtype == np.uint8
    for i in range(4):  # each row's images carry that row's value, scaled up by 2
        assert (grid[i * 16 : (i + 1) * 16, 50:] == round(255 * i / 3)).all()
    assert grid[:, :50].max() > 200  # the labels are drawn (white text on black)


def test_grid_rows_must_share_a_shape():
    with pytest.raises(InputError, match="expected every row of the same shape"):
        comparison_grid([("a", np.zeros((2, 8, 8, 1))), ("b", np.zeros((3, 8, 8, 1)))])


def test_compare_runs_full_first_and_reports_speedups(engines_k4):
    from clusca_trt import Pipeline

    pipe = Pipeline.load(engines_k4.directory)
    runs = compare_methods(pipe, dict(class_labels=[1, 2], steps=8), methods=("clusca", "fora"), seed=3,
                           interval=3)
    assert [r.label.split()[0] for r in runs] == ["full", "clusca", "fora"]
    assert runs[0].speedup == 1.0 and all(r.speedup > 0 for r in runs)
    assert runs[1].result.config.interval == 3 and runs[2].result.config.order == 0
    # the same seed as a plain generate call
    alone = pipe.generate([1, 2], seed=3, steps=8, method="fora", interval=3)
    np.testing.assert_array_equal(runs[2].result.latents, alone.latents)
    with pytest.raises(InputError, match="expected a model with a decoder"):
        write_comparison_png(runs, engines_k4.directory.parent / "x.png")
    with pytest.raises(ConfigError, match="expected distinct methods"):
        compare_methods(pipe, dict(class_labels=[1], steps=4), methods=("fora", "fora"))
