"""The summary of an audit as written to ``audit.json``, and its JSON schema."""

from __future__ import annotations

import json
import math
from importlib import resources
from typing import TYPE_CHECKING

import torch

from ._utils import sha256_of_file
from ._version import __version__
from .diagnostics import AnalysisResult
from .irreps import spectrum_irreps
from .models import LoadedModel
from .quantities import expected_irreps


if TYPE_CHECKING:
    from .audit import AuditResult


SCHEMA_VERSION = "1.1"
"""Version of the ``audit.json`` schema; the major number changes when a field
changes meaning or disappears."""


# ---------------------------------------------------------------------- summary
def _number(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _statistics(values: torch.Tensor) -> dict:
    return {
        "mean": _number(values.mean()),
        "median": _number(values.median()),
        "max": _number(values.max()),
    }


def _metadata(model: LoadedModel) -> dict:
    metadata = model.metadata
    if metadata is None:
        return {"name": "", "description": "", "authors": [], "references": {}}
    return {
        "name": metadata.name,
        "description": metadata.description,
        "authors": list(metadata.authors),
        "references": {key: list(value) for key, value in metadata.references.items()},
    }


def audit_summary(
    result: AuditResult, model: LoadedModel, frames, model_path, data_path
) -> dict:
    """The JSON-ready summary of an audit (``audit.json``, see
    :py:func:`audit_schema`).

    :param result: the audit, whose ``summary`` is not yet set
    :param model: the audited model
    :param frames: the audited structures
    :param model_path: the model's file, or ``None``
    :param data_path: the structures' file, or ``None``
    """
    analysis = result.analysis
    grid = analysis.grid
    declared = model.outputs
    irreps = [[lam, sigma] for lam, sigma in spectrum_irreps(analysis.max_lambda)]
    summary = {
        "schema_version": SCHEMA_VERSION,
        "generator": {"name": "metatrain-symmetry", "version": __version__},
        "model": {
            "path": None if model_path is None else str(model_path),
            "sha256": None if model_path is None else sha256_of_file(model_path),
            **_metadata(model),
            "atomic_types": model.atomic_types,
            "length_unit": model.length_unit,
            "dtype": str(model.dtype).replace("torch.", ""),
        },
        "dataset": {
            "path": None if data_path is None else str(data_path),
            "sha256": None if data_path is None else sha256_of_file(data_path),
            "n_structures": len(frames),
            "n_atoms": int(sum(len(atoms) for atoms in frames)),
        },
        "grid": {
            "kind": "lebedev" if grid.degree is not None else "random",
            "degree": grid.degree,
            "n_elements": len(grid),
            "inversion": bool(grid.inversion),
            "estimated": bool(analysis.estimated),
        },
        "max_lambda": analysis.max_lambda,
        "irreps": irreps,
        "outputs": {},
        "features": {},
    }
    for name in result.outputs:
        equivariance = _equivariance_statistics(analysis, name)
        unit = declared[name].unit if name in declared else _derived_unit(name, model)
        entry = {
            "unit": unit,
            "sample_kind": (
                "atom" if name == "forces" else model.natural_sample_kind(name)
            ),
            "target": None,
            "equivariance_rmse": equivariance,
            "leakage": None,
            **_mean_spectrum(analysis, name),
        }
        if name in result.references:
            error = _errors(result.predictions[name], result.references[name])
            averaged = _errors(_averages(result, name), result.references[name])
            entry["target"] = {
                "key": result.targets[name],
                "mae": error["mae"],
                "rmse": error["rmse"],
                "symmetrized_mae": averaged["mae"],
                "symmetrized_rmse": averaged["rmse"],
            }
            for measure in ("mae", "rmse"):
                reference = error[measure]
                equivariance[f"fraction_of_{measure}"] = (
                    None
                    if not reference or equivariance["mean"] is None
                    else equivariance["mean"] / reference
                )
        leakage = result.leakage(name)
        if leakage is not None:
            irreps = expected_irreps(name)
            _, error = analysis.mean_spectrum_sum(name, irreps)
            entry["leakage"] = {
                "irreps": [list(irrep) for irrep in irreps],
                **_statistics(leakage),
                "mean_standard_error": None if error is None else _number(error),
            }
        summary["outputs"][name] = entry
    for name in result.features:
        summary["features"][name] = {
            "equivariance_rmse": _equivariance_statistics(analysis, name),
            **_mean_spectrum(analysis, name),
        }
    return summary


def _equivariance_statistics(analysis: AnalysisResult, name: str) -> dict:
    """Statistics of the per-structure equivariance RMSE, with the standard error
    of their mean on random grids."""
    statistics = _statistics(analysis.equivariance_rmse(name))
    error = analysis.mean_equivariance_rmse_error.get(name)
    statistics["mean_standard_error"] = None if error is None else _number(error)
    return statistics


def _derived_unit(name: str, model: LoadedModel) -> str:
    energy = model.outputs.get("energy")
    if energy is None or energy.unit == "":
        return ""
    length = model.length_unit
    if name == "forces":
        return f"{energy.unit}/{length}"
    return f"{energy.unit}/{length}^3"


def _mean_spectrum(analysis: AnalysisResult, name: str) -> dict:
    values, errors = analysis.mean_spectrum(name)
    return {
        "mean_spectrum": [_number(value) for value in values],
        "mean_spectrum_standard_error": (
            None if errors is None else [_number(error) for error in errors]
        ),
    }


def _errors(predictions, references) -> dict:
    differences = torch.cat(
        [(p - r).reshape(-1) for p, r in zip(predictions, references, strict=True)]
    )
    return {
        "mae": _number(differences.abs().mean()),
        "rmse": _number(differences.square().mean().sqrt()),
    }


def _averages(result: AuditResult, name: str) -> list[torch.Tensor]:
    block = result.analysis.average[name].block()
    system = block.samples.column("system")
    values = block.values.to(torch.float64).reshape(len(system), -1)
    return [
        values[system == index].reshape(prediction.shape)
        for index, prediction in enumerate(result.predictions[name])
    ]


# ----------------------------------------------------------------------- schema
def audit_schema() -> dict:
    """The JSON schema of ``audit.json`` (draft 2020-12)."""
    text = (
        resources.files("metatrain_symmetry")
        .joinpath("schemas/audit.schema.json")
        .read_text(encoding="utf8")
    )
    return json.loads(text)
