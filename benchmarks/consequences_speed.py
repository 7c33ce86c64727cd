"""Speed of the three variants of ``mtt-symmetry consequences`` on a water box.

An exported (TorchScript) small PET with an energy head, saved to a file and
loaded back as users do, on a periodic box of 64 randomly oriented water molecules
(192 atoms). Measured in one run, as wall-clock seconds per step, the median over
``--steps`` steps after ``--warm-up`` untimed ones:

(a) one forward and backward pass of the model (energy and forces) on the box,
    its neighbour list given: the floor of an MD step;
(b) a velocity-Verlet step through metatomic's ASE calculator (``plain``), under
    TorchScript's default (profiling) executor and under the simple executor;
(c) a step of ``random_rotation`` and of ``average`` (on ``--grid-degree``, in
    the engine's default calls and in calls of each of ``--average-batch-sizes``
    rotated copies);
(d) the wall time per step of whole ``plain`` NVE trajectories of ``--steps``
    steps integrated by ASE and by i-PI (``--engine ipi``).

It prints (b) / (a), random_rotation / plain, average / (grid size x plain) and
i-PI / ASE.
Run from the repository root::

    python benchmarks/consequences_speed.py
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from ase import units
from ase.md.verlet import VelocityVerlet
from engine_common import water_box
from metatomic.torch import ModelOutput

import metatrain_symmetry as msym
from metatrain_symmetry.calculators import (
    AveragedCalculator,
    RandomRotationCalculator,
    model_calculator,
)
from metatrain_symmetry.consequences.ipi import run_dynamics_ipi
from metatrain_symmetry.consequences.simulation import Settings, run_dynamics
from metatrain_symmetry.systems import prepare_systems
from metatrain_symmetry.testing import pet_model


def exported_model(directory: Path) -> Path:
    """The small PET of the engine benchmarks, exported to a file."""
    from engine_common import PET_SIZES

    hypers = {"num_attention_layers": 2, "num_gnn_layers": 2, **PET_SIZES["small"]}
    pet = pet_model(hypers, atomic_types=[1, 6, 7, 8])
    path = directory / "model.pt"
    pet.export().save(str(path))
    return path


def median_seconds(function, steps: int, warm_up: int) -> float:
    for _ in range(warm_up):
        function()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_backward(path: Path, atoms) -> float:
    """One call of the model's module with gradients of the energy."""
    model = msym.load_model(path)
    (system,) = prepare_systems([atoms], model)

    def call():
        positions = system.positions.detach().requires_grad_(True)
        copy = msym.copies.rotated_copies(
            msym.copies.prepare_rotations(system),
            torch.eye(3, dtype=positions.dtype).unsqueeze(0),
            differentiable=True,
        )[0]
        energy = model(copy, {"energy": ModelOutput(sample_kind="system")}, None)
        energy["energy"].block().values.sum().backward()

    return call


def md_step(atoms, calculator):
    atoms = atoms.copy()
    atoms.calc = calculator
    dynamics = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    return lambda: dynamics.run(1)


def average_times(path, atoms, grid, batch_sizes, steps) -> dict[str, float]:
    """A step of the average in the engine's default calls, and in calls of each
    of ``batch_sizes`` rotated copies."""
    times = {}
    for batch_size in [None, *batch_sizes]:
        name = "average" if batch_size is None else f"average, {batch_size} copies"
        calculator = AveragedCalculator(path, grid, batch_size=batch_size)
        times[name] = median_seconds(md_step(atoms, calculator), max(3, steps // 5), 2)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warm-up", type=int, default=5)
    parser.add_argument("--grid-degree", type=int, default=3)
    parser.add_argument("--per-side", type=int, default=4)
    parser.add_argument(
        "--average-batch-sizes",
        type=int,
        nargs="*",
        default=[],
        metavar="N",
        help="also time the average in calls of N rotated copies",
    )
    args = parser.parse_args()
    atoms = water_box(args.per_side)
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        path = exported_model(Path(directory))
        results["forward+backward"] = median_seconds(
            forward_backward(path, atoms), args.steps, args.warm_up
        )
        results["plain (profiling executor)"] = median_seconds(
            md_step(atoms, model_calculator(path)), args.steps, args.warm_up
        )
        torch._C._jit_set_profiling_executor(False)
        plain = model_calculator(path)
        results["plain"] = median_seconds(
            md_step(atoms, plain), args.steps, args.warm_up
        )
        results["random_rotation"] = median_seconds(
            md_step(atoms, RandomRotationCalculator(plain, seed=0)),
            args.steps,
            args.warm_up,
        )
        settings = Settings(steps=args.steps, frames=1)
        for engine, run in (("ASE", run_dynamics), ("i-PI", run_dynamics_ipi)):
            trajectory = run(atoms, plain, settings, "nve", seed=0)
            results[f"plain trajectory, {engine}"] = trajectory.seconds_per_step
        grid = msym.O3Grid(args.grid_degree)
        results.update(
            average_times(path, atoms, grid, args.average_batch_sizes, args.steps)
        )
    print(f"{len(atoms)} atoms; average on {len(grid)} grid elements")
    for name, value in results.items():
        print(f"  {name:28s} {value * 1000:9.1f} ms/step")
    floor = results["forward+backward"]
    plain = results["plain"]
    print(f"plain / forward+backward (simple executor):    {plain / floor:.2f}")
    print(
        "plain / forward+backward (profiling executor): "
        f"{results['plain (profiling executor)'] / floor:.2f}"
    )
    print(
        f"random_rotation / plain:                       "
        f"{results['random_rotation'] / plain:.2f}"
    )
    for name in (name for name in results if name.startswith("average")):
        print(
            f"{name} / (grid size x plain): {results[name] / (len(grid) * plain):.2f}"
        )
    print(
        f"trajectory with i-PI / with ASE:               "
        f"{results['plain trajectory, i-PI'] / results['plain trajectory, ASE']:.2f}"
    )


if __name__ == "__main__":
    main()
