"""``mtt-symmetry analyze``: equivariance errors, character projections,
symmetrized predictions and spectra of a model, as TensorMaps."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import read_structures
from ..diagnostics import analyze, plot_spectra, save_result, summary_table
from ..distributed import work_directory
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
    "summary table (summary.md) and spectra.png."
)


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
    options.add_grid(parser)
    options.add_device(parser)
    options.add_dtype(parser)


def run(args: argparse.Namespace) -> None:
    output = options.output_directory(args)
    settings = options.shared_settings(args)
    model = load_model(
        args.model, dtype=settings.pop("dtype"), device=settings.pop("device")
    )
    frames = read_structures(args.data, allow_close_atoms=args.allow_close_atoms)
    features = settings.pop("features")
    names = list(args.outputs) + (model.features if features == "all" else features)
    if len(names) == 0:
        raise ValueError("nothing to analyse: give --outputs and/or --features")
    model.check_names(names)
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
