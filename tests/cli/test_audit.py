"""``mtt-symmetry audit``: every file it writes, bad input, interruptions and
random rotations (on the ``audit_inputs`` and ``audit_directory`` fixtures of
``tests/conftest.py``)."""

import gzip
import hashlib
import json

import ase.build
import ase.io
import jsonschema
import metatensor.torch as mts
import pytest

from metatrain_symmetry.audit import (
    SCHEMA_VERSION,
    audit_schema,
)
from metatrain_symmetry.cli import main
from metatrain_symmetry.testing import check_clean_failure, run_mtt_symmetry
from tests.helpers import EXACT_AUDIT_FILES


def test_audit_command_writes_every_file(audit_directory, audit_inputs):
    names = sorted(path.name for path in audit_directory.iterdir())
    assert names == EXACT_AUDIT_FILES
    summary = json.loads((audit_directory / "audit.json").read_text())
    jsonschema.validate(summary, audit_schema())
    assert summary["schema_version"] == SCHEMA_VERSION
    checkpoint = (audit_inputs / "model.ckpt").read_bytes()
    assert summary["model"]["sha256"] == hashlib.sha256(checkpoint).hexdigest()
    assert list(summary["outputs"]) == ["energy", "non_conservative_force"]
    # features in the order the model computes them, not the order requested
    assert list(summary["features"]) == [
        "mtt::feature::gnn_layers.0_node",
        "mtt::feature::gnn_layers.1_node",
    ]
    assert summary["outputs"]["energy"]["target"]["key"] == "energy"

    spectra = mts.load(str(audit_directory / "spectra.mts"))
    entries = summary["files"]["spectra_entries"]
    assert len(spectra) == len(entries) == 4
    for index, name in enumerate(entries):
        group = "outputs" if name in summary["outputs"] else "features"
        mean = spectra.block({"entry": index}).values.mean(dim=0)
        assert mean.tolist() == pytest.approx(summary[group][name]["mean_spectrum"])
    report = (audit_directory / "audit.md").read_text()
    assert "`non_conservative_force`" in report
    # --infinitesimal: the screen of every output, ranked against the grid
    assert "## Infinitesimal screen" in report
    for entry in summary["outputs"].values():
        screen = entry["screen"]
        n_structures = summary["dataset"]["n_structures"]
        assert screen["rank_correlation"]["n_structures"] == n_structures
        assert screen["relative_lie_derivative"]["max"] > 0
    chemiscope = json.loads(
        gzip.decompress((audit_directory / "audit.chemiscope.json.gz").read_bytes())
    )
    assert "energy: relative Lie derivative" in chemiscope["properties"]
    assert (audit_directory / "spectra.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["missing.ckpt", "data.xyz"], "model file 'missing.ckpt' does not exist"),
        (["model.ckpt", "missing.xyz"], "data file 'missing.xyz' does not exist"),
        (["model.ckpt", "model.ckpt"], "could not read structures from 'model.ckpt'"),
        (["data.xyz", "data.xyz"], "could not read 'data.xyz'"),
        (["model.ckpt", "data.xyz", "--outputs", "dipole"], "unknown output 'dipole'"),
        (
            ["model.ckpt", "data.xyz", "--features", "mtt::feature::nope"],
            "unknown feature 'mtt::feature::nope'",
        ),
        (
            ["model.ckpt", "data.xyz", "--targets", "energy=free_energy"],
            "structure 0 has no target 'free_energy'",
        ),
        (["model.ckpt", "data.xyz", "--targets", "energy"], "OUTPUT=KEY"),
        (
            ["model.ckpt", "close.xyz"],
            "structure 1 has atoms 1 and 2 0.02 Å apart (closer than 0.1 Å)",
        ),
    ],
)
def test_audit_command_bad_input(audit_inputs, arguments, message, capsys, monkeypatch):
    """One clear line, non-zero exit, nothing written (run in-process: the
    command's main function is the entry point)."""
    monkeypatch.chdir(audit_inputs)
    arguments = ["audit", *arguments, "-o", "result"]
    check_clean_failure(main, arguments, audit_inputs, capsys, message)


