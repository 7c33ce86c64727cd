"""The files of a retraining: the trade-off tables and plot, from a hand-made
result."""

import pytest
import torch
from PIL import Image

from metatrain_symmetry.retrain import (
    RetrainResult,
    checkpoint_name,
    plot_pareto,
    write_pareto_tables,
)


def tensor(*values):
    return torch.tensor(values, dtype=torch.float64)


def hand_made(validation: bool) -> RetrainResult:
    """Two values of gamma, an energy trained with its forces."""
    result = RetrainResult(
        gammas=[0.0, 0.5],
        targets=["energy"],
        objective=tensor(1.0, 2.0),
        training_mse={"energy": tensor(0.25, 0.5), "energy/forces": tensor(4.0, 9.0)},
        training_equivariance={
            "energy": tensor(0.125, 0.0625),
            "energy/forces": tensor(1.0, 0.25),
        },
        parameters={"energy": torch.zeros(2, 3, dtype=torch.float64)},
        undetermined={"energy": torch.tensor([1, 0])},
        terms=["energy", "energy/forces"],
    )
    if validation:
        result.validation_rmse = {"energy": tensor(0.5, 0.75)}
        result.validation_equivariance_rmse = {"energy": tensor(0.01, 0.001)}
    return result


def test_pareto_tables(tmp_path):
    write_pareto_tables(hand_made(True), tmp_path / "p.csv", tmp_path / "p.md")
    columns = [
        "gamma",
        "objective",
        "energy undetermined directions",
        "energy train L_mu",
        "energy train L_sigma",
        "energy val RMSE",
        "energy val equivariance RMSE",
        "energy/forces train L_mu",
        "energy/forces train L_sigma",
    ]
    assert (tmp_path / "p.csv").read_text().splitlines() == [
        ",".join(columns),
        "0.0,1.0,1,0.25,0.125,0.5,0.01,4.0,1.0",
        "0.5,2.0,0,0.5,0.0625,0.75,0.001,9.0,0.25",
    ]
    assert (tmp_path / "p.md").read_text() == (
        "| " + " | ".join(columns) + " |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        "| 0 | 1.0000e+00 | 1 | 2.5000e-01 | 1.2500e-01 | 5.0000e-01 | 1.0000e-02 "
        "| 4.0000e+00 | 1.0000e+00 |\n"
        "| 0.5 | 2.0000e+00 | 0 | 5.0000e-01 | 6.2500e-02 | 7.5000e-01 | 1.0000e-03 "
        "| 9.0000e+00 | 2.5000e-01 |\n"
    )


def test_pareto_plot_has_a_panel_per_term(tmp_path):
    for validation in (True, False):
        path = tmp_path / f"pareto-{validation}.png"
        plot_pareto(hand_made(validation), path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # 4.5 by 4 inches per panel at 120 dots per inch
        assert Image.open(path).size == (2 * 540, 480)


def test_checkpoint_names():
    assert checkpoint_name(0.0) == "gamma-0.ckpt"
    assert checkpoint_name(0.1) == "gamma-0.1.ckpt"
    assert checkpoint_name(10.0) == "gamma-10.ckpt"
    assert checkpoint_name(1e-6) == "gamma-1e-06.ckpt"


def test_pareto_figure_shows_each_term_against_its_equivariance():
    """Each panel plots a term's error against its equivariance error, one
    labelled point per gamma: validation errors where there are some, the square
    roots of the training loss terms otherwise."""
    import matplotlib.pyplot as plt

    from metatrain_symmetry.retrain.files import pareto_figure

    for validation in (True, False):
        result = hand_made(validation)
        figure = pareto_figure(result)
        assert figure._suptitle.get_text() == (
            "closed-form readout retraining: gamma on each point"
        )
        assert [axis.get_title() for axis in figure.axes] == result.terms
        expected = {
            "energy/forces": ([1.0, 0.5], [2.0, 3.0], "sqrt(L_sigma), training"),
            "energy": (
                ([0.01, 0.001], [0.5, 0.75], "validation equivariance RMSE")
                if validation
                else ([0.125**0.5, 0.25], [0.5, 0.5**0.5], "sqrt(L_sigma), training")
            ),
        }
        for axis in figure.axes:
            x, y, label = expected[axis.get_title()]
            (line,) = axis.get_lines()
            assert line.get_xdata().tolist() == pytest.approx(x)
            assert line.get_ydata().tolist() == pytest.approx(y)
            assert line.get_marker() == "o" and line.get_linestyle() == "-"
            assert axis.get_xlabel() == label
            assert axis.get_ylabel() == label.replace("sigma", "mu").replace(
                " equivariance", ""
            )
            assert axis.get_xscale() == "log"
            annotations = axis.texts
            assert [a.get_text() for a in annotations] == ["0", "0.5"]
            points = [list(a.xy) for a in annotations]
            assert points == [
                pytest.approx([xi, yi]) for xi, yi in zip(x, y, strict=True)
            ]
            assert all(a.get_position() == (4, 4) for a in annotations)
            assert {a.get_anncoords() for a in annotations} == {"offset points"}
        plt.close(figure)
