"""``mtt-symmetry analyze`` end to end, in new processes."""

import ase.build
import ase.io
import metatensor.torch as mts
import pytest
import torch

from metatrain_symmetry.testing import run_mtt_symmetry as mtt_symmetry
from metatrain_symmetry.testing import tiny_pet
from tests.helpers import assert_same_tensors


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

    # every TensorMap written is the one the Python API returns
    import metatrain_symmetry as msym

    names = ["energy", "non_conservative_force", "mtt::feature::gnn_layers.0_node"]
    expected = msym.analyze(
        inputs / "model.ckpt", ase.io.read(inputs / "data.xyz", ":"), names, 2
    )
    quantities = ("variance", "character_projection", "average", "spectrum")
    assert_same_tensors(output, expected, quantities, rtol=1e-10, atol=1e-14)
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


def test_infinitesimal_end_to_end(inputs, tmp_path):
    import metatrain_symmetry as msym

    output = tmp_path / "infinitesimal"
    process = analyze_command(
        inputs / "model.ckpt",
        inputs / "data.xyz",
        output,
        "forces",
        "--features",
        "mtt::feature::gnn_layers.0_node",
        "--infinitesimal",
    )
    assert process.returncode == 0, process.stderr
    names = ["energy", "non_conservative_force", "forces"]
    names.append("mtt::feature::gnn_layers.0_node")
    expected = msym.infinitesimal(
        inputs / "model.ckpt", ase.io.read(inputs / "data.xyz", ":"), names
    )
    for name in names:
        stem = msym.diagnostics.file_stem(name)
        lie = mts.load(str(output / f"{stem}.lie_derivative.mts"))
        assert mts.allclose(lie, expected.lie_derivative[name], rtol=1e-10)
        assert lie.block().components[0].names == ["generator"]
    torque = mts.load(str(output / "torque.mts"))
    assert mts.allclose(torque, expected.torque, rtol=1e-10)
    assert "`forces`" in (output / "infinitesimal.md").read_text()
    rows = (output / "infinitesimal.csv").read_text().splitlines()
    assert rows[0].startswith("structure,energy:relative_lie_derivative")
    assert len(rows) == 3
    value = float(rows[1].split(",")[1])
    assert value == pytest.approx(float(expected.relative_lie_derivative["energy"][0]))


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--grid-degree", "4"], "--grid-degree sets the grid of the grid analysis"),
        (["--rotations", "8"], "--rotations sets the grid of the grid analysis"),
        (["--per-atom"], "remove --per-atom"),
        (["--method", "sideways"], "invalid choice: 'sideways'"),
    ],
)
def test_infinitesimal_bad_input(inputs, arguments, message):
    process = analyze_result(inputs, "--infinitesimal", *arguments)
    assert process.returncode != 0
    assert message in process.stderr
    assert "Traceback" not in process.stderr
    assert not (inputs / "result").exists()


def test_method_needs_infinitesimal(inputs):
    process = analyze_result(inputs, "--method", "forward")
    assert process.returncode != 0
    assert "--method applies to --infinitesimal only" in process.stderr
    assert not (inputs / "result").exists()


def analyze_result(inputs, *options):
    """``analyze model.ckpt data.xyz -o result`` in ``inputs``, with ``options``."""
    return mtt_symmetry(
        "analyze", "model.ckpt", "data.xyz", "-o", "result", *options, cwd=inputs
    )
