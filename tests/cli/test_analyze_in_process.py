"""``mtt-symmetry analyze`` in this process, where mutation testing reaches it:
the files and the summary it writes are those of the Python API on the same
input, an interrupted run resumes, and bad input fails with one line."""

import ase.io
import metatensor.torch as mts
import pytest
import torch

import metatrain_symmetry as msym
from metatrain_symmetry.cli import analyze as analyze_command
from metatrain_symmetry.cli import options
from metatrain_symmetry.cli.main import main
from metatrain_symmetry.diagnostics import file_stem, summary_table
from metatrain_symmetry.infinitesimal import infinitesimal_csv, infinitesimal_table
from metatrain_symmetry.testing import check_clean_failure
from tests.helpers import assert_same_tensors


LAYER = "mtt::feature::gnn_layers.0_node"
QUANTITIES = ("variance", "character_projection", "average", "spectrum")


def arguments(inputs, output, *extra, data=None):
    """``analyze`` of the audit inputs' checkpoint on ``data`` (default: their
    ``data.xyz``), writing ``output``."""
    model, data = inputs / "model.ckpt", data or inputs / "data.xyz"
    return ["analyze", str(model), str(data), "-o", str(output), *extra]


def test_grid_analysis_writes_what_the_api_returns(
    audit_inputs, tmp_path, capsys, monkeypatch
):
    labels = []

    def plot_spectra(results, path):
        labels.extend(results)
        return msym.diagnostics.plot_spectra(results, path)

    monkeypatch.setattr(analyze_command, "plot_spectra", plot_spectra)
    output = tmp_path / "analysis"
    extra = ["--outputs", "energy", "--features", LAYER, "--max-lambda", "1"]
    extra += ["--grid-degree", "2", "--per-atom"]
    assert main(arguments(audit_inputs, output, *extra)) == 0

    frames = ase.io.read(audit_inputs / "data.xyz", ":")
    expected = msym.analyze(
        audit_inputs / "model.ckpt",
        frames,
        ["energy", LAYER],
        max_lambda=1,
        grid=msym.O3Grid(2),
        per_atom=True,
    )
    # per-atom energies
    variance = expected.variance["energy"].block()
    assert variance.samples.names == ["system", "atom"]
    assert_same_tensors(output, expected, QUANTITIES)
    table = summary_table(expected)
    assert (output / "summary.md").read_text() == table
    printed = capsys.readouterr()
    assert printed.out == f"{table}\nresults written to {output}/\n"
    # with a progress bar over the rotated copies
    assert f"3 structures x {len(msym.O3Grid(2))} rotated copies" in printed.err
    # the spectra are labelled by the model's file name
    assert labels == ["model.ckpt"]
    assert (output / "spectra.png").read_bytes().startswith(b"\x89PNG")
    # nothing but the output directory is left
    assert [path.name for path in tmp_path.iterdir()] == ["analysis"]


def test_every_feature_in_float32_on_close_atoms(
    audit_inputs, tmp_path, capsys, monkeypatch
):
    """``--features all`` analyses every feature of the model after the outputs,
    in the precision asked for, on structures with close atoms when allowed."""
    plotted = []

    def plot_spectra(results, path):
        # the plot of 80 spectra takes long: the other tests check it
        (result,) = results.values()
        plotted.extend(result.outputs)

    monkeypatch.setattr(analyze_command, "plot_spectra", plot_spectra)
    # the water of close.xyz, whose hydrogens are 0.02 A apart
    data = tmp_path / "water.xyz"
    ase.io.write(data, ase.io.read(audit_inputs / "close.xyz", "1"))
    output = tmp_path / "analysis"
    extra = ["--outputs", "energy", "--features", "all", "--max-lambda", "0"]
    extra += ["--grid-degree", "1", "--dtype", "float32", "--allow-close-atoms"]
    with pytest.warns(UserWarning, match="the model runs in float32"):
        status = main(arguments(audit_inputs, output, *extra, data=data))
    assert status == 0

    model = msym.load_model(audit_inputs / "model.ckpt", dtype=torch.float32)
    frames = ase.io.read(data, ":")
    names = ["energy", *model.features]
    with pytest.warns(UserWarning, match="0.02 Å apart"):
        expected = msym.analyze(
            model, frames, names, 0, msym.O3Grid(1), allow_close_atoms=True
        )
    assert expected.outputs == plotted == names
    assert_same_tensors(output, expected, QUANTITIES)
    assert (output / "summary.md").read_text() == summary_table(expected)


