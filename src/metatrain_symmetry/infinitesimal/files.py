"""An :py:class:`InfinitesimalResult` on disk: TensorMaps, a markdown summary
and a per-structure CSV table."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import metatensor.torch as mts
import torch

from ..diagnostics import file_stem
from .result import InfinitesimalResult


__all__ = ["infinitesimal_csv", "infinitesimal_table", "save_infinitesimal"]


def save_infinitesimal(result: InfinitesimalResult, directory: Path) -> None:
    """Save ``<name>.lie_derivative.mts`` for every output, and ``torque.mts``
    and ``antisymmetric_virial.mts`` when an energy was analysed."""
    for name in result.outputs:
        path = directory / f"{file_stem(name)}.lie_derivative.mts"
        mts.save(str(path), result.lie_derivative[name])
    for quantity in ("torque", "antisymmetric_virial"):
        tensor = getattr(result, quantity)
        if tensor is not None:
            mts.save(str(directory / f"{quantity}.mts"), tensor)


def _statistic(values: torch.Tensor, reduce) -> str:
    """``reduce`` over the structures with a value, ``none`` where none has."""
    values = values[~torch.isnan(values)]
    return "none" if len(values) == 0 else f"{float(reduce(values)):.3e}"


def infinitesimal_table(result: InfinitesimalResult) -> str:
    """Markdown table: per output, the mean and largest relative Lie derivative
    and inversion error over structures, and the structures where it is zero."""
    lines = [
        "| output | relative Lie derivative (mean) | (max) | inversion error (mean) "
        "| (max) | zero structures |",
        "|---|---|---|---|---|---|",
    ]
    for name in result.outputs:
        lie = result.relative_lie_derivative[name]
        inversion = result.inversion_error[name]
        lines.append(
            f"| `{name}` | {_statistic(lie, torch.mean)} | "
            f"{_statistic(lie, torch.max)} | {_statistic(inversion, torch.mean)} | "
            f"{_statistic(inversion, torch.max)} | "
            f"{int(result.zero_structures[name].sum())} |"
        )
    lines += [
        "",
        "Relative Lie derivatives are per radian, `sqrt(sum_k |L_k f|^2 / |f|^2)`; "
        f"derivatives of model outputs by {result.method.replace('-', ' ')}. "
        "`none`: the output is zero on every structure.",
    ]
    for quantity, kind in (
        ("torque", "non-periodic"),
        ("antisymmetric_virial", "periodic"),
    ):
        tensor = getattr(result, quantity)
        if tensor is not None and len(tensor.block().samples) > 0:
            norms = tensor.block().values.flatten(1).norm(dim=1)
            label = quantity.replace("_", " ")
            lines.append(
                f"Largest {label} norm: {float(norms.max()):.3e} (energy unit) over "
                f"{len(norms)} {kind} structures."
            )
    return "\n".join(lines) + "\n"


def _cell(value: float) -> str:
    return "" if math.isnan(value) else repr(value)


def infinitesimal_csv(result: InfinitesimalResult) -> str:
    """One row per structure: the relative Lie derivative and inversion error of
    every output (empty where the output is zero), and the norms of the torque
    and the antisymmetric virial where they apply."""
    n = len(next(iter(result.relative_lie_derivative.values())))
    columns: dict[str, list[str]] = {}
    for name in result.outputs:
        for quantity in ("relative_lie_derivative", "inversion_error"):
            values = getattr(result, quantity)[name].tolist()
            columns[f"{name}:{quantity}"] = [_cell(v) for v in values]
    for quantity in ("torque", "antisymmetric_virial"):
        tensor = getattr(result, quantity)
        if tensor is None:
            continue
        column = [""] * n
        block = tensor.block()
        norms = block.values.flatten(1).norm(dim=1).tolist()
        for system, norm in zip(
            block.samples.column("system").tolist(), norms, strict=True
        ):
            column[system] = repr(norm)
        columns[f"{quantity}_norm"] = column
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["structure", *columns])
    for index in range(n):
        writer.writerow([index, *(column[index] for column in columns.values())])
    return buffer.getvalue()
