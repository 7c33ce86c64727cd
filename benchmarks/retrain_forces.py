"""Closed-form retraining with conservative forces on bulk water: time per rotated
copy against one forward and backward pass of the same model on that copy, and
peak memory as the number of structures doubles, measured in one run.

A PET whose energy is trained with forces (position gradients) is retrained on the
first 1, 2, 4, ... boxes of 192 atoms of the shared DFT water data; each size runs
in its own process, whose peak resident memory the parent reads when it ends.
Model calls evaluate ``--batch-size`` rotated copies at a time (by default the
copies of one structure), so that the peak memory set by one call is the same for
every number of structures, and anything that grows with them shows.

Usage: python benchmarks/retrain_forces.py [--data FILE] [--structures 1 2 4]
    [--rotations 2] [--batch-size N]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


DATA = Path(__file__).parents[2] / "shared" / "data" / "water-revpbe0"
DEFAULT_DATA = DATA / "water-bulk-100.xyz"


def water_checkpoint(path: Path) -> int:
    """Save a PET for water whose energy is trained with forces; return the number
    of readout features per atom."""
    from metatrain.pet import PET
    from metatrain.utils.architectures import get_default_hypers
    from metatrain.utils.data import DatasetInfo
    from metatrain.utils.data.target_info import get_energy_target_info

    torch.manual_seed(0)
    hypers = get_default_hypers("pet")["model"]
    hypers.update(
        d_pet=32,
        d_head=32,
        d_node=64,
        d_feedforward=64,
        num_heads=4,
        num_attention_layers=1,
        num_gnn_layers=2,
        cutoff=4.5,
    )
    energy = get_energy_target_info(
        "energy", {"quantity": "energy", "unit": "eV"}, add_position_gradients=True
    )
    info = DatasetInfo(
        length_unit="Angstrom", atomic_types=[1, 8], targets={"energy": energy}
    )
    model = PET(hypers, info).to(torch.float64)
    torch.save(model.get_checkpoint(), path)
    return model.last_layer_feature_size


def forward_backward_seconds(checkpoint: Path, frames, grid) -> float:
    """Seconds for the energy and its forces (one forward and one backward pass)
    on every rotated copy the retraining evaluates, one copy at a time."""
    from metatomic.torch import ModelOutput

    import metatrain_symmetry as msym
    from metatrain_symmetry.copies import prepare_rotations, rotated_copies
    from metatrain_symmetry.systems import prepare_systems

    model = msym.load_model(checkpoint)
    identity = torch.eye(3, dtype=torch.float64)[None]
    rotations = torch.cat([identity, grid.rotations]).to(model.dtype)
    requests = {"energy": ModelOutput(sample_kind="system")}
    elapsed = 0.0
    for system in prepare_systems(frames, model):
        prepared = prepare_rotations(system)
        for rotation in rotations:
            (copy,), ((positions, _),) = rotated_copies(
                prepared, rotation[None], differentiable=True
            )
            start = time.perf_counter()
            energy = model([copy], requests)["energy"].block().values.sum()
            torch.autograd.grad(energy, positions)
            elapsed += time.perf_counter() - start
    return elapsed


def child(args) -> None:
    import ase.io

    import metatrain_symmetry as msym

    torch.set_num_threads(args.threads)
    frames = ase.io.read(args.data, f":{args.child}")
    grid = msym.O3Grid.random(args.rotations, seed=0)
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = Path(directory) / "model.ckpt"
        n_features = water_checkpoint(checkpoint)
        # the floor before and after the retraining: the smaller of the two is the
        # least disturbed by other work on the machine
        floor = forward_backward_seconds(checkpoint, frames, grid)
        start = time.perf_counter()
        msym.retrain_last_layer(
            checkpoint,
            frames,
            gammas=[0.0, 1.0],
            targets=["energy"],
            grid=grid,
            batch_size=args.batch_size or len(grid) + 1,
        )
        retrain = time.perf_counter() - start
        floor = min(floor, forward_backward_seconds(checkpoint, frames, grid))
    copies = len(frames) * (len(grid) + 1)
    print(
        json.dumps(
            {
                "copies": copies,
                "retrain": retrain,
                "forward_backward": floor,
                "features": n_features,
            }
        )
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--structures", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rotations", type=int, default=2)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="rotated copies per model call (default: those of one structure)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args)
        return
    if not Path(args.data).is_file():
        sys.exit(f"error: data file '{args.data}' does not exist; pass --data FILE")

    print(
        "structures | copies | retrain s/copy | forward+backward s/copy | ratio "
        "| peak RSS (MB)"
    )
    for n in args.structures:
        command = [sys.executable, __file__, "--child", str(n), "--data", args.data]
        command += ["--rotations", str(args.rotations), "--threads", str(args.threads)]
        if args.batch_size is not None:
            command += ["--batch-size", str(args.batch_size)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        output = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        if status != 0:
            sys.exit(f"error: the run on {n} structures failed")
        figures = json.loads(output.strip().splitlines()[-1])
        per_copy = figures["retrain"] / figures["copies"]
        floor = figures["forward_backward"] / figures["copies"]
        print(
            f"{n} | {figures['copies']} | {per_copy:.3f} | {floor:.3f} "
            f"| {per_copy / floor:.1f} | {usage.ru_maxrss / 1024:.0f}",
            flush=True,
        )
    print(
        f"readout features per atom: {figures['features']}; the force design needs "
        f"{figures['features'] + 2} backward passes per copy (one per readout "
        "column), the floor one"
    )


if __name__ == "__main__":
    main()
