"""Throughput of :py:func:`metatrain_symmetry.audit` on one and two processes.

Audits a small float64 PET (``--pet small``, as in ``engine_speed.py``, saved as
a metatrain checkpoint) on

- small molecules of the G2 set (H, C, N and O; ``--molecules`` structures,
  cycling through the set) on the default exact grid (``O3Grid(degree=8)``, 684
  elements, ``max_lambda=4``);
- 192-atom boxes of liquid water read from
  ``/work/shared/data/water-revpbe0/water-bulk-100.xyz`` (the first ``--water``
  frames) with ``--rotations`` Haar-random elements,

each in three configurations: one process with one thread, one process with two
threads, and two processes (``torchrun --nproc_per_node 2``, gloo) with one
thread each. Every configuration is a fresh ``torchrun`` launch; the time is that
of the ``audit`` call on rank 0 (unrotated predictions, rotated copies, gathering
and assembly; not the start-up or model loading), the fastest of ``--repeats``
calls. Reported: rotated copies per second, atoms per second (atoms times
copies), and the ratios of the two-process throughput to the one-process ones.
The two-process audit is checked to reproduce the one-process summary.

Run ``python benchmarks/audit_throughput.py --molecules 16`` (about ten minutes
on two busy cores); ``--quick`` for a smoke run.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


WATER = Path("/work/shared/data/water-revpbe0/water-bulk-100.xyz")
CONFIGURATIONS = [
    ("1 process, 1 thread", 1, 1),
    ("1 process, 2 threads", 1, 2),
    ("2 processes, 1 thread each", 2, 1),
]


def _frames(case: str, count: int):
    import ase.io

    sys.path.insert(0, str(Path(__file__).parent))
    from engine_common import MOLECULES, molecules

    if case == "molecules":
        names = [MOLECULES[i % len(MOLECULES)] for i in range(count)]
        return molecules(names)
    # read in place, never copied
    return ase.io.read(WATER, f":{count}")


def worker(arguments) -> None:
    """One rank of a configuration: time the audit, print the result on rank 0."""
    import torch
    import torch.distributed as dist

    import metatrain_symmetry as msym
    from metatrain_symmetry.distributed import init_from_environment

    torch.set_num_threads(arguments.threads)
    context = init_from_environment()
    frames = _frames(arguments.case, arguments.count)
    grid = None
    if arguments.random is not None:
        grid = msym.O3Grid.random(arguments.random, seed=0)
    model = msym.load_model(arguments.model)
    best, summary = math.inf, None
    for _ in range(arguments.repeats):
        if context.is_distributed:
            dist.barrier()
        start = time.perf_counter()
        result = msym.audit(
            model,
            frames,
            outputs=["energy", "non_conservative_force"],
            grid=grid,
            distributed=context.is_distributed,
        )
        best = min(best, time.perf_counter() - start)
        if result is not None:
            summary = result.summary
    if context.is_main:
        n_copies = summary["grid"]["n_elements"]
        print(
            "RESULT "
            + json.dumps(
                {
                    "seconds": best,
                    "copies": len(frames) * n_copies,
                    "atom_copies": sum(len(atoms) for atoms in frames) * n_copies,
                    "summary": summary["outputs"],
                }
            ),
            flush=True,
        )
    if context.is_distributed:
        dist.destroy_process_group()


def _launch(arguments, case, count, rotations, processes, threads, model) -> dict:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
        __file__,
        "--worker",
        "--case",
        case,
        "--count",
        str(count),
        "--threads",
        str(threads),
        "--repeats",
        str(arguments.repeats),
        "--model",
        str(model),
    ]
    if rotations is not None:
        command += ["--random", str(rotations)]
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads))
    process = subprocess.run(command, capture_output=True, text=True, env=environment)
    if process.returncode != 0:
        raise RuntimeError(
            f"{case} with {processes} processes failed:\n{process.stderr}"
        )
    line = next(
        line for line in process.stdout.splitlines() if line.startswith("RESULT ")
    )
    return json.loads(line[len("RESULT ") :])


def _largest_difference(first, second) -> float:
    """Largest relative difference between the numbers of two summaries."""
    if isinstance(first, dict):
        return max(
            (_largest_difference(first[key], second[key]) for key in first),
            default=0.0,
        )
    if isinstance(first, list):
        return max(
            (_largest_difference(a, b) for a, b in zip(first, second, strict=True)),
            default=0.0,
        )
    if isinstance(first, float):
        # numbers that are round-off themselves (exactly zero in exact arithmetic)
        # have no meaningful relative difference
        if max(abs(first), abs(second)) < 1e-8:
            return 0.0
        return abs(first - second) / max(abs(first), abs(second))
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--random", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--molecules", type=int, default=32, help="molecules")
    parser.add_argument("--water", type=int, default=16, help="water boxes")
    parser.add_argument(
        "--rotations", type=int, default=32, help="random elements for water"
    )
    parser.add_argument("--repeats", type=int, default=1, help="audits per launch")
    parser.add_argument("--quick", action="store_true", help="4 molecules, 2 boxes")
    arguments = parser.parse_args()
    if arguments.worker:
        worker(arguments)
        return

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from engine_common import PET_SIZES

    from metatrain_symmetry.testing import pet_model

    if arguments.quick:
        arguments.molecules, arguments.water = 4, 2
    cases = [
        ("molecules", arguments.molecules, None),
        ("water", arguments.water, arguments.rotations),
    ]
    hypers = {"num_attention_layers": 2, "num_gnn_layers": 2, **PET_SIZES["small"]}
    with tempfile.TemporaryDirectory() as directory:
        model = Path(directory) / "model.ckpt"
        torch.save(pet_model(hypers, atomic_types=[1, 6, 7, 8]).get_checkpoint(), model)
        for case, count, rotations in cases:
            grid = "O3Grid(degree=8)" if rotations is None else f"{rotations} random"
            print(f"\n{case}: {count} structures, grid {grid}")
            print(f"{'configuration':<28} {'s':>8} {'copies/s':>10} {'atoms/s':>10}")
            results = {}
            for label, processes, threads in CONFIGURATIONS:
                result = _launch(
                    arguments, case, count, rotations, processes, threads, model
                )
                results[(processes, threads)] = result
                seconds = result["seconds"]
                print(
                    f"{label:<28} {seconds:8.2f} {result['copies'] / seconds:10.1f} "
                    f"{result['atom_copies'] / seconds:10.0f}",
                    flush=True,
                )
            two = results[(2, 1)]["seconds"]
            print(
                f"2 processes / 1 process, 1 thread: "
                f"{results[(1, 1)]['seconds'] / two:.2f}; "
                f"2 processes / 1 process, 2 threads: "
                f"{results[(1, 2)]['seconds'] / two:.2f}"
            )
            difference = _largest_difference(
                results[(1, 1)]["summary"], results[(2, 1)]["summary"]
            )
            print(
                "largest relative difference of the summaries (numbers above "
                f"1e-8): {difference:.1e}"
            )


if __name__ == "__main__":
    main()
