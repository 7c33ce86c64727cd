"""``mtt-symmetry retrain``: closed-form retraining of a PET's readout with an
equivariance penalty, for several penalty weights at once."""

from __future__ import annotations

import argparse
import warnings

from ..data import read_structures
from ..retrain import DEFAULT_GAMMAS, DEFAULT_N_ROTATIONS, retrain_last_layer
from . import options


NAME = "retrain"
HELP = "closed-form last-layer retraining with an equivariance penalty"
DESCRIPTION = (
    "Retrain the readout (last-layer weights and biases) of a metatrain PET "
    "checkpoint exactly, minimizing L_mu + gamma * L_sigma on the structures "
    "of DATA for every gamma; writes gamma-<value>.ckpt, pareto.csv, "
    "pareto.md and pareto.png."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model_and_data(parser, model="metatrain PET checkpoint (.ckpt)")
    options.add_output_directory(parser)
    parser.add_argument(
        "--validation", default=None, help="validation structures (ASE format)"
    )
    parser.add_argument(
        "--gamma",
        type=float,
        nargs="+",
        default=list(DEFAULT_GAMMAS),
        help="penalty weights (default: "
        + " ".join(f"{gamma:g}" for gamma in DEFAULT_GAMMAS)
        + ")",
    )
    options.add_outputs(
        parser, "targets of the model to retrain (default: all of them)"
    )
    options.add_targets(
        parser,
        "energy, forces and stress under those keys, other targets under "
        "their own name",
    )
    parser.add_argument(
        "--ridge", type=float, default=0.0, help="ridge coefficient (default: 0)"
    )
    parser.add_argument(
        "--ignore-gradients",
        action="store_true",
        help="retrain energies trained with forces on energies alone",
    )
    options.add_grid(
        parser,
        max_lambda=False,
        degree_help="degree of an exact O(3) grid instead of random rotations",
        default_rotations=DEFAULT_N_ROTATIONS,
    )
    parser.add_argument(
        "--n-rotations",
        dest="rotations",
        type=int,
        action=options.DeprecatedAlias,
        new="--rotations",
    )
    options.add_device(parser)


def run(args: argparse.Namespace) -> None:
    output = options.output_directory(args)
    grid = options.grid_from_args(args)
    outputs, label_keys = _outputs_and_keys(args)
    validation = None
    if args.validation is not None:
        validation = read_structures(
            args.validation, "validation", args.allow_close_atoms
        )
    result = retrain_last_layer(
        args.model,
        read_structures(args.data, "training", args.allow_close_atoms),
        validation=validation,
        gammas=args.gamma,
        targets=outputs,
        label_keys=label_keys,
        grid=grid,
        seed=args.seed,
        ridge=args.ridge,
        ignore_gradients=args.ignore_gradients,
        output=output,
        force=True,
        batch_size=args.batch_size,
        device=args.device,
        progress=True,
    )
    print((output / "pareto.md").read_text())
    print(
        f"{len(result.checkpoints)} checkpoints and the trade-off written to {output}/"
    )


def _outputs_and_keys(args: argparse.Namespace):
    """The targets to retrain and their dataset keys; ``--targets NAME ...``
    without keys is the old spelling of ``--outputs``."""
    if args.targets is not None and not any("=" in item for item in args.targets):
        if args.outputs is not None:
            raise ValueError(
                "--targets NAME (the old spelling of --outputs) cannot be combined "
                "with --outputs: name the targets to retrain with --outputs only"
            )
        warnings.warn(
            "--targets NAME is deprecated for the targets to retrain; use --outputs "
            "NAME (--targets OUTPUT=KEY names dataset keys, as in every command)",
            FutureWarning,
            stacklevel=2,
        )
        return args.targets, None
    return args.outputs, options.parse_targets(args.targets)
