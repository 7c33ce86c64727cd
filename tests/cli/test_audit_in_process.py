"""``mtt-symmetry audit`` in this process, where mutation testing reaches it: the
report it writes is that of the Python API on the same input, an interrupted
audit resumes, and bad input fails with one line."""

import json

import metatensor.torch as mts
import pytest
import torch

import metatrain_symmetry as msym
from metatrain_symmetry.audit import write_audit_report
from metatrain_symmetry.cli import audit as audit_command
from metatrain_symmetry.cli import options
from metatrain_symmetry.cli.main import main
from metatrain_symmetry.testing import check_clean_failure
from tests.helpers import EXACT_AUDIT_FILES


LAYER = "mtt::feature::gnn_layers.0_node"


def audit(inputs, output, *extra, data="data.xyz"):
    """Run the command, which must succeed."""
    arguments = [str(inputs / "model.ckpt"), str(inputs / data), "-o", str(output)]
    assert main(["audit", *arguments, *extra]) == 0


def assert_same_report(output, expected, directory):
    """``output`` holds the report of ``expected``, written by the API into
    ``directory``."""
    directory.mkdir()
    write_audit_report(expected, directory)
    summary = json.loads((output / "audit.json").read_text())
    assert summary == json.loads((directory / "audit.json").read_text())
    assert (output / "audit.md").read_text() == (directory / "audit.md").read_text()
    # spectra that a random grid cannot estimate are NaN
    spectra = mts.load(str(output / "spectra.mts"))
    expected_spectra = mts.load(str(directory / "spectra.mts"))
    assert mts.equal_metadata(spectra, expected_spectra)
    for block, expected_block in zip(spectra, expected_spectra, strict=True):
        torch.testing.assert_close(
            block.values, expected_block.values, rtol=1e-12, atol=1e-15, equal_nan=True
        )
    names = sorted(path.name for path in output.iterdir())
    assert names == sorted(path.name for path in directory.iterdir())
    return summary


def test_audit_writes_what_the_api_returns(audit_inputs, tmp_path, capsys, monkeypatch):
    calls = []

    def audit_function(*args, **kwargs):
        calls.append(kwargs)
        return msym.audit(*args, **kwargs)

    monkeypatch.setattr(audit_command, "audit", audit_function)
    output = tmp_path / "audit"
    audit(
        audit_inputs,
        output,
        "--features",
        LAYER,
        "--max-lambda",
        "1",
        "--grid-degree",
        "2",
    )
    printed = capsys.readouterr()
    # what the API gets but whose effect is not in the numbers
    (call,) = calls
    assert call["progress"] is True and call["distributed"] is False
    assert call["work_dir"] == tmp_path / "audit.partial"
    expected = msym.audit(
        audit_inputs / "model.ckpt",
        str(audit_inputs / "data.xyz"),
        features=[LAYER],
        max_lambda=1,
        grid=msym.O3Grid(2),
    )
    summary = assert_same_report(output, expected, tmp_path / "api")
    assert sorted(path.name for path in output.iterdir()) == EXACT_AUDIT_FILES
    assert list(summary["outputs"]) == ["energy", "non_conservative_force"]
    assert list(summary["features"]) == [LAYER]
    table = (output / "audit.md").read_text()
    assert printed.out == (
        f"{table}\naudit written to {output}/ (open {output / 'audit.html'} in a "
        "browser)\n"
    )
    # with a progress bar over the rotated copies
    assert "3 structures x 36 rotated copies" in printed.err
    # the work directory is gone
    assert sorted(path.name for path in tmp_path.iterdir()) == ["api", "audit"]


