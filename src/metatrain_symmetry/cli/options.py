"""The options that the sub-commands of ``mtt-symmetry`` share, with one name,
meaning, check and default each, and their reading.

Defaults come from the Python API's constants, so that ``--help`` and the
functions agree.
"""

from __future__ import annotations

import argparse
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .._utils import atomic_directory, check_output_directory
from ..data import CLOSE_ATOMS_DISTANCE
from ..diagnostics import DEFAULT_MAX_LAMBDA, MIN_RANDOM_ELEMENTS
from ..engine import CPU_ATOMS_PER_BATCH, DEFAULT_ATOMS_PER_BATCH
from ..grid import O3Grid


MODEL_HELP = "exported model (.pt) or metatrain checkpoint (.ckpt)"
DATA_HELP = "structures in any format ASE can read"
FEATURES_HELP = "internal features ('mtt::feature::<path>'), or 'all'"


def add_model_and_data(parser: argparse.ArgumentParser, model: str = MODEL_HELP):
    """The positional ``model`` and ``data`` arguments, and
    ``--allow-close-atoms``."""
    parser.add_argument("model", help=model)
    parser.add_argument("data", help=DATA_HELP)
    add_allow_close_atoms(parser)


def add_allow_close_atoms(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-close-atoms",
        action="store_true",
        help=f"go on, with a warning, with structures that have atoms closer than "
        f"{CLOSE_ATOMS_DISTANCE} Å (an error by default)",
    )


def add_output_directory(parser: argparse.ArgumentParser) -> None:
    """``-o/--output DIR`` and ``--force``."""
    parser.add_argument("-o", "--output", required=True, help="output directory")
    add_force(parser)


def add_force(parser, replaced: str = "a non-empty output directory") -> None:
    parser.add_argument("--force", action="store_true", help=f"replace {replaced}")


def add_outputs(
    parser: argparse.ArgumentParser, help: str, default=None, nargs: str = "+"
) -> None:
    """``--outputs NAME ...``: the model outputs a command works on."""
    parser.add_argument("--outputs", nargs=nargs, default=default, help=help)


def add_features(
    parser: argparse.ArgumentParser, default: tuple | None = (), help: str = ""
) -> None:
    """``--features NAME ... | all``: the internal features a command analyses
    (default: none; ``None`` leaves the choice to the command)."""
    parser.add_argument(
        "--features",
        nargs="*",
        default=None if default is None else list(default),
        help=FEATURES_HELP + help,
    )


AUDIT_TARGETS_DEFAULT = (
    "energy=energy and <force output>=forces, where the dataset has them"
)


def add_targets(
    parser: argparse.ArgumentParser, default: str = AUDIT_TARGETS_DEFAULT
) -> None:
    """``--targets OUTPUT=KEY ...``: the dataset key compared with each output."""
    parser.add_argument(
        "--targets",
        nargs="+",
        default=None,
        metavar="OUTPUT=KEY",
        help=f"dataset key of each output's target (default: {default})",
    )


def add_grid(
    parser: argparse.ArgumentParser,
    max_lambda: bool = True,
    degree_help: str | None = None,
    default_rotations: int | None = None,
    batch_unit: str = "rotated copies",
    seed_help: str = "seed of the --rotations elements",
) -> None:
    """The O(3) grid (``--grid-degree`` or ``--rotations N`` with ``--seed``),
    ``--max-lambda`` and ``--batch-size`` (counting ``batch_unit``)."""
    if max_lambda:
        parser.add_argument(
            "--max-lambda",
            type=int,
            default=DEFAULT_MAX_LAMBDA,
            help=f"largest lambda of the spectra (default: {DEFAULT_MAX_LAMBDA})",
        )
    parser.add_argument(
        "--grid-degree",
        type=int,
        default=None,
        help=degree_help
        or "degree of the exact O(3) grid (Lebedev x in-plane x inversion; "
        "default: max(2 * max-lambda, 2 L + 1), L the largest lambda of the outputs)",
    )
    default = (
        "default: the exact grid"
        if default_rotations is None
        else f"default: {default_rotations}"
    )
    parser.add_argument(
        "--rotations",
        type=int,
        default=None,
        metavar="N",
        help=f"use N Haar-random O(3) elements (N/2 rotations and their inversions, "
        f"at least {MIN_RANDOM_ELEMENTS}) instead of the exact grid: estimates with "
        f"standard errors, in a fraction of the time on large structures ({default})",
    )
    parser.add_argument("--seed", type=int, default=0, help=f"{seed_help} (default: 0)")
    add_batch_size(parser, batch_unit)


