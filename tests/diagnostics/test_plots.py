"""Heatmaps of mean spectra."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import metatrain_symmetry as msym
from metatrain_symmetry.diagnostics import hatch_unresolved, plot_spectra
from metatrain_symmetry.diagnostics.plots import mean_spectrum, mean_spectrum_error
from tests.helpers import AnalyticModel, capabilities


@pytest.fixture(scope="module")
def model():
    return msym.load_model(AnalyticModel(), capabilities=capabilities())


def test_mean_spectrum_layout(model, molecules):
    """Rows are lambda, columns sigma = +1, -1: ``(R x)_z^2`` is 5/9 in (0, +1)
    and 4/9 in (2, +1)."""
    result = msym.analyze(model, molecules, ["mtt::x_z_squared"], max_lambda=2)
    spectrum = mean_spectrum(result, "mtt::x_z_squared")
    expected = torch.tensor(
        [[5 / 9, 0.0], [0.0, 0.0], [4 / 9, 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(spectrum, expected, rtol=0, atol=1e-12)
    assert mean_spectrum_error(result, "mtt::x_z_squared") is None


def test_plot_spectra_writes_a_png_with_a_panel_per_result(model, molecules, tmp_path):
    # outputs whose mean square is the same in every orientation: well estimated
    names = ["mtt::harmonics_1_3", "mtt::triple"]
    exact = msym.analyze(model, molecules, names, max_lambda=1)
    grid = msym.O3Grid.random(10, seed=0)
    estimated = msym.analyze(model, molecules, names, max_lambda=1, grid=grid)
    path = tmp_path / "spectra.png"
    plot_spectra({"exact": exact}, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    single = Image.open(io.BytesIO(data)).size
    plot_spectra({"exact": exact, "random": estimated}, path)
    double = Image.open(path).size
    # a figure 5.5 inches wide per panel, at 120 dots per inch
    assert single[0] == round(5.5 * 120) and double == (2 * single[0], single[1])
    assert np.asarray(Image.open(path).convert("L")).std() > 5


def test_hatch_unresolved_marks_cells_within_two_errors_of_zero():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.array([[1.0, 0.01], [-0.1, 0.5]])
    errors = np.array([[0.1, 0.01], [0.01, 0.3]])
    figure, axis = plt.subplots()
    axis.imshow(values)
    hatch_unresolved(axis, values, errors)
    corners = sorted(patch.get_xy() for patch in axis.patches)
    plt.close(figure)
    # (row, column) (0, 1), (1, 0) and (1, 1): x is the column, y the row
    assert corners == [(-0.5, 0.5), (0.5, -0.5), (0.5, 0.5)]
    assert all(patch.get_hatch() == "///" for patch in axis.patches)
