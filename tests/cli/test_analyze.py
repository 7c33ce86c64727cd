"""End-to-end runs of the ``mtt-symmetry`` command."""

import json

import ase.build
import ase.io
import metatensor.torch as mts
import pytest
import torch

from metatrain_symmetry.testing import run_mtt_symmetry as mtt_symmetry
from metatrain_symmetry.testing import tiny_pet


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli")
    model = tiny_pet()
    torch.save(model.get_checkpoint(), directory / "model.ckpt")
    model.export().save(str(directory / "model.pt"))
    frames = [ase.build.molecule("CH3OH"), ase.build.molecule("H2O")]
    ase.io.write(directory / "data.xyz", frames)
    return directory


# the outputs every command below analyses
OUTPUTS = ("--outputs", "energy", "non_conservative_force")


def analyze_command(model, data, output, *options):
    return mtt_symmetry("analyze", model, data, "-o", output, *OUTPUTS, *options)


def test_analyze_end_to_end(inputs, tmp_path):
    output = tmp_path / "analysis"
    process = analyze_command(
        inputs / "model.ckpt",
        inputs / "data.xyz",
        output,
        "--features",
        "mtt::feature::gnn_layers.0_node",
        "--max-lambda",
        "2",
    )
    assert process.returncode == 0, process.stderr
    spectrum = mts.load(str(output / "non_conservative_force.spectrum.mts"))
    assert spectrum.block().values.shape == (2, 6)
    variance = mts.load(str(output / "mtt-feature-gnn_layers.0_node.variance.mts"))
    assert variance.block().samples.names == ["system", "atom"]
    assert (output / "spectra.png").stat().st_size > 0
    assert "`energy`" in (output / "summary.md").read_text()


def test_analyze_exported_model(inputs, tmp_path):
    # a fresh process knows none of the TorchScript classes of the exporting one
    output = tmp_path / "exported"
    process = analyze_command(
        inputs / "model.pt", inputs / "data.xyz", output, "--max-lambda", "1"
    )
    assert process.returncode == 0, process.stderr
    variance = mts.load(str(output / "non_conservative_force.variance.mts"))
    assert variance.block().samples.names == ["system", "atom"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["missing.ckpt", "data.xyz"], "model file 'missing.ckpt' does not exist"),
        (["model.ckpt", "missing.xyz"], "data file 'missing.xyz' does not exist"),
        (["model.ckpt", "data.xyz", "--outputs", "dipole"], "unknown output 'dipole'"),
        (
            ["model.ckpt", "data.xyz", "--features", "mtt::feature::nope"],
            "unknown feature 'mtt::feature::nope'",
        ),
        (
            ["model.ckpt", "data.xyz", "--max-lambda", "9", "--grid-degree", "4"],
            "degree",
        ),
    ],
)
def test_analyze_bad_input(inputs, arguments, message):
    process = mtt_symmetry("analyze", *arguments, "-o", "result", cwd=inputs)
    assert process.returncode != 0
    assert message in process.stderr
    assert "Traceback" not in process.stderr
    assert len(process.stderr.strip().splitlines()) == 1
    assert not (inputs / "result").exists()
    assert not any(path.name.startswith(".result") for path in inputs.iterdir())


def test_existing_output_directory_needs_force(inputs, tmp_path):
    output = tmp_path / "busy"
    output.mkdir()
    (output / "keep.txt").write_text("user data")
    process = mtt_symmetry(
        "analyze", inputs / "model.ckpt", inputs / "data.xyz", "-o", output
    )
    assert process.returncode != 0
    assert "--force" in process.stderr
    assert (output / "keep.txt").read_text() == "user data"


def test_demo_end_to_end(tmp_path):
    """The demo as a user runs it: both models learn, the penalty makes the forces
    at least three times more equivariant at a similar accuracy, and the
    closed-form sweep trades accuracy for equivariance."""
    output = tmp_path / "demo"
    process = mtt_symmetry("demo", "-o", output)
    assert process.returncode == 0, process.stdout + process.stderr
    for run in ("plain", "penalized"):
        assert (output / "training" / run / "model.pt").exists()
        audit = output / f"audit-{run}"
        for name in ("audit.json", "audit.md", "audit.html", "spectra.png"):
            assert (audit / name).stat().st_size > 0, (run, name)
        # spectra up to lambda = 2: almost all of the energy is invariant
        spectrum = mts.load(str(audit / "tensors" / "energy.spectrum.mts"))
        totals = spectrum.block().values.sum(dim=1)
        assert torch.all(totals <= 1 + 1e-9) and torch.all(totals > 0.99)
    # only the penalised run estimates and logs the penalty
    assert "L_sigma" in (output / "training" / "penalized" / "train.log").read_text()
    assert "L_sigma" not in (output / "training" / "plain" / "train.log").read_text()
    assert (output / "retrain-plain" / "pareto.png").stat().st_size > 0

    numbers = json.loads((output / "summary.json").read_text())
    plain, penalized = numbers["models"]["plain"], numbers["models"]["penalized"]
    for model in (plain, penalized):
        for entry in model.values():
            assert entry["rmse"] / entry["reference_std"] <= 0.3, numbers
            assert entry["rmse_over_reference_std"] == pytest.approx(
                entry["rmse"] / entry["reference_std"]
            )
    force = "non_conservative_force"
    assert (
        penalized[force]["equivariance_rmse"] <= plain[force]["equivariance_rmse"] / 3
    ), numbers
    assert penalized[force]["rmse"] <= 1.15 * plain[force]["rmse"], numbers
    sweep = numbers["retrain"]["outputs"][force]
    assert numbers["retrain"]["gammas"][0] == 0.0
    assert sweep["equivariance_rmse"][-1] < sweep["equivariance_rmse"][0]

    summary = (output / "summary.md").read_text()
    assert "`non_conservative_force`" in summary
    assert "equivariance penalty" in summary and "plain MSE" in summary
    assert "What the columns mean" in summary
    assert "Look at" in process.stdout