def add_batch_size(
    parser: argparse.ArgumentParser, unit: str = "rotated copies"
) -> None:
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"{unit} per model call (default: as many as fit in about "
        f"{CPU_ATOMS_PER_BATCH} atoms on a CPU, {DEFAULT_ATOMS_PER_BATCH} on a GPU)",
    )


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="device the model runs on (default: cpu)",
    )


def add_dtype(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        default=None,
        help="precision the model runs in (default: its own); float64 resolves the "
        "equivariance errors of a model trained in float32 below its round-off",
    )


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option: works as the new one, with a warning."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        kwargs.setdefault("help", f"deprecated spelling of {new}")
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(
            f"{option_string} is deprecated and will be removed; use {self.new}",
            FutureWarning,
            stacklevel=2,
        )
        setattr(namespace, self.dest, values)


# ------------------------------------------------------------------ reading
def random_grid_from_args(args: argparse.Namespace) -> O3Grid | None:
    """The random grid that ``--rotations N`` (with ``--seed``) asks for, or
    ``None``."""
    if args.rotations is None:
        return None
    return O3Grid.random(args.rotations, seed=args.seed)


def grid_from_args(args: argparse.Namespace) -> O3Grid | None:
    """The O(3) grid that ``--grid-degree`` or ``--rotations`` ask for, or ``None``
    for the API's default."""
    if args.rotations is not None and args.grid_degree is not None:
        raise ValueError("give either --grid-degree or --rotations, not both")
    if args.grid_degree is not None:
        return O3Grid(args.grid_degree)
    return random_grid_from_args(args)


def dtype_from_args(args: argparse.Namespace) -> torch.dtype | None:
    """The torch dtype that ``--dtype`` asks for, or ``None``."""
    dtype = getattr(args, "dtype", None)
    return None if dtype is None else getattr(torch, dtype)


def check_device(device: str | None) -> None:
    """Refuse ``--device cuda`` before any work where CUDA is not available."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but CUDA is not available")


def features_from_args(features: list[str] | None) -> list[str] | str | None:
    """``--features``: a list of names, ``"all"``, or ``None`` when not given."""
    return "all" if features == ["all"] else features


def parse_targets(pairs: list[str] | None) -> dict[str, str] | None:
    """``--targets OUTPUT=KEY ...`` as a dictionary, or ``None``."""
    if pairs is None:
        return None
    targets = {}
    for pair in pairs:
        output, separator, key = pair.partition("=")
        if separator == "" or output == "" or key == "":
            raise ValueError(
                f"--targets expects OUTPUT=KEY pairs (e.g. energy=energy), got '{pair}'"
            )
        targets[output] = key
    return targets


def shared_settings(args: argparse.Namespace) -> dict:
    """The shared options a command has, read and checked at once, as keyword
    arguments of the Python API: ``features``, ``targets``, ``max_lambda``,
    ``grid``, ``batch_size``, ``device`` and ``dtype``."""
    readers = {
        "features": lambda: features_from_args(args.features),
        "targets": lambda: parse_targets(args.targets),
        "max_lambda": lambda: args.max_lambda,
        "grid": lambda: grid_from_args(args),
        "batch_size": lambda: args.batch_size,
        "device": lambda: args.device,
        "dtype": lambda: dtype_from_args(args),
    }
    option = {"grid": "grid_degree"}
    return {
        name: read()
        for name, read in readers.items()
        if hasattr(args, option.get(name, name))
    }


def output_directory(args: argparse.Namespace) -> Path:
    """The ``--output`` directory, checked before any work (an existing
    non-empty directory needs ``--force``), and the device."""
    check_device(getattr(args, "device", None))
    return check_output_directory(args.output, args.force)


def check_output_file(path: str | os.PathLike, force: bool) -> Path:
    """Refuse to replace an existing file unless ``--force`` is given."""
    path = Path(path)
    if path.exists() and not force:
        raise ValueError(
            f"output '{path}' already exists; choose another name or pass --force "
            "to replace it"
        )
    return path


def write_output(
    output: Path, write: Callable[[Path], None], work_dir: Path | None = None
) -> None:
    """Write a command's output directory all at once: ``write(staging)`` fills a
    temporary directory that then replaces ``output``; the work directory of a
    resumable run is removed once the output is complete."""
    with atomic_directory(output) as staging:
        write(staging)
    if work_dir is not None:
        shutil.rmtree(work_dir, ignore_errors=True)
