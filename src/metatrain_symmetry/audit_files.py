"""Writing the files of an audit: the Markdown report, spectra, plots and the
interactive viewer."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import metatensor.torch as mts
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

# through the module, so that its functions can be replaced (tests interrupt the
# last file written)
from . import visualize
from .audit import AuditResult
from .irreps import irrep_name
from .report import plot_spectra, save_result


def _grid_description(grid: dict) -> str:
    if grid["kind"] == "random":
        return f"{grid['n_elements']} Haar-random elements (an estimate)"
    return f"{grid['kind']}, degree {grid['degree']}, {grid['n_elements']} elements"


def audit_markdown(summary: dict) -> str:
    """The audit summary as Markdown tables."""

    def number(value) -> str:
        return "n/a" if value is None else f"{value:.4g}"

    def estimate(value, error) -> str:
        if error is None:
            return number(value)
        return f"{number(value)} ± {number(error)}"

    irreps = summary["irreps"]
    estimated = summary["grid"].get("estimated", False)
    irrep_names = [irrep_name(lam, sigma) for lam, sigma in irreps]
    model = summary["model"]
    grid = summary["grid"]
    lines = [
        "# Symmetry audit",
        "",
        f"- model: `{model['path'] or model['name'] or 'in-memory model'}`"
        + (f" (sha256 `{model['sha256'][:16]}...`)" if model["sha256"] else ""),
        f"- dataset: {summary['dataset']['n_structures']} structures, "
        f"{summary['dataset']['n_atoms']} atoms"
        + (
            f" from `{summary['dataset']['path']}`"
            if summary["dataset"]["path"]
            else ""
        ),
        f"- O(3) grid: {_grid_description(grid)}; spectra up to lambda = "
        f"{summary['max_lambda']}",
        f"- schema version {summary['schema_version']}",
    ]
    if estimated:
        lines += [
            "",
            f"Equivariance RMSEs, spectra and leakages are Monte-Carlo estimates "
            f"from {grid['n_elements'] // 2} random rotations and their inversions, "
            "given as value ± one standard error. They are unbiased, so they can "
            "be negative where the true value is close to zero; use an exact grid "
            "(`--grid-degree`) for precise spectra.",
        ]
    lines += [
        "",
        "## Outputs",
        "",
        "Errors of the prediction on the unrotated structures (of the O(3) average "
        "in parentheses); equivariance RMSE per structure; leakage = 1 - spectral "
        "weight at the expected irreps.",
        "",
        "| output | target | MAE | RMSE | equivariance RMSE mean | median | max "
        "| mean / MAE | mean / RMSE | leakage mean | leakage max |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in summary["outputs"].items():
        target = entry["target"] or {}
        equivariance = entry["equivariance_rmse"]
        leakage = entry["leakage"] or {}
        mae = number(target.get("mae"))
        rmse = number(target.get("rmse"))
        if target:
            mae += f" ({number(target['symmetrized_mae'])})"
            rmse += f" ({number(target['symmetrized_rmse'])})"
        lines.append(
            f"| `{name}` [{entry['unit'] or '-'}] | "
            f"{'`' + target['key'] + '`' if target else 'none'} | {mae} | {rmse} | "
            f"{estimate(equivariance['mean'], equivariance.get('mean_standard_error'))}"
            f" | {number(equivariance['median'])} | "
            f"{number(equivariance['max'])} | "
            f"{number(equivariance.get('fraction_of_mae'))} | "
            f"{number(equivariance.get('fraction_of_rmse'))} | "
            f"{estimate(leakage.get('mean'), leakage.get('mean_standard_error'))} | "
            f"{number(leakage.get('max'))} |"
        )
    lines += [
        "",
        "## Mean spectra",
        "",
        "| name | " + " | ".join(irrep_names) + " |",
        "|---|" + "---|" * len(irrep_names),
    ]
    for group in ("outputs", "features"):
        for name, entry in summary[group].items():
            errors = entry.get("mean_spectrum_standard_error")
            if errors is None:
                errors = [None] * len(entry["mean_spectrum"])
            lines.append(
                f"| `{name}` | "
                + " | ".join(
                    estimate(value, error)
                    for value, error in zip(entry["mean_spectrum"], errors, strict=True)
                )
                + " |"
            )
    return "\n".join(lines) + "\n"


def spectra_tensormap(result: AuditResult) -> TensorMap:
    """All spectra in one TensorMap: key ``entry`` indexes the audited outputs
    then features (the order of ``summary["outputs"]`` then
    ``summary["features"]``); each block has samples ``["system"]`` and properties
    ``["chi_lambda", "chi_sigma"]``."""
    return _by_entry(result, result.analysis.spectrum)


def spectra_error_tensormap(result: AuditResult) -> TensorMap | None:
    """Standard errors of :py:func:`spectra_tensormap`, with the same metadata;
    ``None`` on exact grids."""
    if not result.analysis.estimated:
        return None
    return _by_entry(result, result.analysis.spectrum_error)


def _by_entry(result: AuditResult, maps: dict[str, TensorMap]) -> TensorMap:
    names = result.outputs + result.features
    blocks = []
    for name in names:
        block = maps[name].block()
        blocks.append(
            TensorBlock(
                values=block.values,
                samples=block.samples,
                components=[],
                properties=block.properties,
            )
        )
    keys = Labels(["entry"], torch.arange(len(names), dtype=torch.int32).reshape(-1, 1))
    return TensorMap(keys, blocks)


def write_audit_report(result: AuditResult, frames: Sequence, directory: Path) -> None:
    """Write every audit file into ``directory`` (which must exist): ``audit.json``,
    ``audit.md``, ``spectra.mts`` (and on random grids ``spectra_errors.mts``),
    ``spectra.png``, ``audit.chemiscope.json.gz``, ``audit.html`` and the full
    analysis TensorMaps under ``tensors/``.

    Callers wanting all-or-nothing output write into
    ``report.atomic_directory(...)``.
    """
    directory = Path(directory)
    summary = dict(result.summary)
    errors = spectra_error_tensormap(result)
    summary["files"] = {
        "spectra": "spectra.mts",
        "spectra_entries": result.outputs + result.features,
        "spectra_standard_errors": None if errors is None else "spectra_errors.mts",
    }
    (directory / "audit.json").write_text(
        json.dumps(summary, indent=2, allow_nan=False) + "\n"
    )
    (directory / "audit.md").write_text(audit_markdown(summary))
    mts.save(str(directory / "spectra.mts"), spectra_tensormap(result))
    if errors is not None:
        mts.save(str(directory / "spectra_errors.mts"), errors)
    tensors = directory / "tensors"
    tensors.mkdir()
    save_result(result.analysis, tensors)
    label = summary["model"]["name"] or Path(summary["model"]["path"] or "model").name
    plot_spectra({label: result.analysis}, directory / "spectra.png")
    dataset = visualize.chemiscope_dataset(frames, result)
    visualize.write_chemiscope(dataset, directory / "audit.chemiscope.json.gz")
    visualize.write_html_viewer(dataset, directory / "audit.html")
