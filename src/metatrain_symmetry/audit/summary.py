"""The summary of an audit as written to ``audit.json``, and its JSON schema.

The summary is a function of the audit's numbers and of the identity of the
model and the dataset, recorded when the audit is made
(:py:mod:`metatrain_symmetry.identity`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from importlib import resources

import torch

from .._version import __version__
from ..diagnostics import AnalysisResult
from ..irreps import spectrum_irreps
from ..models import LoadedModel
from ..quantities import expected_irreps


SCHEMA_VERSION = "1.3"
"""Version of the ``audit.json`` schema; the major number changes when a field
changes meaning or disappears."""


def _number(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _statistics(values: torch.Tensor) -> dict:
    """Mean, median and max of the values that are defined (not NaN)."""
    values = values[~torch.isnan(values)]
    if len(values) == 0:
        return {"mean": None, "median": None, "max": None}
    return {
        "mean": _number(values.mean()),
        "median": _number(values.median()),
        "max": _number(values.max()),
    }


def describe_outputs(model: LoadedModel, outputs: Sequence[str]) -> dict[str, dict]:
    """Per audited output, its ``unit`` and ``sample_kind`` (``"system"`` or
    ``"atom"``) as the summary reports them."""
    declared = model.outputs
    return {
        name: {
            "unit": (
                declared[name].unit if name in declared else _derived_unit(name, model)
            ),
            "sample_kind": (
                "atom" if name == "forces" else model.natural_sample_kind(name)
            ),
        }
        for name in outputs
    }


def leakage(
    analysis: AnalysisResult, name: str
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Per-structure symmetry leakage ``1 - b`` at the expected irreps of
    ``name`` and its standard error (``None`` on exact grids), both
    ``(n_structures,)``; ``None`` when no irrep is expected."""
    irreps = expected_irreps(name)
    if irreps is None:
        return None
    kept, error = analysis.spectrum_sum(name, irreps)
    return 1.0 - kept, error


def audit_summary(
    analysis: AnalysisResult,
    model: dict,
    dataset: dict,
    outputs: dict[str, dict],
    features: Sequence[str],
    comparisons: dict[str, tuple[str, list, list]],
    screens: dict[str, tuple[dict, torch.Tensor]] | None = None,
) -> dict:
    """The JSON-ready summary of an audit (``audit.json``, see
    :py:func:`audit_schema`).

    :param analysis: the rotational analysis of the outputs and features
    :param model: see :py:func:`~metatrain_symmetry.identity.model_identity`
    :param dataset: see :py:func:`~metatrain_symmetry.identity.dataset_identity`
    :param outputs: audited outputs, described as by :py:func:`describe_outputs`
    :param features: audited features
    :param comparisons: per output with a target, ``(dataset key, predictions,
        references)``, each a list over structures of ``(n_samples, n)`` tensors
    :param screens: per screened output, ``(measures, relative grid errors)``:
        the per-structure infinitesimal measures (relative Lie derivative,
        inversion error) and the grid's relative equivariance errors, each
        ``(n_structures,)``
    """
    screens = screens or {}
    grid = analysis.grid
    irreps = [[lam, sigma] for lam, sigma in spectrum_irreps(analysis.max_lambda)]
    return {
        "schema_version": SCHEMA_VERSION,
        "generator": {"name": "metatrain-symmetry", "version": __version__},
        "model": model,
        "dataset": dataset,
        "grid": {
            "kind": "lebedev" if grid.degree is not None else "random",
            "degree": grid.degree,
            "n_elements": len(grid),
            "inversion": bool(grid.inversion),
            "estimated": bool(analysis.estimated),
        },
        "max_lambda": analysis.max_lambda,
        "irreps": irreps,
        "outputs": {
            name: {
                **_output_entry(analysis, name, description, comparisons.get(name)),
                "screen": _screen_entry(screens.get(name)),
            }
            for name, description in outputs.items()
        },
        "features": {
            name: {
                "equivariance_rmse": _equivariance_statistics(analysis, name),
                **_spectrum_counts(analysis, name),
                **_mean_spectrum(analysis, name),
            }
            for name in features
        },
    }