def test_audit_command_allows_close_atoms_when_asked(audit_inputs, tmp_path):
    output = tmp_path / "close"
    process = run_mtt_symmetry(
        "audit",
        audit_inputs / "model.ckpt",
        audit_inputs / "close.xyz",
        "-o",
        output,
        "--allow-close-atoms",
        "--max-lambda",
        "1",
        "--grid-degree",
        "2",
    )
    assert process.returncode == 0, process.stderr
    assert "structure 1 has atoms 1 and 2 0.02 Å apart" in process.stderr
    assert json.loads((output / "audit.json").read_text())["dataset"]["n_structures"]


def test_audit_command_refuses_a_busy_directory(audit_inputs, tmp_path, capsys):
    output = tmp_path / "busy"
    output.mkdir()
    (output / "keep.txt").write_text("user data")
    arguments = [audit_inputs / "model.ckpt", audit_inputs / "data.xyz"]
    status = main(["audit", *map(str, arguments), "-o", str(output)])
    assert status != 0
    assert "--force" in capsys.readouterr().err
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_interrupted_audit_leaves_nothing(audit_inputs, tmp_path, monkeypatch):
    from metatrain_symmetry.audit import viewer

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    # the last file written: everything else is already in the staging directory
    monkeypatch.setattr(viewer, "write_html_viewer", interrupt)
    arguments = [audit_inputs / "model.ckpt", audit_inputs / "data.xyz"]
    output = tmp_path / "audit"
    status = main(
        ["audit", *map(str, arguments), "-o", str(output), "--max-lambda", "1"]
    )
    assert status == 130
    # no output directory; the completed shards are kept for a rerun to resume
    assert [p.name for p in tmp_path.iterdir()] == ["audit.partial"]
    assert (tmp_path / "audit.partial" / "manifest.json").is_file()


def test_audit_command_with_random_rotations(audit_inputs, tmp_path):
    """``--rotations N`` audits on N random elements: the equivariance error comes
    with its standard error, the report says it is an estimate, and the workload
    is announced in atoms before the pass."""
    model, data = audit_inputs / "model.ckpt", audit_inputs / "data.xyz"
    output = tmp_path / "audit"
    random_grid = ["--rotations", "16", "--seed", "3", "--max-lambda", "2"]
    process = run_mtt_symmetry("audit", model, data, "-o", output, *random_grid)
    assert process.returncode == 0, process.stderr
    n_atoms = sum(len(atoms) for atoms in ase.io.read(audit_inputs / "data.xyz", ":"))
    assert f"3 structures x 16 rotated copies = 48 copies, {16 * n_atoms} atoms" in (
        process.stderr
    )
    summary = json.loads((output / "audit.json").read_text())
    assert summary["grid"]["kind"] == "random"
    assert summary["grid"]["n_elements"] == 16
    for entry in summary["outputs"].values():
        error = entry["equivariance_rmse"]["mean_standard_error"]
        assert error is not None and 0 < error < entry["equivariance_rmse"]["mean"]
    markdown = (output / "audit.md").read_text()
    assert "16 Haar-random elements (an estimate)" in markdown
    assert " ± " in markdown
    with gzip.open(output / "audit.chemiscope.json.gz") as file:
        properties = json.load(file)["properties"]
    for name in summary["outputs"]:
        errors = properties[f"{name}: equivariance RMSE standard error"]["values"]
        # unbiased variance estimates can fall below zero: reported as 0
        assert len(errors) == 3 and min(errors) >= 0 and max(errors) > 0

    failing = tmp_path / "failing"
    process = run_mtt_symmetry(
        "audit", model, data, "-o", failing, *random_grid, "--grid-degree", "4"
    )
    assert process.returncode == 2
    assert "either --grid-degree or --rotations" in process.stderr
    assert not failing.exists()
