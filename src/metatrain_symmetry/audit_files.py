"""Writing the files of an audit: summary, tables, spectra, plots and the
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
from .audit import AuditResult, audit_markdown
from .report import plot_spectra, save_result


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
