"""Files of the dynamics, in this process: the CSV and Markdown tables of
spectra given by hand, and every file ``save_dynamics`` writes."""

import csv
import io

import ase.build
import metatensor.torch as mts
import pytest
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

import metatrain_symmetry as msym
from metatrain_symmetry.dynamics import TrainingDynamics
from metatrain_symmetry.dynamics.files import (
    dynamics_csv,
    dynamics_markdown,
    save_dynamics,
)


SPECTRA = {
    "energy": [[0.5, 0.25, 0.125, 0.125], [1.0, 0.0, 0.0, 0.0]],
    "mtt::feature::x": [[0.0625, 0.0, 0.9375, 0.0], [0.75, 0.0, 0.0, 0.25]],
}
# per checkpoint and structure; the means are 0.25 and 0.5, 3.0 and 0.125
RMSE = {"energy": [[0.125, 0.375], [0.5, 0.5]], "mtt::feature::x": [[2, 4], [0, 0.25]]}
CHECKPOINTS = ["run/model_0.ckpt", 'run/the "last".ckpt']


def spectrum(values) -> TensorMap:
    values = torch.tensor(values, dtype=torch.float64)
    block = TensorBlock(
        values=values,
        samples=Labels(["epoch"], torch.tensor([[0], [7]])),
        components=[],
        properties=Labels(
            ["chi_lambda", "chi_sigma"],
            torch.tensor([[0, 1], [0, -1], [1, 1], [1, -1]]),
        ),
    )
    return TensorMap(Labels(["_"], torch.tensor([[0]])), [block])


def dynamics_by_hand(grid, epoch_source="checkpoint", weights="epoch"):
    """Spectra of an output and a feature at epochs 0 and 7 with ``max_lambda =
    1``, of numbers written in binary exactly."""
    return TrainingDynamics(
        checkpoints=CHECKPOINTS,
        epochs=[0, 7],
        epoch_source=epoch_source,
        names=list(SPECTRA),
        spectrum={name: spectrum(values) for name, values in SPECTRA.items()},
        structure_spectrum={},
        equivariance_rmse={
            name: torch.tensor(values, dtype=torch.float64)
            for name, values in RMSE.items()
        },
        final=None,
        grid=grid,
        max_lambda=1,
        weights=weights,
    )


def test_csv_has_one_line_per_name_and_checkpoint():
    text = dynamics_csv(dynamics_by_hand(msym.O3Grid(2)))
    assert text == (
        "name,epoch,checkpoint,equivariance_rmse_mean,b_0_p,b_0_m,b_1_p,b_1_m\n"
        'energy,0,"run/model_0.ckpt",2.500000e-01,'
        "5.000000e-01,2.500000e-01,1.250000e-01,1.250000e-01\n"
        'energy,7,"run/the ""last"".ckpt",5.000000e-01,'
        "1.000000e+00,0.000000e+00,0.000000e+00,0.000000e+00\n"
        'mtt::feature::x,0,"run/model_0.ckpt",3.000000e+00,'
        "6.250000e-02,0.000000e+00,9.375000e-01,0.000000e+00\n"
        'mtt::feature::x,7,"run/the ""last"".ckpt",1.250000e-01,'
        "7.500000e-01,0.000000e+00,0.000000e+00,2.500000e-01\n"
    )
    # what a CSV reader reads back
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [row["checkpoint"] for row in rows] == CHECKPOINTS * 2
    for row in rows:
        index = [0, 7].index(int(row["epoch"]))
        values = [float(row[key]) for key in ("b_0_p", "b_0_m", "b_1_p", "b_1_m")]
        assert values == SPECTRA[row["name"]][index]
        mean = sum(RMSE[row["name"]][index]) / 2
        assert float(row["equivariance_rmse_mean"]) == mean


def test_markdown_has_one_table_per_name():
    text = dynamics_markdown(dynamics_by_hand(msym.O3Grid(2)))
    assert text == "\n".join(
        [
            "# Symmetry across training",
            "",
            "2 checkpoints (epoch weights), epochs stored in the checkpoints; "
            f"O3Grid of degree 2 ({len(msym.O3Grid(2))} elements). Spectra are "
            "dataset means; the equivariance RMSE is in the output's units.",
            "",
            "## `energy`",
            "",
            "| epoch | equivariance RMSE | (0,+) | (0,-) | (1,+) | (1,-) |",
            "|---|---|---|---|---|---|",
            "| 0 | 2.500e-01 | 0.5000 | 0.2500 | 0.1250 | 0.1250 |",
            "| 7 | 5.000e-01 | 1.0000 | 0.0000 | 0.0000 | 0.0000 |",
            "",
            "## `mtt::feature::x`",
            "",
            "| epoch | equivariance RMSE | (0,+) | (0,-) | (1,+) | (1,-) |",
            "|---|---|---|---|---|---|",
            "| 0 | 3.000e+00 | 0.0625 | 0.0000 | 0.9375 | 0.0000 |",
            "| 7 | 1.250e-01 | 0.7500 | 0.0000 | 0.0000 | 0.2500 |",
            "",
        ]
    )


@pytest.mark.parametrize(
    "source, words",
    [
        ("file name", "epochs read from the file names"),
        ("order", "epochs unknown: checkpoints are numbered in the order given"),
    ],
)
def test_markdown_says_where_epochs_and_grid_come_from(source, words):
    grid = msym.O3Grid.random(10, seed=0)
    text = dynamics_markdown(dynamics_by_hand(grid, source, weights="best"))
    assert text.splitlines()[2] == (
        f"2 checkpoints (best weights), {words}; 10 Haar-random O(3) elements "
        "(estimates). Spectra are dataset means; the equivariance RMSE is in the "
        "output's units."
    )


@pytest.fixture(scope="module")
def dynamics(checkpoints):
    """The spectra of an output and a layer across two checkpoints of tiny
    PETs, at epochs 3 and 5 (``checkpoints`` of ``tests/conftest.py``)."""
    frames = [ase.build.molecule("H2O"), ase.build.molecule("CH4")]
    return msym.training_dynamics(
        checkpoints,
        frames,
        outputs=["energy"],
        features=["mtt::feature::gnn_layers.1_node"],
        max_lambda=1,
        grid=msym.O3Grid(2),
    )


def test_save_dynamics_writes_every_file(dynamics, tmp_path):
    save_dynamics(dynamics, tmp_path)
    stems = {"energy": "energy"}
    stems["mtt::feature::gnn_layers.1_node"] = "mtt-feature-gnn_layers.1_node"
    expected = ["dynamics.csv", "dynamics.md", "dynamics.png", "layers.png"]
    for stem in stems.values():
        expected += [f"{stem}.dynamics.mts", f"{stem}.dynamics_per_structure.mts"]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(expected)
    for name, stem in stems.items():
        written = mts.load(str(tmp_path / f"{stem}.dynamics.mts"))
        assert mts.equal(written, dynamics.spectrum[name])
        written = mts.load(str(tmp_path / f"{stem}.dynamics_per_structure.mts"))
        assert mts.equal(written, dynamics.structure_spectrum[name])
        assert written.block().samples.names == ["epoch", "system"]
    assert (tmp_path / "dynamics.csv").read_text() == dynamics_csv(dynamics)
    assert (tmp_path / "dynamics.md").read_text() == dynamics_markdown(dynamics)
    for name in ("dynamics.png", "layers.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
