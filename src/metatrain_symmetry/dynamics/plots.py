"""Plots of the dynamics: the spectra against epoch and the last checkpoint layer
by layer."""

from __future__ import annotations

import os
from pathlib import Path

from ..diagnostics.plots import hatch_unresolved, plot_spectra
from ..quantities import FEATURE_PREFIX
from .result import TrainingDynamics


def short_name(name: str) -> str:
    """A name without the ``mtt::feature::`` prefix, for plots and tables."""
    return name[len(FEATURE_PREFIX) :] if name.startswith(FEATURE_PREFIX) else name


def plot_dynamics(dynamics: TrainingDynamics, path: str | os.PathLike) -> None:
    """Heatmaps of the dataset-mean spectra against epoch: one row per output or
    feature, one column per ``sigma``; x is the epoch (checkpoint by checkpoint),
    y is ``lambda``, the colour the spectral weight on a log scale. On a random
    grid, cells within two standard errors of zero are hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    n_rows = len(dynamics.names)
    n_epochs = len(dynamics.epochs)
    fig, axes = plt.subplots(
        n_rows,
        2,
        figsize=(2 * max(3.0, 0.25 * n_epochs + 1.5) + 1.2, 1.9 * n_rows + 0.6),
        squeeze=False,
        sharex=True,
        sharey=True,
        layout="constrained",
    )
    norm = LogNorm(vmin=1e-8, vmax=1.0)
    ticks = list(range(0, n_epochs, max(1, n_epochs // 8)))
    image = None
    for row, name in enumerate(dynamics.names):
        spectrum = dynamics.spectrum_array(name).numpy()
        errors = None
        if name in dynamics.spectrum_error:
            errors = dynamics.spectrum_error[name].reshape(spectrum.shape).numpy()
        for column, sigma in enumerate((1, -1)):
            axis = axes[row, column]
            image = axis.imshow(
                spectrum[:, :, column].T.clip(min=1e-8),
                origin="lower",
                aspect="auto",
                cmap="viridis",
                norm=norm,
                interpolation="nearest",
            )
            if errors is not None:
                hatch_unresolved(axis, spectrum[:, :, column].T, errors[:, :, column].T)
            axis.set_title(
                f"{short_name(name)}, sigma = {'+1' if sigma == 1 else '-1'}",
                fontsize=9,
            )
            axis.set_yticks(range(dynamics.max_lambda + 1))
            axis.set_xticks(ticks, [str(dynamics.epochs[i]) for i in ticks])
            if column == 0:
                axis.set_ylabel("lambda")
            if row == n_rows - 1:
                axis.set_xlabel(
                    "epoch" if dynamics.epoch_source != "order" else "checkpoint"
                )
    if dynamics.spectrum_error:
        fig.suptitle(
            f"estimated from {len(dynamics.grid)} random elements; hatched: within "
            "2 standard errors of zero",
            fontsize=9,
        )
    fig.colorbar(image, ax=axes, label="mean normalized spectrum", shrink=0.9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_layers(dynamics: TrainingDynamics, path: str | os.PathLike) -> None:
    """Heatmap of the last checkpoint's spectra, features layer by layer in model
    order and then the outputs (one row each), against ``(lambda, sigma)``."""
    label = f"epoch {dynamics.epochs[-1]}"
    if dynamics.epoch_source == "order":
        label = Path(dynamics.checkpoints[-1]).name
    plot_spectra({label: dynamics.final}, Path(path))
