"""``mtt-symmetry retrain`` end to end (on the PET of the ``trained`` fixture of
``tests/conftest.py``), in a new process; ``test_retrain_in_process.py`` runs it
in this process."""

import csv

import pytest

import metatrain_symmetry as msym
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
