"""Inputs, model and timing shared by the engine benchmarks
(``engine_speed.py`` and ``engine_memory.py``)."""

import argparse
import os
import time

import ase
import ase.build
import numpy as np
import torch
from metatomic.torch import ModelOutput
from scipy.spatial.transform import Rotation

import metatrain_symmetry as msym
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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def busy_seconds() -> float | None:
    """CPU seconds spent by the whole machine (all processes) since boot."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal
    busy = sum(fields) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def status_kib(field: str) -> int | None:
    """A field of ``/proc/self/status`` in KiB (``VmRSS``, ``VmHWM``), or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the resident-set high-water mark; False where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def timed(function, device: torch.device):
    """Run ``function()`` and return ``(result, (wall, cpu, other))``: wall-clock
    seconds, CPU seconds of this process, and the average number of cores that
    other processes kept busy meanwhile (``nan`` where unknown)."""
    synchronize(device)
    busy = busy_seconds()
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    synchronize(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    other = float("nan")
    after = busy_seconds()
    if busy is not None and after is not None and wall > 0:
        other = max(0.0, after - busy - cpu) / wall
    return result, (wall, cpu, other)


def peak_memory(operation, device: torch.device):
    """Run ``operation()`` once and return ``(result, report)``: its wall-clock
    seconds and the peak memory it added, resident (``increase_mib``, from the
    high-water mark after a reset, else ``ru_maxrss`` since the process started:
    ``exact_reset`` says which) and on CUDA (``cuda_increase_mib``)."""
    import gc
    import resource

    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    before = status_kib("VmRSS")
    resettable = reset_peak()
    if not resettable:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result, (wall, _, _) = timed(operation, device)
    peak = status_kib("VmHWM") if resettable else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = {
        "rss_before_mib": before / 1024,
        "peak_mib": peak / 1024,
        "increase_mib": (peak - before) / 1024,
        "exact_reset": resettable,
        "seconds": wall,
    }
    if device.type == "cuda":
        peak_cuda = torch.cuda.max_memory_allocated(device) - cuda_before
        report["cuda_increase_mib"] = peak_cuda / 2**20
    return result, report


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both benchmarks share: model size, device and input sizes."""
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="4 molecules, an 81-atom water box and a 192-atom memory box",
    )
    parser.add_argument(
        "--pet", choices=sorted(PET_SIZES), default="small", help="PET model size"
    )
