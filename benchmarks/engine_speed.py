"""Speed and memory of ``metatrain_symmetry.analyze`` on a small float64 PET model.

Everything below is measured in one run, on the same model, the same structures
and the same O(3) grid (``O3Grid(degree=8)``: 342 rotations and their
compositions with the inversion, 684 elements; ``max_lambda=4``; outputs
``energy`` and ``non_conservative_force``):

(a) the time of metatomic's :py:class:`metatomic.torch.o3.SymmetrizedModel`
    (average, ``o3::variance::`` and ``o3::character_projection::`` of both
    outputs, ``batch_size=32``, under ``torch.no_grad()``) divided by the time
    of :py:func:`metatrain_symmetry.analyze` (default batch size). Both start
    from the same prepared systems, neighbour lists included, and the force
    variances they return are checked to agree to a relative 1e-8. Every
    ``analyze`` call gets a new ``O3Grid``, so it pays for the grid's Wigner
    matrices as a first call does; the construction of ``SymmetrizedModel``
    (its quadrature and Wigner matrices) is timed separately and left out of
    the ratio;
(b) the time of ``analyze`` divided by the "floor": bare model calls over every
    rotated copy of every structure, built before the clock starts with the
    engine's own helpers and grouped in batches of the size ``analyze`` uses,
    under ``torch.inference_mode()``. The ratio is the cost of everything
    ``analyze`` does besides the model forward passes;
(c) the peak memory of ``analyze`` on a 2187-atom water box, measured by
    ``engine_memory.py`` (see there) after the speed cases, unless
    ``--skip-memory``.

The two speed cases are 16 small molecules of the G2 set (H, C, N and O only)
and a 192-atom box of 64 randomly oriented water molecules at about 1 g/cm^3.
Times are wall-clock seconds, the minimum over ``--repeats`` runs; process CPU
times are also reported. Wall times are sensitive to other work on the machine:
with two cores, any concurrent process slows the multi-threaded model calls
severely, so compare numbers from runs on an otherwise idle machine.

The default model is a PET with ``d_pet=32``, ``d_node=64``, two attention
layers, two message-passing layers and a 3.5 A cutoff (``--pet small``); the
default run takes about four minutes on two idle CPU cores. ``--pet medium``
(``d_pet=64``, ``d_node=128``, 4.5 A cutoff) costs about ten times more per
water copy. (c) uses a degree-2 grid by default (``--memory-degree``): the
streamed evaluation keeps one batch of model outputs alive at a time, so the
peak does not grow with the number of grid elements, while a degree-8 grid on
2187 atoms adds about ten minutes on two cores.

Run from the repository root::

    python benchmarks/engine_speed.py            # full run
    python benchmarks/engine_speed.py --quick    # fewer and smaller structures
    python benchmarks/engine_speed.py --repeats 3 --memory-degree 8
"""

import argparse
import cProfile
import os
import pstats
import time
from pathlib import Path

import torch
from engine_common import (
    MAX_LAMBDA,
    MOLECULES,
    OUTPUTS,
    PET_SIZES,
    add_model_arguments,
    build_model,
    molecules,
    requests,
    symmetrized_requests,
    timed,
    water_box,
)
from engine_memory import report_memory
from metatensor.torch import TensorMap
from metatomic.torch.o3 import SymmetrizedModel

import metatrain_symmetry as msym
from metatrain_symmetry.copies import rotated_systems
from metatrain_symmetry.engine import RotatedEvaluator
from metatrain_symmetry.systems import prepare_systems


def floor_batches(model, systems, grid) -> list[list]:
    """Every rotated copy of every structure, in the order and batches in which
    ``analyze`` evaluates them."""
    per_batch = RotatedEvaluator(model, grid).copies_per_batch(systems)
    rotations = grid.rotations.to(dtype=model.dtype, device=model.device)
    copies = []
    for system in systems:
        copies.extend(rotated_systems(system, rotations))
    return [copies[i : i + per_batch] for i in range(0, len(copies), per_batch)]


def run_floor(model, batches) -> None:
    outputs = requests()
    with torch.inference_mode():
        for batch in batches:
            model.module(batch, outputs, None)


def relative_difference(ours: TensorMap, theirs: TensorMap) -> float:
    """``||ours - theirs|| / ||theirs||`` over all blocks, matching blocks by key
    and rows by sample labels."""
    their_blocks = {}
    for key, block in theirs.items():
        their_blocks[tuple(zip(key.names, key.values.tolist(), strict=True))] = block
    difference, norm = 0.0, 0.0
    for key, block in ours.items():
        entries = tuple(zip(key.names, key.values.tolist(), strict=True))
        other = their_blocks.pop(entries)
        if list(block.samples.names) != list(other.samples.names):
            raise ValueError(
                f"sample names differ: {block.samples.names} and {other.samples.names}"
            )
        rows = {tuple(s): i for i, s in enumerate(other.samples.values.tolist())}
        order = [rows[tuple(s)] for s in block.samples.values.tolist()]
        if len(order) != len(rows):
            raise ValueError("the two results have different samples")
        # analyze returns its maps on CPU, SymmetrizedModel on the model's device
        other_values = other.values[order].to("cpu", torch.float64)
        values = block.values.to("cpu", torch.float64)
        difference += float((values - other_values).square().sum())
        norm += float(other_values.square().sum())
    if their_blocks:
        raise ValueError(f"blocks missing from our result: {list(their_blocks)}")
    return (difference / max(norm, 1e-300)) ** 0.5


