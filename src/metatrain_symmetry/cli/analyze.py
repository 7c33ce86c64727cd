"""``mtt-symmetry analyze``: equivariance errors, character projections,
symmetrized predictions and spectra of a model, as TensorMaps."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import read_structures
from ..diagnostics import analyze, plot_spectra, save_result, summary_table
from ..distributed import work_directory
from ..infinitesimal import (
    METHODS,
    infinitesimal,
    infinitesimal_csv,
    infinitesimal_table,
    save_infinitesimal,
)
from ..models import load_model
from . import options


DISTRIBUTED = True
"""spread over the processes of torchrun or srun"""
NAME = "analyze"
HELP = "equivariance errors and (lambda, sigma) spectra of a model"
DESCRIPTION = (
    "Evaluate MODEL (exported .pt or metatrain .ckpt) on rotated copies of "
    "every structure in DATA and write equivariance errors, character "
    "projections, symmetrized predictions and spectra as TensorMaps, a "
    "summary table (summary.md) and spectra.png. With --infinitesimal, write "
    "instead the Lie derivatives of every output along the three generators of "
    "rotations, their inversion errors, and the torque and antisymmetric virial "
    "of the energy, from one model call per structure."
)

# the grid-analysis options that --infinitesimal has no use for
_GRID_OPTIONS = {"grid_degree": "--grid-degree", "rotations": "--rotations"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model_and_data(parser)
    options.add_output_directory(parser)
    options.add_outputs(
        parser,
        "model outputs to analyse ('forces' and 'stress' are derivatives of the "
        "energy; default: energy)",
        default=["energy"],
        nargs="*",
    )
    options.add_features(parser)
    parser.add_argument(
        "--per-atom", action="store_true", help="per-atom energies and stresses"
    )
    options.add_grid(
        parser, batch_unit="rotated copies (structures with --infinitesimal)"
    )
    parser.add_argument(
        "--infinitesimal",
        action="store_true",
        help="Lie derivatives, inversion errors, torque and antisymmetric virial "
        "(one model call per structure) instead of the grid analysis",
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="auto",
        help="with --infinitesimal: how the derivatives of model outputs are "
        "taken (default: forward mode, double backward where the model has no "
        "forward-mode derivative)",
    )
    options.add_device(parser)
    options.add_dtype(parser)


def run(args: argparse.Namespace) -> None:
    output = options.output_directory(args)
    if args.infinitesimal:
        _check_infinitesimal_options(args)
    settings = options.shared_settings(args)
    model = load_model(
        args.model, dtype=settings.pop("dtype"), device=settings.pop("device")
    )
    # analyze() and infinitesimal() check the structures
    frames = read_structures(args.data, allow_close_atoms=None)
    features = settings.pop("features")
    names = list(args.outputs) + (model.features if features == "all" else features)
    if len(names) == 0:
        raise ValueError("nothing to analyse: give --outputs and/or --features")
    model.check_names(names)
    if args.infinitesimal:
        _run_infinitesimal(args, output, model, frames, names, settings["batch_size"])
        return
    if args.method != "auto":
        raise ValueError("--method applies to --infinitesimal only: add it")
    work_dir = work_directory(output)
    result = analyze(
        model,
        frames,
        names,
        **settings,
        progress=True,
        per_atom=args.per_atom,
        distributed=args.context.is_distributed,
        work_dir=work_dir,
        allow_close_atoms=args.allow_close_atoms,
    )
    if result is None:
        return

    def write(directory: Path) -> None:
        save_result(result, directory)
        (directory / "summary.md").write_text(summary_table(result))
        plot_spectra({Path(args.model).name: result}, directory / "spectra.png")

    options.write_output(output, write, work_dir)
    print(summary_table(result))
    print(f"results written to {output}/")


def _check_infinitesimal_options(args: argparse.Namespace) -> None:
    """Refuse the options of the grid analysis that ``--infinitesimal`` ignores."""
    for option, flag in _GRID_OPTIONS.items():
        if getattr(args, option) is not None:
            raise ValueError(
                f"{flag} sets the grid of the grid analysis, which --infinitesimal "
                "does not use: remove one of them"
            )
    if args.per_atom:
        raise ValueError(
            "--infinitesimal gives per-atom Lie derivatives of per-atom outputs "
            "only: remove --per-atom"
        )


def _run_infinitesimal(args, output: Path, model, frames, names, batch_size) -> None:
    work_dir = work_directory(output)
    result = infinitesimal(
        model,
        frames,
        names,
        batch_size=batch_size,
        method=args.method,
        progress=True,
        distributed=args.context.is_distributed,
        work_dir=work_dir,
        allow_close_atoms=args.allow_close_atoms,
    )
    if result is None:
        return

    def write(directory: Path) -> None:
        save_infinitesimal(result, directory)
        (directory / "infinitesimal.md").write_text(infinitesimal_table(result))
        (directory / "infinitesimal.csv").write_text(infinitesimal_csv(result))

    options.write_output(output, write, work_dir)
    print(infinitesimal_table(result))
    print(f"results written to {output}/")
