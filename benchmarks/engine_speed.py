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
(c) the peak resident memory added by ``analyze`` on a periodic water box of
    2187 atoms, against the peak added by one model call on one batch of
    rotated copies of that box. Each is measured in a fresh subprocess, from the
    resident set just before the call to the high-water mark after it (the mark
    is reset through ``/proc/self/clear_refs`` beforehand).

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
import json
import os
import pstats
import resource
import subprocess
import sys
import time

import ase
import ase.build
import numpy as np
import torch
from metatensor.torch import TensorMap
from metatomic.torch import ModelOutput
from metatomic.torch.o3 import SymmetrizedModel
from scipy.spatial.transform import Rotation

import metatrain_symmetry as msym
from metatrain_symmetry.engine import RotatedEvaluator, rotated_systems
from metatrain_symmetry.systems import prepare_systems
from metatrain_symmetry.testing import pet_model


OUTPUTS = {"energy": "system", "non_conservative_force": "atom"}
MAX_LAMBDA = 4

MOLECULES = (
    "H2O",
    "CH4",
    "NH3",
    "C2H6",
    "CH3OH",
    "HCOOH",
    "C2H4",
    "CH3CN",
    "H2CO",
    "CH3CHO",
    "CH3CH2OH",
    "C6H6",
    "CH3COOH",
    "C5H5N",
    "CH3CONH2",
    "N2H4",
)

PET_SIZES = {
    "small": {
        "d_pet": 32,
        "d_head": 32,
        "d_node": 64,
        "d_feedforward": 64,
        "num_heads": 2,
        "cutoff": 3.5,
    },
    "medium": {
        "d_pet": 64,
        "d_head": 64,
        "d_node": 128,
        "d_feedforward": 128,
        "num_heads": 4,
        "cutoff": 4.5,
    },
}

# 64 water molecules in a cube of 12.42 A are about 1 g/cm^3
WATER_SPACING = 12.42 / 4
# molecules per side of the box used for the memory measurement (2187 atoms)
MEMORY_BOX_SIDE = 9


# ----------------------------------------------------------------- inputs
def build_model(size: str, device: str) -> msym.LoadedModel:
    """An untrained float64 PET with energy and non-conservative force heads."""
    hypers = {"num_attention_layers": 2, "num_gnn_layers": 2, **PET_SIZES[size]}
    pet = pet_model(hypers, atomic_types=[1, 6, 7, 8])
    return msym.load_model(pet, device=device)


def molecules(names) -> list[ase.Atoms]:
    frames = [ase.build.molecule(name) for name in names]
    for name, atoms in zip(names, frames, strict=True):
        if not set(atoms.numbers) <= {1, 6, 7, 8}:
            raise ValueError(f"{name} has elements outside H, C, N, O")
    return frames


def water_box(per_side: int, seed: int = 0) -> ase.Atoms:
    """``per_side**3`` randomly oriented water molecules on a cubic lattice, in a
    periodic cubic cell at about 1 g/cm^3."""
    rng = np.random.default_rng(seed)
    water = ase.build.molecule("H2O")
    water.translate(-water.positions[0])  # oxygen at the origin
    box = ase.Atoms(cell=np.eye(3) * per_side * WATER_SPACING, pbc=True)
    for i in range(per_side):
        for j in range(per_side):
            for k in range(per_side):
                molecule = water.copy()
                rotation = Rotation.random(random_state=rng).as_matrix()
                site = WATER_SPACING * (np.array([i, j, k]) + 0.5)
                molecule.positions = molecule.positions @ rotation.T + site
                box += molecule
    return box


def requests() -> dict[str, ModelOutput]:
    return {name: ModelOutput(sample_kind=kind) for name, kind in OUTPUTS.items()}


def symmetrized_requests() -> dict[str, ModelOutput]:
    result = {}
    for name, kind in OUTPUTS.items():
        for prefix in ("", "o3::variance::", "o3::character_projection::"):
            result[prefix + name] = ModelOutput(sample_kind=kind)
    return result


