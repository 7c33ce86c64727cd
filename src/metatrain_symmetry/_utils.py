"""Helpers shared by several modules: atomic output files and directories,
progress bars, argument checks and error messages.

Every file and directory the package writes appears only once complete (it is
written under a temporary name next to its destination and renamed), and gets the
permissions the user's umask gives any new file or directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path


class OutputDirectoryError(ValueError):
    """The output directory cannot be written without losing existing files."""


def check_output_directory(path: str | os.PathLike, force: bool) -> Path:
    """Refuse to overwrite a non-empty directory unless ``force`` is set."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirectoryError(f"output '{path}' exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise OutputDirectoryError(
            f"output directory '{path}' exists and is not empty; choose another "
            "one or pass --force to replace it"
        )
    return path


def _umask() -> int:
    # the only portable way to read the umask is to set it; set it straight back
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only on success."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        # mkdtemp makes a private directory: give it the mode of a new directory
        os.chmod(staging, 0o777 & ~_umask())
        yield staging
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file name that replaces ``path`` only on success."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent
    )
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        # mkstemp makes a private file: give it the mode of a new file
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def progress_bar(
    systems: Sequence, n_copies: int, description: str, enabled: bool
) -> Iterator:
    """A tqdm progress bar over the atoms of ``n_copies`` rotated copies of each of
    ``systems`` (or one that shows nothing when not ``enabled``), closed on exit.

    Counting atoms rather than copies keeps its time estimate right when the
    structures differ in size. When enabled, the workload is announced first.
    Advance it with ``bar.update(n_atoms)``.
    """
    if not enabled:
        yield _NoProgress()
        return
    from tqdm.auto import tqdm

    n_atoms = sum(len(system) for system in systems)
    print(
        f"{description}: {len(systems)} structures x {n_copies} rotated copies = "
        f"{len(systems) * n_copies} copies, {n_atoms * n_copies} atoms",
        file=sys.stderr,
        flush=True,
    )
    bar = tqdm(total=n_atoms * n_copies, unit="atom", unit_scale=True, desc=description)
    try:
        yield bar
    finally:
        bar.close()


def first_line(error: BaseException, default: str | None = None) -> str:
    """The first line of an error's message; when it has none, ``default`` or
    else the error's type."""
    text = str(error).strip()
    if text:
        return text.splitlines()[0]
    return type(error).__name__ if default is None else default


def is_integer(value) -> bool:
    """Whether ``value`` is an integer (Python or NumPy), ``True`` and ``False``
    excluded."""
    import numpy as np

    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def name_list(values, empty: str, repeated: str) -> list[str]:
    """A name or a sequence of names as a list; ``ValueError(empty)`` when there
    are none, ``ValueError(f"{repeated}: {names}")`` when one is repeated."""
    if isinstance(values, str):
        values = [values]
    names = list(values)
    if len(names) == 0:
        raise ValueError(empty)
    if len(set(names)) != len(names):
        raise ValueError(f"{repeated}: {names}")
    return names


def sha256_of_file(path: str | os.PathLike) -> str:
    """Hexadecimal SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
