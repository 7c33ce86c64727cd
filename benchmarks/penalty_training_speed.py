"""Epoch time of training with the equivariance penalty against plain augmented
training, same model and data, measured in one run.

A small PET (``d_pet=16``, ``d_node=32``, two message-passing layers, 4 A cutoff,
float64) is trained with metatrain's own training function (what ``mtt train``
runs) on rattled and strained 8-atom copper cells labelled with ASE's EMT
calculator (energy and non-conservative forces, ``batch_size=8``), with metatrain's
default random O(3) augmentation, three ways:

- plain: ``mse`` losses;
- ``n_rotations: R`` for R = 2 and 4: ``type: equivariance`` (``gamma: 1``) on both
  targets, which evaluates R more rotated copies of every structure per step
  (forward and backward);
- ``method: generators``: the same loss penalising the squared Lie derivatives,
  from three copies of every structure evaluated in forward mode (and
  back-propagated through);
- ``method: generators`` with ``directions: random``: one copy of every
  structure, along a random direction; and with ``fraction: 0.25`` too
  (``--fraction``), the same at a random quarter of the steps;
- ``monitor: true`` with ``gamma: 0``: plain training that logs the squared Lie
  derivatives of the validation structures (at most 16) every epoch;

and, for an energy trained with its conservative forces (``mse``), against that
training:

- ``method: generators`` on the energy: the Lie derivatives of the energy from
  the strain gradient that the step computes with its forces (the derivative
  along the generators, as Orb-v3 penalises it);
- ``method: generators`` on the energy and its forces: the same copy, and the
  derivatives of the energy's Lie derivatives with respect to the positions;
- the same with ``directions: random``: one second derivative instead of three,
  and with ``fraction: 0.25`` too, at a random quarter of the steps;

and, for an energy trained with its forces and stress (EMT's), against that
training: ``method: generators`` on the energy, whose Lie derivatives come from
the stress of the step itself (no model call).

The epoch time is the time between consecutive metric log lines
(``log_interval: 1``): one epoch of training plus validation on two structures.
The first epoch is left out (warm-up); each variant's time is the median of the
remaining epochs, and each variant is trained ``--repeats`` times, interleaved,
keeping the fastest. Both the process CPU time and the wall-clock time are
reported; the CPU time, with torch limited to ``--threads`` threads (default
one), is the measure of work that other processes on a shared machine disturb
least, while wall-clock ratios are only meaningful on an otherwise idle machine.
The target is ``ratio <= 1.1 * (R + 1)`` for rotated copies, 1.5 for
``method: generators`` (both kinds of model) and 1.05 for the monitor.

Run from the repository root::

    python benchmarks/penalty_training_speed.py
    python benchmarks/penalty_training_speed.py --structures 16 --repeats 1 --threads 2
    python benchmarks/penalty_training_speed.py --variants monitor --epochs 8
"""

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


PLAIN = """\
loss:
  energy: mse
  non_conservative_force: mse
"""

PENALISED = """\
loss:
  energy: {{type: equivariance, gamma: 1.0, n_rotations: {R}}}
  non_conservative_force: {{type: equivariance, gamma: 1.0, n_rotations: {R}}}
"""

GENERATORS = """\
loss:
  energy: {type: equivariance, gamma: 1.0, method: generators}
  non_conservative_force: {type: equivariance, gamma: 1.0, method: generators}
"""
GENERATORS_TARGET = 1.5

RANDOM_GENERATORS = """\
loss:
  energy: {{type: equivariance, gamma: 1.0, method: generators, directions: random,
           fraction: {fraction}}}
  non_conservative_force:
    {{type: equivariance, gamma: 1.0, method: generators, directions: random,
     fraction: {fraction}}}
"""
# the fraction of the training steps that evaluate the cheapest penalty, by default
SAMPLED_FRACTION = 0.25

MONITORED = """\
loss:
  energy: {type: equivariance, gamma: 0.0, monitor: true}
  non_conservative_force: {type: equivariance, gamma: 0.0, monitor: true}
"""
MONITOR_TARGET = 1.05

