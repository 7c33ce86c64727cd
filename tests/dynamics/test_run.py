"""Spectra across training checkpoints: ``training_dynamics`` and
``mtt-symmetry dynamics``, end to end on checkpoints written by ``mtt train``."""

import subprocess
import sys

import ase.build
import ase.io
import metatensor.torch as mts
import pytest
import torch
from metatrain.utils.io import model_from_checkpoint

import metatrain_symmetry as msym
from metatrain_symmetry.demo import make_dataset
from metatrain_symmetry.dynamics import plot_dynamics
from metatrain_symmetry.testing import pet_options, tiny_pet, write_dataset
from metatrain_symmetry.testing import run_mtt_symmetry as mtt_symmetry


OPTIONS = pet_options(3, width=8, batch_size=3, log_interval=1, checkpoint_interval=1)

LAYERS = ["mtt::feature::gnn_layers.0_node", "mtt::feature::gnn_layers.1_node"]
NAMES = ["energy", "non_conservative_force", *LAYERS]


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """Three epochs of a tiny PET with a checkpoint after every epoch."""
    directory = tmp_path_factory.mktemp("training")
    frames = make_dataset(8)
    write_dataset(directory, frames, 6)
    ase.io.write(directory / "data.xyz", frames[6:])
    (directory / "options.yaml").write_text(OPTIONS)
    process = subprocess.run(
        [sys.executable, "-m", "metatrain", "train", "options.yaml", "-o", "model.pt"],
        cwd=directory,
        capture_output=True,
        text=True,
    )
    assert process.returncode == 0, process.stderr[-2000:]
    (run,) = (directory / "outputs").glob("*/*")
    for epoch in range(3):
        assert (run / f"model_{epoch}.ckpt").is_file()
    assert not (run / "model_3.ckpt").exists()
    for path in run.glob("model_*.ckpt"):
        path.rename(directory / path.name)
    return directory


@pytest.fixture(scope="module")
def dynamics_output(training):
    output = training / "dynamics"
    # given out of order: the result must be sorted by epoch
    process = mtt_symmetry(
        "dynamics",
        "model_2.ckpt",
        "model_0.ckpt",
        "model_1.ckpt",
        "data.xyz",
        "-o",
        output,
        "--outputs",
        "energy",
        "non_conservative_force",
        "--max-lambda",
        "1",
        cwd=training,
    )
    assert process.returncode == 0, process.stderr
    return output


def epoch_weights(path):
    checkpoint = torch.load(path, weights_only=False, map_location="cpu")
    return msym.load_model(model_from_checkpoint(checkpoint, context="restart"))


def test_cli_writes_every_file(dynamics_output):
    stems = ["energy", "non_conservative_force"]
    stems += [f"mtt-feature-gnn_layers.{i}_node" for i in range(2)]
    for stem in stems:
        spectrum = mts.load(str(dynamics_output / f"{stem}.dynamics.mts"))
        assert spectrum.block().samples.names == ["epoch"]
        assert spectrum.block().samples.values.reshape(-1).tolist() == [0, 1, 2]
        assert spectrum.block().properties.names == ["chi_lambda", "chi_sigma"]
        assert spectrum.block().values.shape == (3, 4)
        per_structure = mts.load(
            str(dynamics_output / f"{stem}.dynamics_per_structure.mts")
        )
        assert per_structure.block().samples.names == ["epoch", "system"]
        assert per_structure.block().values.shape == (6, 4)
    for name in ("dynamics.png", "layers.png"):
        assert (dynamics_output / name).stat().st_size > 0
    summary = (dynamics_output / "dynamics.md").read_text()
    assert "epochs stored in the checkpoints" in summary
    assert "`mtt::feature::gnn_layers.1_node`" in summary
    lines = (dynamics_output / "dynamics.csv").read_text().splitlines()
    assert len(lines) == 1 + 4 * 3
    assert lines[1].startswith("energy,0,")