def speed_case(label, model, frames, degree, repeats, device) -> dict:
    systems = prepare_systems(frames, model)
    n_atoms = sum(len(system) for system in systems)
    grid = msym.O3Grid(degree=degree)
    max_lambda = min(MAX_LAMBDA, degree // 2)

    def build_symmetrized():
        return SymmetrizedModel(
            model.module,
            max_angular_momentum_target=1,
            max_angular_momentum_character=max_lambda,
            max_angular_momentum_grid=degree,
            batch_size=32,
        ).eval()

    symmetrized, (symmetrized_setup, _, _) = timed(build_symmetrized, device)
    _, (wigner_setup, _, _) = timed(lambda: grid.wigner_matrices(max_lambda), device)
    their_requests = symmetrized_requests()
    names = list(OUTPUTS)
    batches, (construction, _, _) = timed(
        lambda: floor_batches(model, systems, grid), device
    )
    per_batch = len(batches[0])

    def run_symmetrized():
        with torch.no_grad():
            return symmetrized(systems, their_requests, None)

    def run_ours(fresh_grid):
        return msym.analyze(
            model, systems, names, max_lambda=max_lambda, grid=fresh_grid
        )

    # warm-up: one batch, so that no run pays for first-call initialisation
    run_floor(model, batches[:1])

    # the fastest run of each kind: (wall, cpu, other cores busy)
    best = {}

    def keep(key, timing):
        if key not in best or timing[0] < best[key][0]:
            best[key] = timing

    theirs = ours = None
    for _ in range(repeats):
        theirs, timing = timed(run_symmetrized, device)
        keep("sym", timing)
        fresh_grid = msym.O3Grid(degree=degree)
        ours, timing = timed(lambda g=fresh_grid: run_ours(g), device)
        keep("ours", timing)
        _, timing = timed(lambda: run_floor(model, batches), device)
        keep("floor", timing)

    differences = compare_with_symmetrized(ours, theirs, names)
    force = differences["variance non_conservative_force"]
    assert force < 1e-8, f"force variances differ by {force:.3e} (relative)"
    return {
        "label": label,
        "structures": len(systems),
        "atoms": n_atoms,
        "copies": len(systems) * len(grid),
        "per_batch": per_batch,
        "model_calls": len(batches),
        "times": best,
        "differences": differences,
        "symmetrized_setup": symmetrized_setup,
        "wigner_setup": wigner_setup,
        "construction": construction,
    }


def compare_with_symmetrized(ours, theirs: dict, names: list[str]) -> dict:
    """Relative differences between ``analyze`` and ``SymmetrizedModel``, per
    quantity and output (a message where a quantity cannot be compared)."""
    differences = {}
    for name in names:
        differences[f"variance {name}"] = relative_difference(
            ours.variance[name], theirs["o3::variance::" + name]
        )
        differences[f"average {name}"] = relative_difference(
            ours.average[name], theirs[name]
        )
        try:
            differences[f"character_projection {name}"] = relative_difference(
                ours.character_projection[name],
                theirs["o3::character_projection::" + name],
            )
        except (KeyError, ValueError) as error:
            differences[f"character_projection {name}"] = f"not compared ({error})"
    return differences


# (module file, function) pairs whose cumulative time --profile reports
def profile_analyze(model, frames, degree, top: int = 12) -> None:
    """Run ``analyze`` once under cProfile and print the functions of the package
    where its time goes, ranked by cProfile's cumulative time."""
    systems = prepare_systems(frames, model)
    grid = msym.O3Grid(degree=degree)
    max_lambda = min(MAX_LAMBDA, degree // 2)
    profiler = cProfile.Profile()
    profiler.enable()
    msym.analyze(model, systems, list(OUTPUTS), max_lambda=max_lambda, grid=grid)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = max(entry[3] for entry in stats.stats.values())
    package = Path(msym.__file__).parent
    print(f"    cProfile of analyze: {total:.2f} s in all; package functions by")
    print("    cumulative time:")
    ranked = sorted(
        (
            (cumulative, filename, line, function)
            for (filename, line, function), (_, _, _, cumulative, _) in (
                stats.stats.items()
            )
            if filename.startswith(str(package))
        ),
        reverse=True,
    )
    for cumulative, filename, line, function in ranked[:top]:
        where = f"{Path(filename).relative_to(package)}:{line} {function}"
        print(
            f"      {where:<48} {cumulative:7.2f} s  {100 * cumulative / total:5.1f} %"
        )


# ----------------------------------------------------------------- report
def print_speed_table(cases: list[dict]) -> None:
    header = (
        f"{'case':<24} {'SymmetrizedModel s':>18} {'ours s':>9} {'floor s':>9} "
        f"{'ratio (a)':>9} {'ratio (b)':>9}"
    )
    print(header)
    print("-" * len(header))
    for case in cases:
        sym, ours, floor = (case["times"][k][0] for k in ("sym", "ours", "floor"))
        print(
            f"{case['label']:<24} {sym:>18.2f} {ours:>9.2f} {floor:>9.2f} "
            f"{sym / ours:>9.2f} {ours / floor:>9.2f}"
        )
    print()
    print("same runs, process CPU seconds:")
    for case in cases:
        sym, ours, floor = (case["times"][k][1] for k in ("sym", "ours", "floor"))
        print(
            f"  {case['label']:<22} sym {sym:8.2f}  ours {ours:8.2f}  floor "
            f"{floor:8.2f}  (a) {sym / ours:5.2f}  (b) {ours / floor:5.2f}"
        )
    print(
        "building every rotated System with its neighbour list (inside 'ours', "
        "outside the floor):"
    )
    for case in cases:
        ours, floor = (case["times"][k][0] for k in ("ours", "floor"))
        construction = case["construction"]
        print(
            f"  {case['label']:<22} {construction:8.2f} s, "
            f"{1e6 * construction / case['copies']:5.0f} us per copy; "
            f"ours / (floor + building) {ours / (floor + construction):5.2f}"
        )
    print("cores kept busy by other processes during these runs (0 = idle machine):")
    for case in cases:
        sym, ours, floor = (case["times"][k][2] for k in ("sym", "ours", "floor"))
        print(
            f"  {case['label']:<22} sym {sym:5.2f}  ours {ours:5.2f}  "
            f"floor {floor:5.2f}"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--degree", type=int, default=8, help="O3Grid degree")
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs per case (minimum kept)"
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--memory-degree",
        type=int,
        default=2,
        help="O3Grid degree of the memory measurement (c)",
    )
    parser.add_argument("--skip-memory", action="store_true", help="skip (c)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also run analyze once per case under cProfile and show where its "
        "time goes",
    )
    return parser


def print_case(case: dict, start: float) -> None:
    """What one speed case measured, besides its times."""
    print(
        f"[{time.perf_counter() - start:6.0f} s] {case['label']}: "
        f"{case['structures']} structures, {case['atoms']} atoms, {case['copies']} "
        f"rotated copies, {case['per_batch']} copies per batch, "
        f"{case['model_calls']} calls",
        flush=True,
    )
    print(
        f"    untimed setup: SymmetrizedModel construction "
        f"{case['symmetrized_setup']:.2f} s; timed inside analyze: Wigner "
        f"matrices of a new O3Grid {case['wigner_setup']:.2f} s"
    )
    for what, value in case["differences"].items():
        shown = value if isinstance(value, str) else f"{value:.2e}"
        print(f"    relative difference ours vs SymmetrizedModel, {what}: {shown}")


def main() -> None:
    args = build_parser().parse_args()

    start = time.perf_counter()
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device "
        f"{device}, load average {os.getloadavg()[0]:.2f} at start"
    )
    model = build_model(args.pet, args.device)
    grid = msym.O3Grid(degree=args.degree)  # for the description only
    print(
        f"PET '{args.pet}' {PET_SIZES[args.pet]}, float64; {grid}; max_lambda "
        f"{min(MAX_LAMBDA, args.degree // 2)}; outputs {list(OUTPUTS)}"
    )

    names = MOLECULES[:4] if args.quick else MOLECULES
    water_side = 3 if args.quick else 4
    water = water_box(water_side)
    inputs = [
        (f"{len(names)} molecules", molecules(names)),
        (f"water box {len(water)} atoms", [water]),
    ]
    cases = []
    for label, frames in inputs:
        case = speed_case(label, model, frames, args.degree, args.repeats, device)
        cases.append(case)
        print_case(case, start)
        if args.profile:
            profile_analyze(model, frames, args.degree)

    print()
    print(
        "(a) = SymmetrizedModel / ours (target >= 1.5 molecules, >= 1.0 water); "
        "(b) = ours / floor (target <= 1.25)"
    )
    print_speed_table(cases)

    print()
    if args.skip_memory:
        print("(c) skipped (--skip-memory)")
    else:
        report_memory(args, speed_degree=args.degree)

    print()
    print(
        f"total runtime {time.perf_counter() - start:.0f} s, load average "
        f"{os.getloadavg()[0]:.2f} at end"
    )


if __name__ == "__main__":
    main()
