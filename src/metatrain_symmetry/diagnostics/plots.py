"""Plots of analyses: heatmaps of mean spectra."""

from __future__ import annotations

from pathlib import Path

import torch

from .result import AnalysisResult


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
