"""The files of an analysis: its TensorMaps and a summary table.

Callers write into :py:func:`~metatrain_symmetry._utils.atomic_directory`, so a
failed or interrupted run leaves no partial output.
"""

from __future__ import annotations

import math
from pathlib import Path

import metatensor.torch as mts

from .result import AnalysisResult


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


def _spectrum_cell(value: float, error: float | None) -> str:
    """A mean spectral weight, ``n/a`` where no structure has a spectrum."""
    if math.isnan(value):
        return "n/a"
    return f"{value:.4f}" if error is None else f"{value:.4f} ± {error:.4f}"


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
        spectrum, errors = result.mean_spectrum(name)
        if errors is None:
            errors = [None] * len(spectrum)
        cells = [
            _spectrum_cell(float(v), None if e is None else float(e))
            for v, e in zip(spectrum, errors, strict=True)
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
