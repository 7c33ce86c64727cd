"""Spectra across training checkpoints with ``training_dynamics``, on checkpoints
written by ``mtt train``: epochs, order, weights and checkpoints of one run."""

import ase.build
import ase.io
import pytest
import torch

import metatrain_symmetry as msym
from metatrain_symmetry.testing import tiny_pet
from tests.helpers import epoch_weights


LAYERS = ["mtt::feature::gnn_layers.0_node", "mtt::feature::gnn_layers.1_node"]


def test_python_api(training):
    frames = ase.io.read(training / "data.xyz", ":")
    paths = [training / f"model_{epoch}.ckpt" for epoch in (1, 0)]
    dynamics = msym.training_dynamics(
        paths, frames, features=LAYERS[::-1], max_lambda=1
    )
    assert dynamics.epochs == [0, 1]
    assert dynamics.epoch_source == "checkpoint"
    assert dynamics.checkpoints == [str(path) for path in paths[::-1]]
    assert dynamics.names == ["energy", "non_conservative_force", *LAYERS[::-1]]
    # layer view: features in the order the model computes them, then outputs
    assert dynamics.final.outputs == [*LAYERS, "energy", "non_conservative_force"]
    assert dynamics.spectrum_array("energy").shape == (2, 2, 2)
    assert dynamics.equivariance_rmse["energy"].shape == (2, 2)
    last = msym.analyze(
        epoch_weights(paths[0]), frames, ["energy"], max_lambda=1, grid=dynamics.grid
    )
    assert torch.equal(
        dynamics.final.variance["energy"].block().values,
        last.variance["energy"].block().values,
    )

    # the best weights so far are what load_model (and mtt export) use
    best = msym.training_dynamics(
        paths[:1], frames, outputs=["energy"], features=[], max_lambda=1, weights="best"
    )
    direct = msym.analyze(
        msym.load_model(paths[0]), frames, ["energy"], max_lambda=1, grid=best.grid
    )
    assert torch.equal(
        best.spectrum["energy"].block().values[0],
        direct.spectrum["energy"].block().values.mean(dim=0),
    )


def test_epochs_from_file_names_and_order(tmp_path):
    frames = [ase.build.molecule("H2O")]
    for name, seed in (("model_12.ckpt", 1), ("model_5.ckpt", 2), ("a.ckpt", 3)):
        torch.save(tiny_pet(seed=seed).get_checkpoint(), tmp_path / name)
    options = dict(outputs=["energy"], features=[], max_lambda=1)

    named = [tmp_path / "model_12.ckpt", tmp_path / "model_5.ckpt"]
    dynamics = msym.training_dynamics(named, frames, **options)
    assert dynamics.epoch_source == "file name"
    assert dynamics.epochs == [5, 12]
    assert dynamics.checkpoints == [str(path) for path in named[::-1]]
    direct = msym.analyze(epoch_weights(named[0]), frames, ["energy"], max_lambda=1)
    assert torch.equal(
        dynamics.spectrum["energy"].block().values[1],
        direct.spectrum["energy"].block().values[0],
    )

    unnamed = [tmp_path / "model_12.ckpt", tmp_path / "a.ckpt"]
    dynamics = msym.training_dynamics(unnamed, frames, **options)
    assert dynamics.epoch_source == "order"
    assert dynamics.epochs == [0, 1]
    assert dynamics.checkpoints == [str(path) for path in unnamed]


def test_checkpoints_of_one_run(training):
    frames = ase.io.read(training / "data.xyz", ":")
    (run,) = (training / "outputs").glob("*/*")
    with pytest.raises(ValueError, match="are both from epoch 2"):
        msym.training_dynamics([training / "model_2.ckpt", run / "model.ckpt"], frames)
    # mtt train writes checkpoints of other models next to the PET ones
    with pytest.raises(ValueError, match="holds a CompositionModel model but"):
        msym.training_dynamics(
            [training / "model_2.ckpt", run / "composition_model.ckpt"], frames
        )