# ----------------------------------------------------------------- timing
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _busy_seconds() -> float | None:
    """CPU seconds spent by the whole machine (all processes) since boot."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal
    busy = sum(fields) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def timed(function, device: torch.device):
    """Run ``function()`` and return ``(result, (wall, cpu, other))``: wall-clock
    seconds, CPU seconds of this process, and the average number of cores that
    other processes kept busy meanwhile (``nan`` where unknown)."""
    _synchronize(device)
    busy = _busy_seconds()
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    _synchronize(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    other = float("nan")
    after = _busy_seconds()
    if busy is not None and after is not None and wall > 0:
        other = max(0.0, after - busy - cpu) / wall
    return result, (wall, cpu, other)


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
        other_values = other.values[order].to(torch.float64)
        values = block.values.to(torch.float64)
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


# (module file, function) pairs whose cumulative time --profile reports
PROFILED = (
    ("models.py", "__call__", "model forward (LoadedModel.__call__)"),
    ("engine.py", "rotated_copies", "engine.rotated_copies"),
    ("engine.py", "_split_by_copy", "engine._split_by_copy"),
    ("engine.py", "prepare_systems", "engine.prepare_systems"),
    ("grid.py", "wigner_matrices", "O3Grid.wigner_matrices"),
    ("diagnostics.py", "add", "diagnostics._BlockAccumulator.add"),
    ("diagnostics.py", "_finish_structure", "diagnostics._finish_structure"),
    ("diagnostics.py", "_assemble", "diagnostics._assemble"),
)


def profile_analyze(model, frames, degree) -> None:
    """Run ``analyze`` once under cProfile and print where its time goes."""
    systems = prepare_systems(frames, model)
    grid = msym.O3Grid(degree=degree)
    max_lambda = min(MAX_LAMBDA, degree // 2)
    profiler = cProfile.Profile()
    profiler.enable()
    msym.analyze(model, systems, list(OUTPUTS), max_lambda=max_lambda, grid=grid)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    cumulative = {}
    total = 0.0
    for (filename, _, function), (_, _, _, cumtime, _) in stats.items():
        if "metatrain_symmetry" not in filename:
            continue
        if filename.endswith("diagnostics.py") and function == "analyze":
            total = cumtime
        for module, name, label in PROFILED:
            if filename.endswith(module) and function == name:
                cumulative[label] = cumulative.get(label, 0.0) + cumtime
    print(f"    cProfile of analyze: {total:.2f} s in all")
    accounted = 0.0
    for _, _, label in PROFILED:
        value = cumulative.get(label, 0.0)
        accounted += value
        print(f"      {label:<40} {value:7.2f} s  {100 * value / total:5.1f} %")
    rest = total - accounted
    print(f"      {'everything else':<40} {rest:7.2f} s  {100 * rest / total:5.1f} %")


# ----------------------------------------------------------------- memory
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def memory_worker(mode: str, args) -> None:
    """Runs in a subprocess: measure the peak memory of one operation and print
    it as JSON on the last line of stdout."""
    import gc

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

    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    before = _status_kib("VmRSS")
    resettable = _reset_peak()
    if not resettable:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result, (wall, _, _) = timed(operation, device)
    peak = _status_kib("VmHWM") if resettable else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = {
        "mode": mode,
        "atoms": len(systems[0]),
        "grid": len(grid),
        "max_lambda": max_lambda,
        "per_batch": RotatedEvaluator(model, grid).copies_per_batch(systems),
        "rss_before_mib": before / 1024,
        "peak_mib": peak / 1024,
        "increase_mib": (peak - before) / 1024,
        "exact_reset": resettable,
        "seconds": wall,
    }
    if device.type == "cuda":
        report["cuda_increase_mib"] = (
            torch.cuda.max_memory_allocated(device) - cuda_before
        ) / 2**20
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--degree", type=int, default=8, help="O3Grid degree")
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs per case (minimum kept)"
    )
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="4 molecules, an 81-atom water box and a 192-atom memory box",
    )
    parser.add_argument(
        "--pet", choices=sorted(PET_SIZES), default="small", help="PET model size"
    )
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
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_worker is not None:
        memory_worker(args.memory_worker, args)
        return

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
        print(
            f"[{time.perf_counter() - start:6.0f} s] {label}: {case['structures']} "
            f"structures, {case['atoms']} atoms, {case['copies']} rotated copies, "
            f"{case['per_batch']} copies per batch, {case['model_calls']} calls",
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
        reports = {mode: measure_memory(mode, args) for mode in ("call", "analyze")}
        call, full = reports["call"], reports["analyze"]
        print(
            f"(c) peak RSS increase, water box of {full['atoms']} atoms, O3Grid degree "
            f"{args.memory_degree} ({full['grid']} elements, max_lambda "
            f"{full['max_lambda']}), {full['per_batch']} copies per batch"
        )
        if args.memory_degree != args.degree:
            print(
                f"    (degree {args.memory_degree} instead of {args.degree} for (c) "
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

    print()
    print(
        f"total runtime {time.perf_counter() - start:.0f} s, load average "
        f"{os.getloadavg()[0]:.2f} at end"
    )


if __name__ == "__main__":
    main()
