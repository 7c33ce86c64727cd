"""Heatmaps of spectra across training checkpoints."""

import ase.io

import metatrain_symmetry as msym
from metatrain_symmetry.dynamics import plot_dynamics


def test_random_grid_hatches_unresolved_cells(training, monkeypatch, tmp_path):
    """On a random grid the heatmap hatches exactly the cells within two
    standard errors of zero; the energy's own (0, +1) cell is resolved."""
    from matplotlib.figure import Figure

    frames = ase.io.read(training / "data.xyz", ":")
    dynamics = msym.training_dynamics(
        [training / "model_0.ckpt", training / "model_2.ckpt"],
        frames,
        outputs=["energy"],
        features=[],
        max_lambda=2,
        grid=msym.O3Grid.random(16, seed=0),
    )
    values = dynamics.spectrum_array("energy")
    errors = dynamics.spectrum_error["energy"].reshape(values.shape)
    unresolved = values < 2 * errors
    assert not bool(unresolved[:, 0, 0].any())
    assert int(unresolved.sum()) > 0

    hatched = []
    savefig = Figure.savefig

    def spy(figure, *args, **kwargs):
        for axis in figure.axes:
            hatched.extend(patch for patch in axis.patches if patch.get_hatch())
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    plot_dynamics(dynamics, tmp_path / "dynamics.png")
    assert len(hatched) == int(unresolved.sum())
