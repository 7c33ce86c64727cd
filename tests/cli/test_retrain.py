"""``mtt-symmetry retrain`` end to end (on the PET of the ``trained`` fixture of
``tests/conftest.py``)."""

import csv
import warnings

import pytest

import metatrain_symmetry as msym
from metatrain_symmetry.cli import main
from metatrain_symmetry.testing import run_module as run


def test_cli_end_to_end(trained, tmp_path):
    directory, _, _ = trained
    output = tmp_path / "retrained"
    process = run(
        "metatrain_symmetry.cli",
        "retrain",
        directory / "model.ckpt",
        directory / "train.xyz",
        "--validation",
        directory / "validation.xyz",
        "--gamma",
        "0.1",
        "10",
        "--rotations",
        "4",
        "--seed",
        "3",
        "--ridge",
        "0.1",
        "-o",
        output,
    )
    assert process.returncode == 0, process.stderr[-2000:]
    names = sorted(path.name for path in output.iterdir())
    assert names == [
        "gamma-0.1.ckpt",
        "gamma-10.ckpt",
        "pareto.csv",
        "pareto.md",
        "pareto.png",
    ]
    # the table holds what the Python API gives for the same options, and each
    # option changes it: --ridge the objective, --rotations/--seed the
    # penalty's rotations, --validation the validation columns
    with (output / "pareto.csv").open() as table:
        rows = list(csv.DictReader(table))
    settings = {
        "gammas": [0.1, 10.0],
        "n_rotations": 4,
        "seed": 3,
        "ridge": 0.1,
    }
    arguments = [directory / "model.ckpt", directory / "train.xyz"]
    validation = directory / "validation.xyz"
    same = msym.retrain_last_layer(*arguments, validation, **settings)
    objective = [float(row["objective"]) for row in rows]
    assert objective == pytest.approx(same.objective.tolist(), rel=1e-8)
    for name, rmse in same.validation_rmse.items():
        column = [float(row[f"{name} val RMSE"]) for row in rows]
        assert column == pytest.approx(rmse.tolist(), rel=1e-8)
    for changed in ({"ridge": 0.0}, {"seed": 4}, {"n_rotations": 6}):
        other = msym.retrain_last_layer(*arguments, **{**settings, **changed})
        assert objective != pytest.approx(other.objective.tolist(), rel=1e-6)
        assert other.validation_rmse == {}
    failing = tmp_path / "failing"
    process = run(
        "metatrain_symmetry.cli",
        "retrain",
        directory / "model.ckpt",
        directory / "train.xyz",
        "--targets",
        "dipole",
        "-o",
        failing,
    )
    assert process.returncode == 2
    assert "unknown target 'dipole'" in process.stderr
    assert "Traceback" not in process.stderr
    assert not failing.exists()


def test_old_spelling_of_the_targets_to_retrain(audit_inputs, tmp_path, capsys):
    """``--targets NAME`` without a key still names the targets to retrain, with a
    FutureWarning, and retrains exactly what ``--outputs NAME`` does."""
    arguments = [str(audit_inputs / "model.ckpt"), str(audit_inputs / "data.xyz")]
    arguments += ["--gamma", "0", "1", "--rotations", "10"]
    with pytest.warns(FutureWarning, match="--targets NAME is deprecated"):
        status = main(
            ["retrain", *arguments, "--targets", "energy", "-o", str(tmp_path / "old")]
        )
    assert status == 0, capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        status = main(
            ["retrain", *arguments, "--outputs", "energy", "-o", str(tmp_path / "new")]
        )
    assert status == 0, capsys.readouterr().err
    old = (tmp_path / "old" / "pareto.csv").read_text()
    assert old == (tmp_path / "new" / "pareto.csv").read_text()
    header = old.splitlines()[0].split(",")
    assert "energy train L_mu" in header
    assert not any(column.startswith("non_conservative_force") for column in header)
    # with keys, --targets names the dataset keys of the targets retrained
    status = main(
        [
            "retrain",
            *arguments,
            "--outputs",
            "energy",
            "--targets",
            "energy=missing_key",
            "-o",
            str(tmp_path / "keys"),
        ]
    )
    assert status == 2
    assert "missing_key" in capsys.readouterr().err
    assert not (tmp_path / "keys").exists()


def test_old_spelling_of_the_targets_with_outputs_is_refused(
    audit_inputs, tmp_path, capsys
):
    """``--targets NAME`` (the old ``--outputs``) together with ``--outputs`` is
    ambiguous: one error line, nothing written."""
    from metatrain_symmetry.testing import check_clean_failure

    arguments = [str(audit_inputs / "model.ckpt"), str(audit_inputs / "data.xyz")]
    arguments += ["--outputs", "energy", "--targets", "energy"]
    check_clean_failure(
        main,
        ["retrain", *arguments, "-o", str(tmp_path / "out")],
        tmp_path,
        capsys,
        "cannot be combined with --outputs",
    )
