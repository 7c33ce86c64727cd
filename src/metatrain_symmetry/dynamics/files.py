"""Files of the dynamics: spectra as metatensor files, CSV and Markdown tables,
and the plots."""

from __future__ import annotations

import os
from pathlib import Path

import metatensor.torch as mts

from ..diagnostics.files import file_stem
from ..irreps import irrep_name, spectrum_irreps
from .plots import plot_dynamics, plot_layers
from .result import TrainingDynamics


def _irrep_labels(max_lambda: int) -> list[str]:
    return [irrep_name(lam, sigma) for lam, sigma in spectrum_irreps(max_lambda)]


def dynamics_csv(dynamics: TrainingDynamics) -> str:
    """One line per output or feature and checkpoint: epoch, checkpoint, mean
    equivariance RMSE and the dataset-mean spectrum."""
    header = ["name", "epoch", "checkpoint", "equivariance_rmse_mean"]
    header += [
        f"b_{lam}_{'p' if sigma == 1 else 'm'}"
        for lam, sigma in spectrum_irreps(dynamics.max_lambda)
    ]
    lines = [",".join(header)]
    for name in dynamics.names:
        values = dynamics.spectrum[name].block().values
        rmse = dynamics.equivariance_rmse[name].mean(dim=1)
        for index, epoch in enumerate(dynamics.epochs):
            checkpoint = dynamics.checkpoints[index].replace('"', '""')
            row = [name, str(epoch), f'"{checkpoint}"', f"{float(rmse[index]):.6e}"]
            row += [f"{float(value):.6e}" for value in values[index]]
            lines.append(",".join(row))
    return "\n".join(lines) + "\n"


def dynamics_markdown(dynamics: TrainingDynamics) -> str:
    """Markdown summary: one table per output or feature, one row per epoch."""
    source = {
        "checkpoint": "stored in the checkpoints",
        "file name": "read from the file names",
        "order": "unknown: checkpoints are numbered in the order given",
    }[dynamics.epoch_source]
    if dynamics.grid.degree is None:
        grid = f"{len(dynamics.grid)} Haar-random O(3) elements (estimates)"
    else:
        grid = (
            f"O3Grid of degree {dynamics.grid.degree} ({len(dynamics.grid)} elements)"
        )
    lines = [
        "# Symmetry across training",
        "",
        f"{len(dynamics.checkpoints)} checkpoints ({dynamics.weights} weights), "
        f"epochs {source}; {grid}. Spectra are dataset means; the "
        "equivariance RMSE is in the output's units.",
        "",
    ]
    labels = _irrep_labels(dynamics.max_lambda)
    for name in dynamics.names:
        values = dynamics.spectrum[name].block().values
        rmse = dynamics.equivariance_rmse[name].mean(dim=1)
        lines += [
            f"## `{name}`",
            "",
            "| epoch | equivariance RMSE | " + " | ".join(labels) + " |",
            "|---|---|" + "---|" * len(labels),
        ]
        for index, epoch in enumerate(dynamics.epochs):
            lines.append(
                f"| {epoch} | {float(rmse[index]):.3e} | "
                + " | ".join(f"{float(v):.4f}" for v in values[index])
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


def save_dynamics(dynamics: TrainingDynamics, directory: str | os.PathLike) -> None:
    """Write ``<name>.dynamics.mts`` (dataset-mean spectra against epoch),
    ``<name>.dynamics_per_structure.mts``, ``dynamics.csv``, ``dynamics.md``,
    ``dynamics.png`` and ``layers.png`` into an existing ``directory``."""
    directory = Path(directory)
    for name in dynamics.names:
        stem = file_stem(name)
        mts.save(str(directory / f"{stem}.dynamics.mts"), dynamics.spectrum[name])
        mts.save(
            str(directory / f"{stem}.dynamics_per_structure.mts"),
            dynamics.structure_spectrum[name],
        )
    (directory / "dynamics.csv").write_text(dynamics_csv(dynamics))
    (directory / "dynamics.md").write_text(dynamics_markdown(dynamics))
    plot_dynamics(dynamics, directory / "dynamics.png")
    plot_layers(dynamics, directory / "layers.png")
