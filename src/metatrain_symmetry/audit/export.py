"""Export a trained model with its symmetry audit in the model's metadata,
optionally wrapped so that it predicts O(3)-averaged outputs.

The exported file is what ``mtt export`` writes (metatrain's ``model.export``
followed by :py:meth:`metatomic.torch.AtomisticModel.save`), with the audit
summary as JSON under ``metadata().extra["symmetry-audit"]``. With
``symmetrize=True`` the model is wrapped with
:py:class:`metatomic.torch.o3.SymmetrizedModel`: every output is replaced by its
average over an O(3) quadrature, and ``o3::variance::<name>`` outputs give the
equivariance variance at run time.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from metatomic.torch import AtomisticModel, ModelMetadata

from .._utils import atomic_file, first_line
from ..diagnostics import DEFAULT_MAX_LAMBDA
from ..grid import O3Grid
from ..models import load_model
from .result import AuditResult
from .run import audit


AUDIT_METADATA_KEY = "symmetry-audit"
"""key of the audit summary (JSON) in ``ModelMetadata.extra``"""
SYMMETRIZATION_METADATA_KEY = "symmetry-averaging"
"""key of the O(3) averaging settings (JSON) of a symmetrized export"""


def load_for_export(path: str | os.PathLike) -> AtomisticModel:
    """Load a metatrain checkpoint (or an exported model) as an
    :py:class:`~metatomic.torch.AtomisticModel`, as ``mtt export`` does."""
    from metatomic.torch import is_atomistic_model
    from metatrain.utils.io import load_model as load_metatrain_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    try:
        model = load_metatrain_model(str(path))
    except Exception as error:
        message = first_line(error)
        raise ValueError(
            f"could not read '{path}' as a metatrain checkpoint or exported model "
            f"({type(error).__name__}: {message})"
        ) from error
    if not is_atomistic_model(model):
        model = model.export()
    return model


def with_extra_metadata(model: AtomisticModel, extra: dict[str, str]) -> AtomisticModel:
    """The same model, with ``extra`` added to its ``metadata().extra``."""
    metadata = model.metadata()
    merged = dict(metadata.extra)
    merged.update(extra)
    new_metadata = ModelMetadata(
        name=metadata.name,
        description=metadata.description,
        authors=list(metadata.authors),
        references={key: list(value) for key, value in metadata.references.items()},
        extra=merged,
    )
    return AtomisticModel(model.module, new_metadata, model.capabilities())


def is_symmetrized(model: AtomisticModel) -> bool:
    """Whether ``model`` already predicts O(3) averages (a symmetrized export)."""
    return any(
        name.startswith("o3::variance::") for name in model.capabilities().outputs
    )


def symmetrize_model(
    model: AtomisticModel, grid_degree: int | None = None, batch_size: int = 32
) -> AtomisticModel:
    """Wrap ``model`` with :py:meth:`metatomic.torch.o3.SymmetrizedModel.wrap`.

    :param grid_degree: Lebedev degree of the O(3) quadrature (by default
        metatomic's choice for the model's outputs)
    :param batch_size: rotated copies per call of the wrapped model
    """
    from metatomic.torch.o3 import SymmetrizedModel

    return SymmetrizedModel.wrap(
        model, max_angular_momentum_grid=grid_degree, batch_size=batch_size
    )


def export_audited(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    data: Sequence | str | os.PathLike,
    symmetrize: bool = False,
    grid_degree: int | None = None,
    audit_grid: O3Grid | None = None,
    outputs: Sequence[str] | None = None,
    targets: dict[str, str] | None = None,
    max_lambda: int = DEFAULT_MAX_LAMBDA,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    allow_close_atoms: bool = False,
) -> AuditResult:
    """Audit a checkpoint on ``data`` and export it with the audit summary in its
    metadata.

    The file appears only once complete: it is written to a temporary file next
    to ``output`` and renamed.

    :param checkpoint: metatrain checkpoint (or exported model)
    :param output: the exported model file (``.pt``)
    :param data: structures (or a file ASE can read) for the audit
    :param symmetrize: export the O(3)-averaged model, see :py:func:`symmetrize_model`
    :param grid_degree: Lebedev degree of both the audit grid and the averaging
        quadrature (default: each chooses its own)
    :param audit_grid: the audit's grid instead, for example
        ``O3Grid.random(16)`` for a fast estimate on large structures
    :param outputs: outputs to audit, see :py:func:`audit`
    :param targets: dataset keys of the outputs, see :py:func:`audit`
    :param max_lambda: largest ``lambda`` of the audit spectra
    :param batch_size: rotated copies per model call in the audit
    :param device: run the audit on this device (default: CPU); the model is
        exported from CPU whatever the device of its audit
    :param progress: show progress bars
    :param allow_close_atoms: see :py:func:`audit`
    :return: the audit (of the model before any symmetrization)
    """
    output = _check_output_file(output)
    model = load_for_export(checkpoint)
    if symmetrize and is_symmetrized(model):
        raise ValueError(
            f"'{checkpoint}' already predicts O(3) averages; export it without "
            "--symmetrize (symmetrize=False)"
        )
    grid = audit_grid
    if grid is None and grid_degree is not None:
        grid = O3Grid(grid_degree)
    # the audit moves the model it is given to ``device`` (with state that PET
    # moves lazily, outside its parameters): a copy keeps the exported model on CPU
    audited = load_model(model if device is None else copy.deepcopy(model))
    # identified in the audit by the checkpoint it was exported from
    audited.source = str(checkpoint)
    settings = {"max_lambda": max_lambda, "grid": grid, "batch_size": batch_size}
    result = audit(
        audited,
        data,
        outputs,
        targets=targets,
        device=device,
        progress=progress,
        allow_close_atoms=allow_close_atoms,
        **settings,
    )
    model = _with_audit(model, result.summary, symmetrize, grid_degree)
    with atomic_file(output) as temporary:
        model.save(str(temporary))
    return result


def _check_output_file(output: str | os.PathLike) -> Path:
    output = Path(output)
    if output.suffix != ".pt":
        raise ValueError(f"the exported model file must end with .pt, got '{output}'")
    if output.is_dir():
        raise ValueError(f"output '{output}' is a directory")
    return output


def _with_audit(
    model: AtomisticModel, summary: dict, symmetrize: bool, grid_degree: int | None
) -> AtomisticModel:
    """The model with the audit summary in its metadata, wrapped to predict O(3)
    averages when ``symmetrize``."""
    extra = {AUDIT_METADATA_KEY: json.dumps(summary, allow_nan=False)}
    if symmetrize:
        extra[SYMMETRIZATION_METADATA_KEY] = json.dumps(
            {"averaged": True, "grid_degree": grid_degree}
        )
    model = with_extra_metadata(model, extra)
    if symmetrize:
        model = symmetrize_model(model, grid_degree)
    return model


def read_audit(model: AtomisticModel | str | os.PathLike) -> dict | None:
    """The audit summary embedded in an exported model, or ``None``.

    :param model: an exported model or the path to one
    """
    if not isinstance(model, torch.nn.Module):
        from metatomic.torch import load_atomistic_model

        model = load_atomistic_model(str(model))
    text = model.metadata().extra.get(AUDIT_METADATA_KEY)
    return None if text is None else json.loads(text)