def test_outputs_and_infinitesimal_screen(audit_inputs, tmp_path):
    output = tmp_path / "audit"
    extra = ["--outputs", "energy", "--infinitesimal", "--max-lambda", "1"]
    audit(audit_inputs, output, *extra, "--rotations", "10", "--seed", "3")
    expected = msym.audit(
        audit_inputs / "model.ckpt",
        str(audit_inputs / "data.xyz"),
        outputs=["energy"],
        max_lambda=1,
        grid=msym.O3Grid.random(10, seed=3),
        infinitesimal=True,
    )
    summary = assert_same_report(output, expected, tmp_path / "api")
    assert list(summary["outputs"]) == ["energy"]
    assert "screen" in summary["outputs"]["energy"]
    assert "## Infinitesimal screen" in (output / "audit.md").read_text()


def test_close_atoms_allowed(audit_inputs, tmp_path):
    output = tmp_path / "audit"
    extra = ["--outputs", "energy", "--max-lambda", "0", "--grid-degree", "1"]
    with pytest.warns(UserWarning, match="0.02 Å apart"):
        audit(audit_inputs, output, *extra, "--allow-close-atoms", data="close.xyz")
    summary = json.loads((output / "audit.json").read_text())
    assert summary["dataset"]["n_structures"] == 3


def test_interrupted_audit_resumes(audit_inputs, tmp_path, capsys, monkeypatch):
    """An interrupted audit keeps its completed shards in ``<output>.partial``;
    the rerun uses them and removes the directory once the output is written."""
    output = tmp_path / "audit"
    extra = ["--outputs", "energy", "--max-lambda", "1", "--grid-degree", "2"]
    write_output = options.write_output

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(options, "write_output", interrupt)
    arguments = [str(audit_inputs / "model.ckpt"), str(audit_inputs / "data.xyz")]
    assert main(["audit", *arguments, "-o", str(output), *extra]) == 130
    assert capsys.readouterr().err.endswith("mtt-symmetry audit: interrupted\n")
    assert [path.name for path in tmp_path.iterdir()] == ["audit.partial"]
    assert (tmp_path / "audit.partial" / "manifest.json").is_file()

    monkeypatch.setattr(options, "write_output", write_output)
    audit(audit_inputs, output, *extra)
    # the shards were reused: no new pass over the rotated copies
    assert "rotated copies" not in capsys.readouterr().err
    assert [path.name for path in tmp_path.iterdir()] == ["audit"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["missing.ckpt", "data.xyz"], "model file 'missing.ckpt' does not exist"),
        (["model.ckpt", "missing.xyz"], "data file 'missing.xyz' does not exist"),
        (
            ["model.ckpt", "close.xyz"],
            "structure 1 has atoms 1 and 2 0.02 Å apart (closer than 0.1 Å)",
        ),
        (["model.ckpt", "data.xyz", "--outputs", "dipole"], "unknown output 'dipole'"),
        (
            ["model.ckpt", "data.xyz", "--features", "mtt::feature::nope"],
            "unknown feature 'mtt::feature::nope'",
        ),
        (
            ["model.ckpt", "data.xyz", "--targets", "energy=free_energy"],
            "structure 0 has no target 'free_energy'",
        ),
        (
            ["model.ckpt", "data.xyz", "--device", "cuda"],
            "--device cuda was requested but CUDA is not available",
        ),
    ],
)
def test_bad_input(audit_inputs, capsys, monkeypatch, arguments, message):
    monkeypatch.chdir(audit_inputs)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    arguments = ["audit", *arguments, "-o", "result"]
    message = f"mtt-symmetry audit: error: {message}"
    check_clean_failure(main, arguments, audit_inputs, capsys, message)


def test_refuses_a_busy_directory(audit_inputs, tmp_path, capsys):
    output = tmp_path / "busy"
    output.mkdir()
    (output / "keep.txt").write_text("user data")
    arguments = [str(audit_inputs / "model.ckpt"), str(audit_inputs / "data.xyz")]
    assert main(["audit", *arguments, "-o", str(output)]) == 2
    assert capsys.readouterr().err == (
        f"mtt-symmetry audit: error: output directory '{output}' exists and is not "
        "empty; choose another one or pass --force to replace it\n"
    )
    assert [path.name for path in output.iterdir()] == ["keep.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["busy"]
