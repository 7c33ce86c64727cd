"""``mtt-symmetry demo``: the main job end to end on data the package makes
itself."""

from __future__ import annotations

import argparse

from ..demo import DEFAULT_EPOCHS, DEFAULT_GAMMA, run_demo
from . import options


NAME = "demo"
HELP = "train a small PET on generated data and analyse its symmetry"
DESCRIPTION = (
    "Generate a small dataset with ASE's EMT calculator, train a small PET "
    "with 'mtt train' with and without the equivariance penalty, retrain "
    "the plain model's last layer for several penalty weights, audit both "
    "models and compare them."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_output_directory(parser)
    parser.add_argument(
        "--epochs",
        type=int,
        default=DEFAULT_EPOCHS,
        help=f"training epochs (default: {DEFAULT_EPOCHS})",
    )
    parser.add_argument(
        "--gamma",
        type=float,
        default=DEFAULT_GAMMA,
        help="weight of the equivariance penalty in the penalised training "
        f"(default: {DEFAULT_GAMMA:g})",
    )


def run(args: argparse.Namespace) -> None:
    run_demo(options.output_directory(args), epochs=args.epochs, gamma=args.gamma)
