"""The files of a retraining: the trade-off between accuracy and equivariance as
tables and a plot."""

from __future__ import annotations

from pathlib import Path


def write_pareto_tables(result, csv_path: Path, markdown_path: Path) -> None:
    """Write the rows of a :py:class:`~metatrain_symmetry.RetrainResult` as CSV and
    as a markdown table."""
    import csv

    rows = result.table()
    columns = list(rows[0])
    with open(csv_path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: repr(value) for key, value in row.items()})
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_table_cell(c, row[c]) for c in columns) + " |")
    markdown_path.write_text("\n".join(lines) + "\n")


def _table_cell(column: str, value: float | int) -> str:
    if column == "gamma":
        return f"{value:g}"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4e}"


def plot_pareto(result, path: Path) -> None:
    """Save :py:func:`pareto_figure` of ``result`` to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = pareto_figure(result)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pareto_figure(result):
    """Accuracy versus equivariance error, one panel per term (every target, and
    the conservative forces of an energy trained with them), one point per gamma:
    validation errors when available, training loss terms otherwise.

    :return: the matplotlib figure, 4.5 by 4 inches per panel
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one panel per loss term: targets, and the forces of energies trained with them
    terms = getattr(result, "terms", None) or result.targets
    fig, axes = plt.subplots(
        1, len(terms), figsize=(4.5 * len(terms), 4), squeeze=False
    )
    for axis, name in zip(axes[0], terms, strict=True):
        if name in result.validation_rmse:
            x = result.validation_equivariance_rmse[name]
            y = result.validation_rmse[name]
            axis.set_xlabel("validation equivariance RMSE")
            axis.set_ylabel("validation RMSE")
        else:
            x = result.training_equivariance[name].sqrt()
            y = result.training_mse[name].sqrt()
            axis.set_xlabel("sqrt(L_sigma), training")
            axis.set_ylabel("sqrt(L_mu), training")
        axis.plot(x.numpy(), y.numpy(), "o-")
        for gamma, xi, yi in zip(result.gammas, x.tolist(), y.tolist(), strict=True):
            axis.annotate(
                f"{gamma:g}", (xi, yi), textcoords="offset points", xytext=(4, 4)
            )
        axis.set_xscale("log")
        axis.set_title(name)
    fig.suptitle("closed-form readout retraining: gamma on each point")
    fig.tight_layout()
    return fig
