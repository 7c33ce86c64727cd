"""Speed and memory of ``metatrain_symmetry.infinitesimal`` on a water box.

Everything is measured in one run, on the small float64 PET of the engine
benchmarks (energy and non-conservative force heads) and a periodic box of 64
randomly oriented water molecules (192 atoms, about 1 g/cm^3):

(a) the time of the Lie derivatives (and inversion errors) of the model's own
    outputs, ``non_conservative_force`` and a PET feature, by forward mode and
    by double backward, divided by the time of one forward pass of the model on
    the box (energy and non-conservative force, under ``torch.inference_mode()``);
(b) the time of the energy's metrics (its Lie derivatives, which give the
    antisymmetric virial of the box, and its inversion error), then of the
    energy and forces together, divided by the time of the forces alone (one
    forward and one backward pass);
(c) the peak memory each of these adds, against the peak added by the
    corresponding baseline, each measured in a fresh subprocess: the resident
    set on CPU (``VmHWM`` after a reset through ``/proc/self/clear_refs``), and
    also the CUDA allocator's peak on a GPU.

Times are wall-clock seconds, the minimum over ``--repeats`` runs. Run from the
repository root::

    python benchmarks/infinitesimal.py
    python benchmarks/infinitesimal.py --device cuda --repeats 5
"""

import argparse
import json
import os
import subprocess
import sys

import torch
from engine_common import (
    add_model_arguments,
    build_model,
    peak_memory,
    requests,
    timed,
    water_box,
)

import metatrain_symmetry as msym
from metatrain_symmetry.copies import prepare_rotations, rotated_copies
from metatrain_symmetry.systems import prepare_systems


FEATURE = "mtt::feature::gnn_layers.1_node"

CASES = {
    "forward pass": ("forward", None, None),
    "model outputs, forward mode": (
        "outputs",
        ["non_conservative_force", FEATURE],
        "forward",
    ),
    "model outputs, double backward": (
        "outputs",
        ["non_conservative_force", FEATURE],
        "double-backward",
    ),
    "forces": ("forces", None, None),
    "energy (antisymmetric virial)": ("outputs", ["energy"], "auto"),
    "energy and forces": ("outputs", ["energy", "forces"], "auto"),
}
"""case: (kind, outputs, method); the baselines are the forward pass and forces"""

RATIOS = (
    ("model outputs, forward mode", "forward pass"),
    ("model outputs, double backward", "forward pass"),
    ("energy (antisymmetric virial)", "forces"),
    ("energy and forces", "forces"),
)


def operation(case: str, model, systems):
    """The function of no argument that one case times."""
    kind, outputs, method = CASES[case]
    if kind == "outputs":
        return lambda: msym.infinitesimal(model, systems, outputs, method=method)
    if kind == "forward":

        def forward():
            with torch.inference_mode():
                return model.module(systems, requests(), None)

        return forward
    eye = torch.eye(3, dtype=model.dtype, device=model.device)
    prepared = prepare_rotations(systems[0])

    def forces():
        # the rotation is the leaf: its gradient back-propagates through every
        # position and the cell, as forces and virial do
        rotation = eye.clone().requires_grad_(True)
        copies = rotated_copies(prepared, rotation[None])[0]
        energy = model.module(copies, {"energy": requests()["energy"]}, None)
        return torch.autograd.grad(energy["energy"].block().values.sum(), rotation)

    return forces


def worker(case: str, args) -> None:
    """Runs in a subprocess: time one case and measure its peak memory, printed
    as JSON on the last line of stdout."""
    device = torch.device(args.device)
    model = build_model(args.pet, args.device)
    systems = prepare_systems([water_box(4, seed=1)], model)
    function = operation(case, model, systems)
    function()  # warm-up: first-call allocations and kernel choices
    seconds = min(timed(function, device)[1][0] for _ in range(args.repeats))
    result, memory = peak_memory(function, device)
    report = {"seconds": seconds, "atoms": len(systems[0])}
    if memory["exact_reset"]:
        report["rss_increase_mib"] = memory["increase_mib"]
    if "cuda_increase_mib" in memory:
        report["cuda_increase_mib"] = memory["cuda_increase_mib"]
    del result
    print(json.dumps(report))


def measure(case: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", case]
    command += ["--device", args.device, "--pet", args.pet]
    command += ["--repeats", str(args.repeats)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"case '{case}' failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def memory_text(report: dict, key: str) -> str:
    return f"{report[key]:8.1f} MiB" if key in report else "    none"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args)
        return
    reports = {case: measure(case, args) for case in CASES}
    atoms = reports["forward pass"]["atoms"]
    print(f"water box of {atoms} atoms, PET '{args.pet}', device {args.device}")
    print(f"{'case':<32} {'seconds':>9} {'RSS peak':>12} {'CUDA peak':>12}")
    for case, report in reports.items():
        print(
            f"{case:<32} {report['seconds']:9.3f} "
            f"{memory_text(report, 'rss_increase_mib'):>12} "
            f"{memory_text(report, 'cuda_increase_mib'):>12}"
        )
    print("ratios (time; memory, RSS or CUDA peak)")
    key = "cuda_increase_mib" if args.device.startswith("cuda") else "rss_increase_mib"
    for case, baseline in RATIOS:
        time_ratio = reports[case]["seconds"] / reports[baseline]["seconds"]
        line = f"    {case} / {baseline}: time {time_ratio:.2f}"
        if key in reports[case] and key in reports[baseline]:
            memory = reports[case][key] / max(reports[baseline][key], 1e-9)
            line += f", memory {memory:.2f}"
        print(line)


if __name__ == "__main__":
    main()