def _output_entry(
    analysis: AnalysisResult, name: str, description: dict, comparison
) -> dict:
    """The summary of one output: its target errors, equivariance RMSE, leakage
    and mean spectrum."""
    equivariance = _equivariance_statistics(analysis, name)
    entry = {
        **description,
        "target": None,
        "equivariance_rmse": equivariance,
        "leakage": None,
        **_spectrum_counts(analysis, name),
        **_mean_spectrum(analysis, name),
    }
    if comparison is not None:
        key, predictions, references = comparison
        error = _errors(predictions, references)
        averaged = _errors(_averages(analysis, name, predictions), references)
        entry["target"] = {
            "key": key,
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
    leaked = leakage(analysis, name)
    if leaked is not None:
        irreps = expected_irreps(name)
        _, error = analysis.mean_spectrum_sum(name, irreps)
        entry["leakage"] = {
            "irreps": [list(irrep) for irrep in irreps],
            **_statistics(leaked[0]),
            "mean_standard_error": None if error is None else _number(error),
        }
    return entry


def _screen_entry(screen: tuple[dict, torch.Tensor] | None) -> dict | None:
    """The infinitesimal screen of one output: statistics of its measures, and
    the Spearman rank correlation of the relative Lie derivative with the grid's
    relative equivariance error over the structures where both are defined."""
    if screen is None:
        return None
    measures, grid = screen
    lie = measures["relative_lie_derivative"]
    defined = ~torch.isnan(lie) & ~torch.isnan(grid)
    correlation = {
        "spearman": None,
        "p_value": None,
        "n_structures": int(defined.sum()),
    }
    pairs = (lie[defined].numpy(), grid[defined].numpy())
    # a rank correlation needs three structures and values that vary
    if len(pairs[0]) >= 3 and min(len(set(values)) for values in pairs) > 1:
        from scipy.stats import spearmanr

        rho, p_value = spearmanr(*pairs)
        correlation["spearman"] = _number(rho)
        correlation["p_value"] = _number(p_value)
    return {
        "relative_lie_derivative": _statistics(lie),
        "inversion_error": _statistics(measures["inversion_error"]),
        "rank_correlation": correlation,
    }


def _equivariance_statistics(analysis: AnalysisResult, name: str) -> dict:
    """Statistics of the per-structure equivariance RMSE, with the standard error
    of their mean on random grids."""
    statistics = _statistics(analysis.equivariance_rmse(name))
    error = analysis.mean_equivariance_rmse_error.get(name)
    statistics["mean_standard_error"] = None if error is None else _number(error)
    return statistics


def _derived_unit(name: str, model: LoadedModel) -> str:
    """The unit of an output derived from the energy (``forces`` or ``stress``);
    empty for any other undeclared name or an energy without unit."""
    energy = model.outputs.get("energy")
    if energy is None or energy.unit == "":
        return ""
    length = model.length_unit
    if name == "forces":
        return f"{energy.unit}/{length}"
    if name == "stress":
        return f"{energy.unit}/{length}^3"
    return ""


def _spectrum_counts(analysis: AnalysisResult, name: str) -> dict:
    """How many structures have no spectrum, because the output is zero there
    or its mean square is too noisy on a random grid."""
    zero = analysis.zero_structures[name]
    missing = torch.isnan(analysis.spectrum[name].block().values).any(dim=1)
    return {
        "zero_structures": int(zero.sum()),
        "unresolved_structures": int((missing & ~zero).sum()),
    }


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


def _averages(
    analysis: AnalysisResult, name: str, predictions: list[torch.Tensor]
) -> list[torch.Tensor]:
    """The O(3) average of each structure's prediction, shaped as it."""
    block = analysis.average[name].block()
    system = block.samples.column("system")
    values = block.values.to(torch.float64).reshape(len(system), -1)
    return [
        values[system == index].reshape(prediction.shape)
        for index, prediction in enumerate(predictions)
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