def test_spectra_equal_direct_analysis(training, dynamics_output):
    frames = ase.io.read(training / "data.xyz", ":")
    for epoch in range(3):
        model = epoch_weights(training / f"model_{epoch}.ckpt")
        direct = msym.analyze(model, frames, NAMES, max_lambda=1)
        for name in NAMES:
            stem = name.replace("::", "-")
            saved = mts.load(str(dynamics_output / f"{stem}.dynamics.mts")).block()
            per_structure = mts.load(
                str(dynamics_output / f"{stem}.dynamics_per_structure.mts")
            ).block()
            expected = direct.spectrum[name].block().values
            rows = per_structure.samples.column("epoch") == epoch
            assert per_structure.samples.column("system")[rows].tolist() == [0, 1]
            torch.testing.assert_close(
                per_structure.values[rows], expected, rtol=1e-12, atol=1e-15
            )
            torch.testing.assert_close(
                saved.values[epoch], expected.mean(dim=0), rtol=1e-12, atol=1e-15
            )


def test_energy_spectrum_sums_to_one(dynamics_output):
    energy = mts.load(str(dynamics_output / "energy.dynamics_per_structure.mts"))
    totals = energy.block().values.sum(dim=1)
    torch.testing.assert_close(totals, torch.ones_like(totals), rtol=0, atol=1e-6)


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


def test_cli_random_grid_and_dtype(training):
    """``--rotations`` and ``--dtype`` reach the analysis: the float64 checkpoints
    run in float32 when asked, which the float32 warning shows."""
    arguments = ["model_0.ckpt", "model_1.ckpt", "data.xyz", "--outputs", "energy"]
    arguments += ["--features", "--max-lambda", "1", "--rotations", "10"]
    for dtype, warns in (("float32", True), ("float64", False)):
        output = training / f"dynamics-{dtype}"
        process = mtt_symmetry(
            "dynamics", *arguments, "--dtype", dtype, "-o", output, cwd=training
        )
        assert process.returncode == 0, process.stderr
        assert ("the model runs in float32" in process.stderr) == warns
        assert "10 Haar-random O(3) elements" in (output / "dynamics.md").read_text()


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


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["missing.ckpt", "data.xyz"], "checkpoint 'missing.ckpt' does not exist"),
        (["model_0.ckpt", "garbage.ckpt", "data.xyz"], "could not read 'garbage.ckpt'"),
        (["model_0.ckpt", "missing.xyz"], "data file 'missing.xyz' does not exist"),
        (
            ["model_0.ckpt", "data.xyz", "--outputs", "dipole"],
            "checkpoint 'model_0.ckpt': unknown output 'dipole'",
        ),
        (
            ["model_0.ckpt", "data.xyz", "--features", "mtt::feature::nope"],
            "unknown feature 'mtt::feature::nope'",
        ),
        (["model_0.ckpt"], "give at least one checkpoint and then the data file"),
    ],
)
def test_bad_input(training, arguments, message):
    (training / "garbage.ckpt").write_text("not a checkpoint\n")
    process = mtt_symmetry("dynamics", *arguments, "-o", "result", cwd=training)
    assert process.returncode != 0
    assert message in process.stderr
    assert "Traceback" not in process.stderr
    assert len(process.stderr.strip().splitlines()) == 1
    assert not (training / "result").exists()
    assert not any(path.name.startswith(".result") for path in training.iterdir())


def test_refuses_non_empty_output(training):
    output = training / "occupied"
    output.mkdir()
    (output / "keep.txt").write_text("keep")
    process = mtt_symmetry(
        "dynamics", "model_0.ckpt", "data.xyz", "-o", output, cwd=training
    )
    assert process.returncode != 0
    assert "--force" in process.stderr
    assert "Traceback" not in process.stderr
    assert len(process.stderr.strip().splitlines()) == 1
    assert [path.name for path in output.iterdir()] == ["keep.txt"]
