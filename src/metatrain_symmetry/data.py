"""Datasets: structures read from files, and the reference values stored with them.

Every workflow that reads data (the command line, audits, retraining) goes through
these functions, so that a missing file, an unreadable file, an empty dataset or a
missing reference value always gives the same clear error.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._utils import first_line


__all__ = [
    "read_structures",
    "reference_value",
]


def read_structures(path: str | os.PathLike, what: str = "data") -> list:
    """Read every structure of a file with ASE.

    :param path: any file ASE can read
    :param what: what the file holds, for error messages (``"data"``,
        ``"training"``, ``"validation"``)
    :return: the ``ase.Atoms`` of the file, at least one
    """
    import ase.io

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file '{path}' does not exist")
    try:
        frames = ase.io.read(path, index=":")
    except Exception as error:
        message = first_line(error)
        raise ValueError(
            f"could not read structures from '{path}' with ASE ({message})"
        ) from error
    if len(frames) == 0:
        raise ValueError(f"'{path}' contains no structures")
    return frames


def reference_value(atoms, key: str) -> np.ndarray | None:
    """The reference value stored under ``key`` with a structure, looked up in
    ``atoms.info``, ``atoms.arrays`` and the results of an attached calculator, in
    that order; ``None`` when it has none.

    :raises ValueError: if the value is not numeric
    """
    if key in atoms.info:
        value = atoms.info[key]
    elif key in atoms.arrays:
        value = atoms.arrays[key]
    elif atoms.calc is not None and key in getattr(atoms.calc, "results", {}):
        value = atoms.calc.results[key]
    else:
        return None
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"the value of '{key}' is not numeric") from error
