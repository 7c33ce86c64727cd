"""``mtt-symmetry dynamics``: spectra of outputs and features across the
checkpoints of a training run."""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from ..data import read_structures
from ..dynamics import WEIGHTS, dynamics_markdown, save_dynamics, training_dynamics
from . import options


NAME = "dynamics"
HELP = "spectra of outputs and features across training checkpoints"
USAGE = "mtt-symmetry dynamics CHECKPOINT [CHECKPOINT ...] DATA -o OUTPUT [options]"
DESCRIPTION = (
    "Analyse every CHECKPOINT of a training run (for example the "
    "model_<epoch>.ckpt files 'mtt train' writes every checkpoint_interval "
    "epochs) on the structures in DATA, and write the (lambda, sigma) "
    "spectra of outputs and internal features against epoch as TensorMaps, "
    "epoch x lambda heatmaps (dynamics.png), the last checkpoint's spectra "
    "layer by layer (layers.png) and a summary (dynamics.md, dynamics.csv)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="checkpoints (.ckpt) of one training run, then " + options.DATA_HELP,
    )
    options.add_allow_close_atoms(parser)
    options.add_output_directory(parser)
    options.add_outputs(
        parser,
        "model outputs to follow (default: the model's training targets)",
        nargs="*",
    )
    options.add_features(
        parser,
        default=None,
        help=" (default: the node features after each message-passing layer)",
    )
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        default=WEIGHTS[0],
        help="analyse the weights at each checkpoint's epoch or the best weights "
        f"so far, as 'mtt export' would (default: {WEIGHTS[0]})",
    )
    options.add_grid(parser)
    options.add_dtype(parser)


def run(args: argparse.Namespace) -> None:
    if len(args.paths) < 2:
        raise ValueError(
            "give at least one checkpoint and then the data file: "
            "mtt-symmetry dynamics CHECKPOINT [CHECKPOINT ...] DATA -o DIR"
        )
    checkpoints, data = args.paths[:-1], args.paths[-1]
    output = options.output_directory(args)
    for checkpoint in checkpoints:
        if not Path(checkpoint).exists():
            raise FileNotFoundError(f"checkpoint '{checkpoint}' does not exist")
    dynamics = training_dynamics(
        checkpoints,
        # training_dynamics() checks the structures
        read_structures(data, allow_close_atoms=None),
        outputs=args.outputs,
        **options.shared_settings(args),
        progress=True,
        weights=args.weights,
        allow_close_atoms=args.allow_close_atoms,
    )
    options.write_output(output, partial(save_dynamics, dynamics))
    print(dynamics_markdown(dynamics))
    print(f"results written to {output}/")
