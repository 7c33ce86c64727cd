"""Peak memory of ``metatrain_symmetry.analyze`` on a large periodic structure.

(c) the peak resident memory added by ``analyze`` on a periodic water box of 2187
atoms, against the peak added by one model call on one batch of rotated copies of
that box. Each is measured in a fresh subprocess, from the resident set just
before the call to the high-water mark after it (the mark is reset through
``/proc/self/clear_refs`` beforehand). The streamed evaluation keeps one batch of
model outputs alive at a time, so the peak does not grow with the number of grid
elements; a degree-2 grid is used by default (``--memory-degree``), while a
degree-8 grid on 2187 atoms adds about ten minutes on two cores.

``engine_speed.py`` runs this measurement after its speed cases. Run alone from
the repository root::

    python benchmarks/engine_memory.py
    python benchmarks/engine_memory.py --quick --memory-degree 4
"""

import argparse
import json
import os
import subprocess
import sys

import torch
from engine_common import (
    MAX_LAMBDA,
    MEMORY_BOX_SIDE,
    OUTPUTS,
    add_model_arguments,
    build_model,
    peak_memory,
    requests,
    water_box,
)

import metatrain_symmetry as msym
from metatrain_symmetry.copies import rotated_systems
from metatrain_symmetry.engine import RotatedEvaluator
from metatrain_symmetry.systems import prepare_systems


def memory_worker(mode: str, args) -> None:
    """Runs in a subprocess: measure the peak memory of one operation and print
    it as JSON on the last line of stdout."""

    device = torch.device(args.device)
    model = build_model(args.pet, args.device)
    side = 4 if args.quick else MEMORY_BOX_SIDE
    systems = prepare_systems([water_box(side, seed=1)], model)
    grid = msym.O3Grid(degree=args.memory_degree)
    max_lambda = min(MAX_LAMBDA, grid.degree // 2)
    if mode == "call":
        per_batch = RotatedEvaluator(model, grid).copies_per_batch(systems)
        rotations = grid.rotations.to(dtype=model.dtype, device=model.device)
        batch = rotated_systems(systems[0], rotations[:per_batch])
        outputs = requests()

        def operation():
            with torch.inference_mode():
                return model.module(batch, outputs, None)

    else:

        def operation():
            return msym.analyze(
                model, systems, list(OUTPUTS), max_lambda=max_lambda, grid=grid
            )

    result, memory = peak_memory(operation, device)
    report = {
        "mode": mode,
        "atoms": len(systems[0]),
        "grid": len(grid),
        "max_lambda": max_lambda,
        "per_batch": RotatedEvaluator(model, grid).copies_per_batch(systems),
        **memory,
    }
    del result
    print(json.dumps(report))


def measure_memory(mode: str, args) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--memory-worker",
        mode,
        "--memory-degree",
        str(args.memory_degree),
        "--device",
        args.device,
        "--pet",
        args.pet,
    ]
    if args.quick:
        command.append("--quick")
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(
            f"memory worker '{mode}' failed:\n{completed.stdout}\n{completed.stderr}"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--memory-degree",
        type=int,
        default=2,
        help="O3Grid degree of the memory measurement",
    )
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker is not None:
        memory_worker(args.memory_worker, args)
        return
    report_memory(args)


def report_memory(args, speed_degree: int | None = None) -> None:
    """Measure (c) in two fresh subprocesses and print it."""
    reports = {mode: measure_memory(mode, args) for mode in ("call", "analyze")}
    call, full = reports["call"], reports["analyze"]
    print(
        f"(c) peak RSS increase, water box of {full['atoms']} atoms, O3Grid degree "
        f"{args.memory_degree} ({full['grid']} elements, max_lambda "
        f"{full['max_lambda']}), {full['per_batch']} copies per batch"
    )
    if speed_degree is not None and args.memory_degree != speed_degree:
        print(
            f"    (degree {args.memory_degree} instead of {speed_degree} for (c) "
            "only, to bound the runtime; the peak is set by one batch)"
        )
    for name, report in (("one model call on one batch", call), ("analyze", full)):
        line = (
            f"    {name:<28} {report['increase_mib']:8.1f} MiB "
            f"(RSS before {report['rss_before_mib']:.0f} MiB, "
            f"{report['seconds']:.1f} s)"
        )
        if "cuda_increase_mib" in report:
            line += f", CUDA peak +{report['cuda_increase_mib']:.1f} MiB"
        print(line)
    if not (call["exact_reset"] and full["exact_reset"]):
        print("    (peak not resettable here: ru_maxrss since process start)")
    ratio = full["increase_mib"] / max(call["increase_mib"], 1e-9)
    print(f"    analyze / one call: {ratio:.2f}")


if __name__ == "__main__":
    main()
