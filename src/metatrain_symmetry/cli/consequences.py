"""``mtt-symmetry consequences``: molecular dynamics and relaxations with the
model, its O(3) average and a random rotation per call, side by side."""

from __future__ import annotations

import argparse
from functools import partial

from ..calculators import DEFAULT_AVERAGE_DEGREE
from ..consequences import (
    ENGINES,
    EXPERIMENTS,
    Settings,
    consequences,
    consequences_markdown,
    save_consequences,
)
from ..distributed import work_directory
from . import options


DISTRIBUTED = True
"""spread over the processes of torchrun or srun"""
NAME = "consequences"
HELP = "does the breaking matter? MD and relaxations with the model and its mitigations"
USAGE = "mtt-symmetry consequences MODEL STRUCTURES -o OUTPUT [options]"
DESCRIPTION = (
    "Run molecular dynamics and relaxations of STRUCTURES with MODEL (an exported "
    ".pt or a metatrain .ckpt with an energy output) as it is ('plain'), with its "
    "O(3) average on a quadrature ('average') and in a random O(3) frame at every "
    "call ('random_rotation'), on the same initial conditions and seeds, and write "
    "consequences.json, consequences.md, plots, the trajectories (extended XYZ) and "
    "a chemiscope file. Experiments: molecule-nve (angular momentum and torque of "
    "isolated molecules), orientations (is the lab frame sampled uniformly?), "
    "observables (radial distribution functions, MSD and bond correlations of a "
    "periodic structure, with error bars) and relax (relaxed energies and their "
    "ranking)."
)

DEFAULTS = Settings()

# the command-line flags of the settings: flag, field of Settings, type, help
SETTING_OPTIONS = (
    ("--steps", "steps", int, "MD steps per trajectory, or most optimizer steps"),
    ("--time-step", "time_step_fs", float, "time step in fs"),
    ("--temperature", "temperature_K", float, "temperature in K"),
    ("--friction", "friction_per_fs", float, "Langevin friction in 1/fs"),
    ("--fmax", "fmax", float, "force threshold of relaxations in eV/Å"),
    ("--frames", "frames", int, "frames kept per trajectory"),
    ("--blocks", "blocks", int, "blocks of the block-averaged errors"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model_and_data(parser)
    options.add_output_directory(parser)
    parser.add_argument(
        "--experiments",
        nargs="+",
        choices=EXPERIMENTS,
        default=None,
        help="experiments to run (default: every one that applies to the structures: "
        "molecule-nve and orientations to molecules, observables to the first "
        "periodic structure, relax to all)",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default=ENGINES[0],
        help="what integrates the molecular dynamics: ASE, or i-PI (pip install "
        f"ipi) from the same initial state (default: {ENGINES[0]})",
    )
    for flag, field, kind, text in SETTING_OPTIONS:
        default = getattr(DEFAULTS, field)
        parser.add_argument(
            flag,
            dest=field,
            type=kind,
            default=default,
            help=f"{text} (default: {default})",
        )
    parser.add_argument(
        "--observables-structure",
        type=int,
        default=None,
        metavar="INDEX",
        help="the periodic structure of observables (default: the first)",
    )
    options.add_grid(
        parser,
        max_lambda=False,
        degree_help="Lebedev degree of the average's quadrature "
        f"(default: {DEFAULT_AVERAGE_DEGREE})",
        seed_help="seed of velocities, thermostat, random frames and --rotations",
    )
    options.add_device(parser)


def run(args: argparse.Namespace) -> None:
    output = options.output_directory(args)
    work_dir = work_directory(output)
    settings = Settings(
        seed=args.seed,
        **{field: getattr(args, field) for _, field, _, _ in SETTING_OPTIONS},
    )
    settings.check({field: flag for flag, field, _, _ in SETTING_OPTIONS})
    result = consequences(
        args.model,
        args.data,
        experiments=args.experiments,
        settings=settings,
        grid=options.grid_from_args(args),
        observables_structure=args.observables_structure,
        batch_size=args.batch_size,
        device=args.device,
        progress=True,
        distributed=args.context.is_distributed,
        work_dir=work_dir,
        allow_close_atoms=args.allow_close_atoms,
        engine=args.engine,
    )
    if result is None:
        return
    options.write_output(output, partial(save_consequences, result), work_dir)
    print(consequences_markdown(result))
    print(f"results written to {output}/")
