"""The main job end to end on data the package makes itself.

``mtt-symmetry demo -o DIR`` generates rattled and strained copper cells labelled
with ASE's EMT calculator, trains a small unconstrained PET (energy and
non-conservative forces, no rotational augmentation beyond metatrain's defaults)
with ``mtt train``, and analyses the symmetry of its outputs and of the node
features after each message-passing layer on the validation structures.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np


OPTIONS = """\
seed: 0
base_precision: 64
architecture:
  name: pet
  model:
    cutoff: 4.0
    d_pet: 16
    d_head: 16
    d_node: 32
    d_feedforward: 32
    num_heads: 2
    num_attention_layers: 1
    num_gnn_layers: 2
  training:
    batch_size: 8
    num_epochs: {epochs}
    learning_rate: 0.003
    log_interval: 10
    checkpoint_interval: {epochs}
training_set:
  systems: {{read_from: train.xyz, length_unit: angstrom}}
  targets: &targets
    energy: {{key: energy, unit: eV, forces: false, stress: false}}
    non_conservative_force:
      key: forces
      quantity: force
      unit: eV/A
      type: {{cartesian: {{rank: 1}}}}
      per_atom: true
validation_set:
  systems: {{read_from: validation.xyz, length_unit: angstrom}}
  targets: *targets
test_set: 0.0
"""


def make_dataset(n_structures: int = 40, seed: int = 0):
    """Rattled, strained 8-atom copper cells with EMT energies and forces."""
    import ase.build
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    frames = []
    for index in range(n_structures):
        atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
        atoms.rattle(0.12, seed=seed + index)
        strain = np.eye(3) + 0.03 * rng.normal(size=(3, 3))
        atoms.set_cell(atoms.cell @ strain, scale_atoms=True)
        atoms.calc = EMT()
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        atoms.calc = None
        atoms.info["energy"] = energy
        atoms.arrays["forces"] = forces
        frames.append(atoms)
    return frames


def run_demo(output: Path, epochs: int = 30) -> None:
    import ase.io

    import metatrain_symmetry as msym

    from .report import (
        atomic_directory,
        plot_spectra,
        save_result,
        summary_table,
    )

    if epochs < 1:
        raise ValueError(f"--epochs must be positive, got {epochs}")
    with atomic_directory(output) as staging:
        print("[1/3] generating 40 copper structures with ASE's EMT calculator")
        frames = make_dataset()
        training = staging / "training"
        training.mkdir()
        ase.io.write(training / "train.xyz", frames[:32])
        ase.io.write(training / "validation.xyz", frames[32:])
        (training / "options.yaml").write_text(OPTIONS.format(epochs=epochs))

        print(f"[2/3] training a small PET for {epochs} epochs with 'mtt train'")
        command = [sys.executable, "-m", "metatrain", "train", "options.yaml"]
        command += ["-o", "model.pt"]
        with open(training / "train.log", "w") as log:
            process = subprocess.run(
                command, cwd=training, stdout=log, stderr=subprocess.STDOUT
            )
        if process.returncode != 0:
            tail = (training / "train.log").read_text().splitlines()[-5:]
            raise RuntimeError(
                "'mtt train' failed: " + " | ".join(line.strip() for line in tail)
            )

        print("[3/3] analysing outputs and layer features on rotated copies")
        model = msym.load_model(training / "model.ckpt")
        layers = [
            name
            for name in model.features
            if name.startswith("mtt::feature::gnn_layers.")
            and name.endswith("_node")
            and name.count(".") == 1
        ]
        names = ["energy", "non_conservative_force", *layers]
        result = msym.analyze(model, frames[32:], names, max_lambda=4, progress=True)
        analysis = staging / "analysis"
        analysis.mkdir()
        save_result(result, analysis)
        summary = summary_table(result)
        (staging / "summary.md").write_text(
            "# metatrain-symmetry demo\n\n"
            + textwrap.dedent(
                f"""\
                Small PET trained for {epochs} epochs on EMT copper; analysis of the
                {len(frames) - 32} validation structures on an O3Grid of degree
                {result.grid.degree} ({len(result.grid)} elements). Equivariance
                RMSE in the output's units; spectra are dataset means.

                """
            )
            + summary
        )
        plot_spectra({"small PET (EMT copper)": result}, staging / "spectra.png")

    print()
    print(summary)
    print(f"Done. Look at {output}/summary.md and {output}/spectra.png;")
    print(f"TensorMaps are in {output}/analysis/, the trained model in")
    print(f"{output}/training/ (model.pt, model.ckpt, train.log).")
