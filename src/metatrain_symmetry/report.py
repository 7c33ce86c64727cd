"""Write analysis results to disk: TensorMaps, a summary table and a spectrum plot.

Callers write into :py:func:`~metatrain_symmetry._utils.atomic_directory`, so a
failed or interrupted run leaves no partial output.
"""

from __future__ import annotations

from pathlib import Path

import metatensor.torch as mts
import torch

from .diagnostics import AnalysisResult


def file_stem(name: str) -> str:
    """A file-name friendly version of an output or feature name."""
    return name.replace("::", "-").replace("/", "-").replace(":", "-")


def save_result(result: AnalysisResult, directory: Path) -> None:
    """Save every TensorMap of ``result`` as ``<name>.<quantity>.mts``, and on
    random grids their standard errors as ``<name>.<quantity>_error.mts``."""
    quantities = ["variance", "character_projection", "average", "spectrum"]
    if result.estimated:
        quantities += ["variance_error", "character_projection_error"]
        quantities += ["spectrum_error"]
    for name in result.outputs:
        stem = file_stem(name)
        for quantity in quantities:
            tensor = getattr(result, quantity)[name]
            mts.save(str(directory / f"{stem}.{quantity}.mts"), tensor)


def mean_spectrum(result: AnalysisResult, name: str) -> torch.Tensor:
    """Dataset-mean normalized spectrum, ``(max_lambda + 1, 2)`` with columns
    ``sigma = +1, -1``."""
    values, _ = result.mean_spectrum(name)
    return values.reshape(result.max_lambda + 1, 2)


def mean_spectrum_error(result: AnalysisResult, name: str) -> torch.Tensor | None:
    """Standard error of :py:func:`mean_spectrum` on random grids, same shape;
    ``None`` on exact grids."""
    _, errors = result.mean_spectrum(name)
    return None if errors is None else errors.reshape(result.max_lambda + 1, 2)


def summary_table(result: AnalysisResult) -> str:
    """Markdown table: per output, the equivariance RMSE over structures and the
    dominant irreps of the mean spectrum."""
    lines = [
        "| output | equivariance RMSE (mean) | (max) | "
        + " | ".join(
            f"({lam},{'+' if s == 1 else '-'})"
            for lam in range(result.max_lambda + 1)
            for s in (1, -1)
        )
        + " |",
        "|---|---|---|" + "---|" * (2 * (result.max_lambda + 1)),
    ]
    for name in result.outputs:
        rmse = result.equivariance_rmse(name)
        spectrum = mean_spectrum(result, name).reshape(-1)
        errors = mean_spectrum_error(result, name)
        if errors is None:
            cells = [f"{float(v):.4f}" for v in spectrum]
        else:
            cells = [
                f"{float(v):.4f} ± {float(e):.4f}"
                for v, e in zip(spectrum, errors.reshape(-1), strict=True)
            ]
        lines.append(
            f"| `{name}` | {float(rmse.mean()):.3e} | {float(rmse.max()):.3e} | "
            + " | ".join(cells)
            + " |"
        )
    if result.estimated:
        lines += [
            "",
            f"Spectra are Monte-Carlo estimates from {len(result.grid) // 2} random "
            "rotations and their inversions (value ± one standard error); they can "
            "be negative where the true value is close to zero.",
        ]
    return "\n".join(lines) + "\n"


def plot_spectra(results: dict[str, AnalysisResult], path: Path) -> None:
    """Heatmap of mean spectra: one row per output or feature (in the given order,
    for each labelled result), one column per ``(lambda, sigma)``.

    The colour scale is logarithmic. For random grids, cells whose estimate is
    within two standard errors of zero (negative estimates included, drawn with
    the lowest colour) are hatched: their value is not resolved by the grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    fig, axes = plt.subplots(
        1,
        len(results),
        figsize=(
            5.5 * len(results),
            0.45 * max(len(r.outputs) for r in results.values()) + 2,
        ),
        squeeze=False,
    )
    for axis, (label, result) in zip(axes[0], results.items(), strict=True):
        matrix = torch.stack(
            [mean_spectrum(result, name).reshape(-1) for name in result.outputs]
        ).numpy()
        image = axis.imshow(
            matrix.clip(min=1e-8),
            norm=LogNorm(vmin=1e-8, vmax=1.0),
            aspect="auto",
            cmap="viridis",
        )
        axis.set_xticks(range(matrix.shape[1]))
        axis.set_xticklabels(
            [
                f"{lam}{'+' if s == 1 else '-'}"
                for lam in range(result.max_lambda + 1)
                for s in (1, -1)
            ]
        )
        axis.set_yticks(range(len(result.outputs)))
        axis.set_yticklabels(
            [name.replace("mtt::feature::", "") for name in result.outputs]
        )
        axis.set_xlabel("(lambda, sigma)")
        title = label
        if result.estimated:
            errors = torch.stack(
                [
                    mean_spectrum_error(result, name).reshape(-1)
                    for name in result.outputs
                ]
            ).numpy()
            hatch_unresolved(axis, matrix, errors)
            title += (
                f"\nestimated from {len(result.grid)} random elements; "
                "hatched: within 2 standard errors of zero"
            )
        axis.set_title(title, fontsize="medium")
        fig.colorbar(image, ax=axis, label="mean normalized spectrum")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def hatch_unresolved(axis, values, errors) -> None:
    """Hatch the cells of a heatmap drawn by ``imshow`` whose estimate is within
    two standard errors of zero (negative estimates included).

    :param axis: the matplotlib axis of the heatmap
    :param values: the estimates, ``(rows, columns)`` as drawn
    :param errors: their standard errors, same shape
    """
    from matplotlib.patches import Rectangle

    unresolved = values < 2 * errors
    for row, column in zip(*unresolved.nonzero(), strict=True):
        axis.add_patch(
            Rectangle(
                (column - 0.5, row - 0.5),
                1,
                1,
                fill=False,
                hatch="///",
                edgecolor="white",
                linewidth=0,
            )
        )


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
    """Accuracy versus equivariance error, one panel per term (every target, and
    the conservative forces of an energy trained with them), one point per gamma:
    validation errors when available, training loss terms otherwise."""
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