# an energy trained with its conservative forces (and its stress)
CONSERVATIVE_PLAIN = ""
STRESS_TARGETS = """\
energy: {key: energy, unit: eV, forces: {key: forces}, stress: {key: stress}}
"""
CONSERVATIVE_ENERGY_GENERATORS = """\
loss:
  energy: {type: equivariance, gamma: 1.0, method: generators}
"""
CONSERVATIVE_GENERATORS = """\
loss:
  energy:
    type: equivariance
    gamma: 1.0
    method: generators
    forces: {type: equivariance, gamma: 1.0, method: generators}
"""
CONSERVATIVE_RANDOM_GENERATORS = """\
loss:
  energy:
    type: equivariance
    gamma: 1.0
    method: generators
    directions: random
    fraction: {fraction}
    forces:
      {{type: equivariance, gamma: 1.0, method: generators, directions: random,
       fraction: {fraction}}}
"""


def epoch_times(directory: Path, options: str) -> tuple[list[float], list[float]]:
    """Train once in ``directory``; the CPU and wall-clock seconds between
    consecutive log lines of the training loop."""
    from metatrain.cli.train import train_model
    from metatrain.utils.logging import MetricLogger
    from omegaconf import OmegaConf

    stamps: list[tuple[float, float]] = []
    original = MetricLogger.log

    def timed_log(self, *args, **kwargs):
        # the training loop's logger; the final evaluation logs through others
        if "training" in getattr(self, "names", []):
            stamps.append((time.process_time(), time.perf_counter()))
        return original(self, *args, **kwargs)

    MetricLogger.log = timed_log
    previous = os.getcwd()
    os.chdir(directory)
    try:
        train_model(OmegaConf.create(OmegaConf.to_container(OmegaConf.create(options))))
    finally:
        os.chdir(previous)
        MetricLogger.log = original
    pairs = list(zip(stamps[:-1], stamps[1:], strict=True))
    return [b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rotations", type=int, nargs="+", default=[2, 4])
    parser.add_argument(
        "--fraction",
        type=float,
        default=SAMPLED_FRACTION,
        help="fraction of the steps of the 'sampled' variants",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        help="run only these variants (with their baselines), e.g. monitor or "
        "'stress energy generators'",
    )
    args = parser.parse_args()

    import logging

    import ase.io
    import torch
    from ase.calculators.emt import EMT

    from metatrain_symmetry import hooks
    from metatrain_symmetry.demo import make_dataset
    from metatrain_symmetry.testing import pet_options

    torch.set_num_threads(args.threads)
    hooks.register()
    logging.disable(logging.INFO)
    frames = make_dataset(args.structures + 2, seed=0)
    for atoms in frames:
        atoms.calc = EMT()
        atoms.info["stress"] = atoms.get_stress(voigt=False)
        atoms.calc = None
    variants = _variants(args.rotations, args.fraction, args.variants)

    best: dict[str, dict[str, float]] = {"cpu": {}, "wall": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for name, (loss, targets) in variants.items():
                directory = Path(scratch) / f"{name}-{repeat}"
                directory.mkdir()
                ase.io.write(directory / "train.xyz", frames[: args.structures])
                ase.io.write(directory / "validation.xyz", frames[args.structures :])
                options = pet_options(
                    args.epochs,
                    log_interval=1,
                    training="num_workers: 0\n" + loss,
                    targets=targets,
                )
                cpu, wall = epoch_times(directory, options)
                for clock, times in (("cpu", cpu), ("wall", wall)):
                    median = statistics.median(times[1:])
                    best[clock][name] = min(best[clock].get(name, math.inf), median)
                print(
                    f"repeat {repeat} {name:>30}: median epoch "
                    f"{statistics.median(cpu[1:]):.3f} s CPU, "
                    f"{statistics.median(wall[1:]):.3f} s wall "
                    f"over {len(cpu) - 1} epochs",
                    flush=True,
                )

    print()
    print(
        f"PET float64, {args.structures} structures of 8 atoms, batch 8, "
        f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cores"
    )
    for clock in ("cpu", "wall"):
        times = best[clock]
        _print_ratios(clock, times, args.rotations, args.fraction)


def _variants(rotations: list[int], sampled: float, only: list[str] | None) -> dict:
    """The ``(loss, dataset targets)`` of every variant, or of ``only`` and their
    baselines."""
    from metatrain_symmetry.testing import CONSERVATIVE_TARGETS, PET_TARGETS

    variants = {"plain": (PLAIN, PET_TARGETS)}
    for n_rotations in rotations:
        variants[f"R={n_rotations}"] = (PENALISED.format(R=n_rotations), PET_TARGETS)
    variants["generators"] = (GENERATORS, PET_TARGETS)
    for suffix, fraction in (("", 1.0), (", sampled", sampled)):
        variants[f"random generators{suffix}"] = (
            RANDOM_GENERATORS.format(fraction=fraction),
            PET_TARGETS,
        )
    variants["monitor"] = (MONITORED, PET_TARGETS)
    variants["conservative"] = (CONSERVATIVE_PLAIN, CONSERVATIVE_TARGETS)
    variants["conservative energy generators"] = (
        CONSERVATIVE_ENERGY_GENERATORS,
        CONSERVATIVE_TARGETS,
    )
    variants["conservative generators"] = (
        CONSERVATIVE_GENERATORS,
        CONSERVATIVE_TARGETS,
    )
    for suffix, fraction in (("", 1.0), (", sampled", sampled)):
        variants[f"conservative random generators{suffix}"] = (
            CONSERVATIVE_RANDOM_GENERATORS.format(fraction=fraction),
            CONSERVATIVE_TARGETS,
        )
    variants["stress"] = (CONSERVATIVE_PLAIN, STRESS_TARGETS)
    variants["stress energy generators"] = (
        CONSERVATIVE_ENERGY_GENERATORS,
        STRESS_TARGETS,
    )
    if only:
        wanted = set(only) | {_baseline(name) for name in only}
        variants = {k: v for k, v in variants.items() if k in wanted}
    return variants


def _baseline(name: str) -> str:
    """The variant that ``name`` is compared with."""
    for baseline in ("conservative", "stress"):
        if name.startswith(baseline):
            return baseline
    return "plain"


def _print_ratios(
    clock: str, times: dict[str, float], rotations: list[int], sampled: float
) -> None:
    """Each variant's epoch time against its baseline, with its target."""
    for baseline, label in (
        ("plain", "plain augmented training"),
        ("conservative", "conservative plain training"),
        ("stress", "conservative plain training with stress"),
    ):
        if baseline in times:
            print(f"{clock} time, {label}: {times[baseline]:.3f} s/epoch")
    compared = [
        (f"R={n}", f"n_rotations={n}", "plain", 1.1 * (n + 1)) for n in rotations
    ]
    compared += [
        ("generators", "method: generators", "plain", GENERATORS_TARGET),
        (
            "random generators",
            "method: generators, directions: random",
            "plain",
            GENERATORS_TARGET,
        ),
        (
            "random generators, sampled",
            f"method: generators, directions: random, fraction: {sampled}",
            "plain",
            GENERATORS_TARGET,
        ),
        ("monitor", "gamma 0 with monitor: true", "plain", MONITOR_TARGET),
        (
            "conservative energy generators",
            "conservative, method: generators on the energy",
            "conservative",
            GENERATORS_TARGET,
        ),
        (
            "conservative generators",
            "conservative, method: generators on energy and forces",
            "conservative",
            GENERATORS_TARGET,
        ),
        (
            "conservative random generators",
            "conservative, method: generators on energy and forces, random directions",
            "conservative",
            GENERATORS_TARGET,
        ),
        (
            "conservative random generators, sampled",
            "conservative, method: generators on energy and forces, random "
            f"directions, fraction: {sampled}",
            "conservative",
            GENERATORS_TARGET,
        ),
        (
            "stress energy generators",
            "with stress, method: generators on the energy",
            "stress",
            GENERATORS_TARGET,
        ),
    ]
    for name, label, baseline, target in compared:
        if name not in times:
            continue
        ratio = times[name] / times[baseline]
        verdict = "meets" if ratio <= target else "misses"
        print(
            f"{clock} time, {label}: {times[name]:.3f} s/epoch, ratio to "
            f"{baseline} {ratio:.2f} ({verdict} the target <= {target:.2f})"
        )


if __name__ == "__main__":
    sys.exit(main())
