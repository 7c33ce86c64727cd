"""The identity of a run's model and structures, as the summaries of every
workflow record it: the file (path and SHA-256), the model's metadata, the
number of structures and atoms."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ._utils import sha256_of_file
from .models import LoadedModel


__all__ = ["dataset_identity", "model_identity"]


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


def _file_identity(path: str | os.PathLike | None) -> dict:
    return {
        "path": None if path is None else str(path),
        "sha256": None if path is None else sha256_of_file(Path(path)),
    }


def model_identity(model: LoadedModel, path: str | os.PathLike | None) -> dict:
    """The ``model`` entry of a summary: its file (path and SHA-256, or
    ``None``), metadata, atomic types, length unit and dtype.

    :param path: the file the model was read from (a checkpoint or an exported
        model), or ``None`` for a model made in memory
    """
    return {
        **_file_identity(path),
        **_metadata(model),
        "atomic_types": model.atomic_types,
        "length_unit": model.length_unit,
        "dtype": str(model.dtype).replace("torch.", ""),
    }


def dataset_identity(frames: Sequence, path: str | os.PathLike | None) -> dict:
    """The ``dataset`` entry of a summary: its file (or ``None``), the
    number of structures and of atoms."""
    return {
        **_file_identity(path),
        "n_structures": len(frames),
        "n_atoms": int(sum(len(atoms) for atoms in frames)),
    }
