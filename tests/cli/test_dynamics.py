"""``mtt-symmetry dynamics`` end to end on checkpoints written by ``mtt train``
(the ``training`` fixture of ``tests/conftest.py``)."""

import ase.io
import metatensor.torch as mts
import pytest
import torch

import metatrain_symmetry as msym
from metatrain_symmetry.testing import run_mtt_symmetry as mtt_symmetry
from tests.helpers import epoch_weights


LAYERS = ["mtt::feature::gnn_layers.0_node", "mtt::feature::gnn_layers.1_node"]
NAMES = ["energy", "non_conservative_force", *LAYERS]


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
