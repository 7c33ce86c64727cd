"""Writing the files of an audit: the summary and its Markdown report, spectra,
plots and the interactive viewer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import metatensor.torch as mts
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

from ..diagnostics.files import save_result
from ..diagnostics.plots import plot_spectra

# through the module, so that its functions can be replaced (tests interrupt the
# last file written)
from . import viewer
from .markdown import audit_markdown
from .result import AuditResult


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


def write_audit_report(result: AuditResult, directory: str | os.PathLike) -> None:
    """Write every audit file into ``directory`` (which must exist): ``audit.json``,
    ``audit.md``, ``spectra.mts`` (and on random grids ``spectra_errors.mts``),
    ``spectra.png``, ``audit.chemiscope.json.gz``, ``audit.html`` and the full
    analysis TensorMaps under ``tensors/``.

    Callers wanting all-or-nothing output write into
    ``atomic_directory(...)``.
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
    dataset = result.chemiscope_input()
    viewer.write_chemiscope(dataset, directory / "audit.chemiscope.json.gz")
    viewer.write_html_viewer(dataset, directory / "audit.html")
