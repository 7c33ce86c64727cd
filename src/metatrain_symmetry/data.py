"""Datasets: structures read from files, and the reference values stored with them.

Every workflow that reads data (the command line, audits, retraining) goes through
these functions, so that a missing file, an unreadable file, an empty dataset or a
missing reference value always gives the same clear error.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ._utils import first_line


__all__ = [
    "CLOSE_ATOMS_DISTANCE",
    "check_close_atoms",
    "close_atoms_reported",
    "read_structures",
    "reference_value",
]


CLOSE_ATOMS_DISTANCE = 0.1
"""distance (in Å, periodic images included) below which two atoms of a
structure are an error in the structure: no potential describes them, and the
symmetry numbers of such a structure mean nothing"""


def check_close_atoms(frames: Sequence, allow: bool = False) -> None:
    """Refuse structures with two atoms closer than :py:data:`CLOSE_ATOMS_DISTANCE`.

    :param frames: structures; only ``ase.Atoms`` are checked (metatomic
        ``System`` objects, in the model's length unit, are left to the caller)
    :param allow: warn instead of raising
    :raises ValueError: naming the first such structure and pair of atoms
    """
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    if not isinstance(frames, (list, tuple)):
        frames = [frames]  # a single structure, as prepare_systems takes it
    for index, atoms in enumerate(frames):
        if not isinstance(atoms, Atoms):
            continue
        first, second, distances = neighbor_list("ijd", atoms, CLOSE_ATOMS_DISTANCE)
        if len(distances) == 0:
            continue
        closest = int(np.argmin(distances))
        message = (
            f"structure {index} has atoms {first[closest]} and {second[closest]} "
            f"{distances[closest]:.3g} Å apart (closer than {CLOSE_ATOMS_DISTANCE} "
            "Å), so its numbers mean nothing"
        )
        if not allow:
            raise ValueError(
                f"{message}: fix or remove it, or pass --allow-close-atoms "
                "(allow_close_atoms=True) to go on"
            )
        warnings.warn(message, stacklevel=2)


@contextlib.contextmanager
def close_atoms_reported() -> Iterator[None]:
    """Silence the close-atoms warnings raised inside the block: for a workflow
    that checked its structures and hands them on to functions that check them
    again (the training dynamics analyses them once per checkpoint)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _CLOSE_ATOMS_WARNING, UserWarning)
        yield


_CLOSE_ATOMS_WARNING = r"structure \d+ has atoms \d+ and \d+ .* apart"


def read_structures(
    path: str | os.PathLike,
    what: str = "data",
    allow_close_atoms: bool | None = False,
) -> list:
    """Read every structure of a file with ASE.

    :param path: any file ASE can read
    :param what: what the file holds, for error messages (``"data"``,
        ``"training"``, ``"validation"``)
    :param allow_close_atoms: see :py:func:`check_close_atoms`; ``None`` leaves
        the check to the function the structures go to
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
    if allow_close_atoms is not None:
        check_close_atoms(frames, allow_close_atoms)
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