def test_infinitesimal_writes_what_the_api_returns(audit_inputs, tmp_path, capsys):
    """Without ``--outputs``, the energy; with ``--method``, the derivatives
    taken that way."""
    output = tmp_path / "lie"
    extra = ["--features", LAYER, "--infinitesimal", "--method", "double-backward"]
    assert main(arguments(audit_inputs, output, *extra)) == 0

    frames = ase.io.read(audit_inputs / "data.xyz", ":")
    expected = msym.infinitesimal(
        audit_inputs / "model.ckpt", frames, ["energy", LAYER], method="double-backward"
    )
    assert expected.outputs == ["energy", LAYER]
    stems = ["energy", file_stem(LAYER)]
    written = sorted(path.name for path in output.iterdir())
    # the torque and the antisymmetric virial of the energy
    assert written == sorted(
        [f"{stem}.lie_derivative.mts" for stem in stems]
        + ["antisymmetric_virial.mts", "torque.mts"]
        + ["infinitesimal.md", "infinitesimal.csv"]
    )
    for name, stem in zip(expected.outputs, stems, strict=True):
        lie = mts.load(str(output / f"{stem}.lie_derivative.mts"))
        assert mts.allclose(lie, expected.lie_derivative[name], rtol=1e-10)
    for quantity in ("torque", "antisymmetric_virial"):
        tensor = mts.load(str(output / f"{quantity}.mts"))
        assert mts.allclose(tensor, getattr(expected, quantity), rtol=1e-10)
    table = infinitesimal_table(expected)
    assert (output / "infinitesimal.md").read_text() == table
    printed = capsys.readouterr()
    assert printed.out == f"{table}\nresults written to {output}/\n"
    assert "infinitesimal: 3 structures x" in printed.err
    # the command's shards sum in another order: the same numbers to round-off
    rows = (output / "infinitesimal.csv").read_text().splitlines()
    expected_rows = infinitesimal_csv(expected).splitlines()
    assert rows[0] == expected_rows[0]
    assert len(rows) == len(expected_rows) == 1 + len(frames)
    for row, expected_row in zip(rows[1:], expected_rows[1:], strict=True):
        values, expected_values = row.split(","), expected_row.split(",")
        assert [value == "" for value in values] == [
            value == "" for value in expected_values
        ]
        values = [float(value) for value in values if value]
        expected_values = [float(value) for value in expected_values if value]
        assert values == pytest.approx(expected_values, rel=1e-10, abs=1e-14)
    assert [path.name for path in tmp_path.iterdir()] == ["lie"]


@pytest.mark.parametrize("extra", [[], ["--infinitesimal"]])
def test_interrupted_run_resumes(audit_inputs, tmp_path, capsys, monkeypatch, extra):
    """An interrupted run keeps its completed shards in ``<output>.partial``;
    the rerun uses them and removes the directory once the output is written."""
    output = tmp_path / "analysis"
    command = arguments(audit_inputs, output, "--max-lambda", "1", *extra)
    command += ["--grid-degree", "2"] if not extra else []
    write_output = options.write_output

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(options, "write_output", interrupt)
    assert main(command) == 130
    assert capsys.readouterr().err.endswith("mtt-symmetry analyze: interrupted\n")
    partial = tmp_path / "analysis.partial"
    assert [path.name for path in tmp_path.iterdir()] == ["analysis.partial"]
    assert any(partial.iterdir())

    monkeypatch.setattr(options, "write_output", write_output)
    assert main(command) == 0
    assert [path.name for path in tmp_path.iterdir()] == ["analysis"]


GRID_OPTION = (
    "{} sets the grid of the grid analysis, which --infinitesimal does not use: "
    "remove one of them"
)


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--infinitesimal", "--grid-degree", "4"],
            GRID_OPTION.format("--grid-degree"),
        ),
        (["--infinitesimal", "--rotations", "8"], GRID_OPTION.format("--rotations")),
        (
            ["--infinitesimal", "--per-atom"],
            "--infinitesimal gives per-atom Lie derivatives of per-atom outputs "
            "only: remove --per-atom",
        ),
        (["--method", "forward"], "--method applies to --infinitesimal only: add it"),
        (["--outputs"], "nothing to analyse: give --outputs and/or --features"),
        (["--outputs", "--infinitesimal"], "nothing to analyse: give --outputs"),
        (["--outputs", "dipole"], "unknown output 'dipole'"),
        (["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
        (
            ["--infinitesimal", "--batch-size", "0"],
            "batch_size must be a positive integer, got 0",
        ),
        (["--features", "mtt::feature::nope"], "unknown feature 'mtt::feature::nope'"),
        (
            ["--infinitesimal", "--features", "mtt::feature::nope"],
            "unknown feature 'mtt::feature::nope'",
        ),
    ],
)
def test_bad_input(audit_inputs, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(audit_inputs)
    command = ["analyze", "model.ckpt", "data.xyz", "-o", "result", *extra]
    message = f"mtt-symmetry analyze: error: {message}"
    check_clean_failure(main, command, audit_inputs, capsys, message)


def test_close_atoms_need_to_be_allowed(audit_inputs, capsys, monkeypatch):
    monkeypatch.chdir(audit_inputs)
    command = ["analyze", "model.ckpt", "close.xyz", "-o", "result"]
    check_clean_failure(main, command, audit_inputs, capsys, "0.02 Å apart")
