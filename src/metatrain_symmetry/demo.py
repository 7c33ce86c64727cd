"""The main job end to end on data the package makes itself.

``mtt-symmetry demo -o DIR`` generates rattled and strained copper cells labelled
with ASE's EMT calculator and trains the same small unconstrained PET twice with
``mtt train`` from the same seed: once with metatrain's plain MSE loss, once with
the ``equivariance`` penalty on its energy and non-conservative forces. It then
audits both models on the validation structures (equivariance errors, leakage,
spectra of outputs and of the node features after each message-passing layer,
chemiscope dataset and offline viewer) and writes a side-by-side comparison.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from .testing import pet_options


PENALTY = """\
loss:
  energy: {{type: equivariance, base: mse, gamma: {gamma}, n_rotations: 2}}
  non_conservative_force:
    type: equivariance
    base: mse
    gamma: {gamma}
    n_rotations: 2
"""

# the two trainings: (directory name, label, loss section of the options)
RUNS = (
    ("plain", "plain MSE", ""),
    ("penalized", "equivariance penalty", PENALTY),
)


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


def _train(directory: Path, options: str) -> None:
    directory.mkdir()
    (directory / "options.yaml").write_text(options)
    command = [sys.executable, "-m", "metatrain", "train", "options.yaml"]
    command += ["-o", "model.pt"]
    with open(directory / "train.log", "w") as log:
        process = subprocess.run(
            command, cwd=directory, stdout=log, stderr=subprocess.STDOUT
        )
    if process.returncode != 0:
        tail = (directory / "train.log").read_text().splitlines()[-5:]
        raise RuntimeError(
            "'mtt train' failed: " + " | ".join(line.strip() for line in tail)
        )


def comparison_table(summaries: dict[str, dict]) -> str:
    """Markdown table comparing audits: for each output, the error against the
    reference, the equivariance RMSE and its ratio to the error, and the
    leakage, one row per audited model."""
    lines = [
        "| output | model | RMSE vs reference | equivariance RMSE (mean) "
        "| equivariance / RMSE | leakage (mean) |",
        "|---|---|---|---|---|---|",
    ]
    names = next(iter(summaries.values()))["outputs"]
    for name in names:
        for label, summary in summaries.items():
            entry = summary["outputs"][name]
            target = entry["target"] or {}
            equivariance = entry["equivariance_rmse"]
            leakage = entry["leakage"] or {}
            lines.append(
                f"| `{name}` | {label} | {_number(target.get('rmse'))} "
                f"| {_number(equivariance['mean'])} "
                f"| {_number(equivariance.get('fraction_of_rmse'))} "
                f"| {_number(leakage.get('mean'))} |"
            )
    return "\n".join(lines) + "\n"


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.3e}"


def run_demo(output: Path, epochs: int = 20, gamma: float = 10.0) -> None:
    import ase.io

    import metatrain_symmetry as msym

    from ._utils import atomic_directory
    from .audit import audit
    from .audit_files import write_audit_report
    from .dynamics import layer_features
    from .report import plot_spectra

    if epochs < 1:
        raise ValueError(f"--epochs must be positive, got {epochs}")
    if gamma <= 0:
        raise ValueError(f"--gamma must be positive, got {gamma}")
    with atomic_directory(output) as staging:
        print("[1/4] generating 40 copper structures with ASE's EMT calculator")
        frames = make_dataset()
        training = staging / "training"
        training.mkdir()
        ase.io.write(training / "train.xyz", frames[:32])
        ase.io.write(training / "validation.xyz", frames[32:])
        validation = frames[32:]

        for step, (name, label, loss) in enumerate(RUNS, start=2):
            print(f"[{step}/4] training a small PET ({label}) for {epochs} epochs")
            options = pet_options(
                epochs,
                training=PENALTY.format(gamma=gamma) if loss else "",
                data="../",
            )
            _train(training / name, options)

        print("[4/4] auditing both models on rotated copies of the validation set")
        summaries, analyses = {}, {}
        for name, label, _ in RUNS:
            model = msym.load_model(training / name / "model.ckpt")
            result = audit(
                model,
                validation,
                outputs=["energy", "non_conservative_force"],
                features=layer_features(model),
                max_lambda=4,
                progress=True,
            )
            directory = staging / f"audit-{name}"
            directory.mkdir()
            write_audit_report(result, validation, directory)
            summaries[label] = result.summary
            analyses[label] = result.analysis

        table = comparison_table(summaries)
        (staging / "summary.md").write_text(
            "# metatrain-symmetry demo\n\n"
            f"The same small PET trained for {epochs} epochs on EMT copper with a "
            f"plain MSE loss and with the equivariance penalty (gamma = {gamma} on "
            "the energy and the non-conservative forces), audited on the "
            f"{len(validation)} validation structures. Errors and equivariance "
            "RMSE in the output's units (eV, eV/A).\n\n" + table
        )
        plot_spectra(analyses, staging / "spectra.png")

    print()
    print(table)
    print(f"Done. Look at {output}/summary.md and {output}/spectra.png;")
    for name, _, _ in RUNS:
        print(
            f"  {output}/audit-{name}/: audit.md, audit.json, spectra.png, and "
            "audit.html (open it in a browser: structures, maps and force "
            "deviations in chemiscope)"
        )
    print(f"trained models and logs are in {output}/training/<plain|penalized>/.")
