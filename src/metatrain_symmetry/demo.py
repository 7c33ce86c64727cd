"""The main job end to end on data the package makes itself.

``mtt-symmetry demo -o DIR`` generates rattled copper cells labelled
with ASE's EMT calculator and trains the same small unconstrained PET twice with
``mtt train`` from the same seed, at the same time: once with metatrain's plain MSE
loss, once with the ``equivariance`` penalty on its energy and non-conservative
forces. It retrains the readout of the plain model in closed form for a sweep of
penalty weights, audits both trained models on the validation structures
(equivariance errors, leakage, spectra of outputs and of the node features after
each message-passing layer, chemiscope dataset and offline viewer), and writes a
comparison in plain words (``summary.md``) and in numbers (``summary.json``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
import torch

from ._utils import atomic_directory
from .audit import audit, write_audit_report
from .diagnostics import plot_spectra
from .dynamics import layer_features
from .models import load_model
from .retrain import DEFAULT_GAMMAS, retrain_last_layer
from .testing import pet_options


# the two trainings: (directory name, label, penalised)
RUNS = (("plain", "plain MSE", False), ("penalized", "equivariance penalty", True))

OUTPUTS = ("energy", "non_conservative_force")
"""outputs compared in the summary"""

REFERENCE_KEYS = {"energy": "energy", "non_conservative_force": "forces"}
"""where the reference of each output is in the generated structures"""

RETRAIN_GAMMAS = DEFAULT_GAMMAS

# spectra up to lambda = 2 resolve what forces and energies should not carry, on a
# grid five times smaller than lambda = 4 needs
AUDIT_MAX_LAMBDA = 2

# measured (2 cores, 60 epochs): every RMSE at most 0.07 of the reference spread,
# and the penalty makes the forces 2.8 times more equivariant at -3 % force RMSE;
# gamma = 30 makes them 3.6 times more equivariant but their RMSE 2.6 times larger
DEFAULT_EPOCHS = 60
DEFAULT_GAMMA = 10.0

# rotated copies per structure and step in the penalised training: with two, a
# penalty strong enough to make the forces three times more equivariant also
# slowed their learning (measured: +40 % force RMSE after 60 epochs at gamma = 10,
# against +0 % with four copies)
PENALTY_ROTATIONS = 4

N_TRAIN = 160
N_VALIDATION = 20

# small enough to train in about a minute per model on one core; the learning rate
# is high and decays to zero over the run (metatrain's schedule)
MODEL = {"width": 32, "cutoff": 3.2, "learning_rate": 0.005, "precision": 32}


def penalty_options(gamma: float) -> str:
    """The ``loss`` section of the penalised training, unindented YAML."""
    entry = (
        f"{{type: equivariance, base: mse, gamma: {gamma}, "
        f"n_rotations: {PENALTY_ROTATIONS}}}"
    )
    return f"loss:\n  energy: {entry}\n  non_conservative_force: {entry}\n"


def make_dataset(
    n_structures: int = 40,
    seed: int = 0,
    repeats: tuple[int, int, int] = (2, 1, 1),
    rattle: float = 0.12,
    strain: float = 0.03,
):
    """Rattled, strained copper cells with EMT energies and forces.

    :param n_structures: number of structures
    :param seed: seed of the displacements and strains
    :param repeats: repetitions of the 4-atom cubic fcc cell (a = 3.6 A)
    :param rattle: standard deviation of the atomic displacements (A)
    :param strain: standard deviation of the entries of the random strain
    :return: ``ase.Atoms`` with ``info["energy"]`` (eV) and ``arrays["forces"]``
        (eV/A)
    """
    import ase.build
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    frames = []
    for index in range(n_structures):
        atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True) * repeats
        atoms.rattle(rattle, seed=seed + index)
        deformation = np.eye(3) + strain * rng.normal(size=(3, 3))
        atoms.set_cell(atoms.cell @ deformation, scale_atoms=True)
        atoms.calc = EMT()
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        atoms.calc = None
        atoms.info["energy"] = energy
        atoms.arrays["forces"] = forces
        frames.append(atoms)
    return frames


def _start_training(directory: Path, options: str):
    directory.mkdir()
    (directory / "options.yaml").write_text(options)
    command = [sys.executable, "-m", "metatrain", "train", "options.yaml"]
    command += ["-o", "model.pt"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(directory / "train.log", "w")
    process = subprocess.Popen(
        command, cwd=directory, stdout=log, stderr=subprocess.STDOUT, env=environment
    )
    return process, log


def _train_all(directories: dict[str, Path], options: dict[str, str]) -> dict:
    """Run the trainings at the same time, one thread each; return the wall time
    of each (s).

    One thread each makes the trained models, and so the demo's numbers, the same
    on every machine with the same PyTorch build: the order of floating-point sums
    depends on the number of threads, and a minute of training at a high learning
    rate amplifies such differences.
    """
    start = time.perf_counter()
    running = {
        name: _start_training(directories[name], options[name]) for name in directories
    }
    seconds, failures = {}, []
    for name, (process, log) in running.items():
        process.wait()
        log.close()
        seconds[name] = time.perf_counter() - start
        if process.returncode != 0:
            tail = (directories[name] / "train.log").read_text().splitlines()[-5:]
            failures.append(f"{name}: " + " | ".join(line.strip() for line in tail))
    if failures:
        raise RuntimeError("'mtt train' failed: " + "; ".join(failures))
    return seconds


def reference_spread(frames, name: str) -> float:
    """Standard deviation of the reference values of an output over ``frames``
    (over structures for the energy, over atoms and components for forces)."""
    key = REFERENCE_KEYS[name]
    if name == "energy":
        values = np.array([atoms.info[key] for atoms in frames])
    else:
        values = np.concatenate([atoms.arrays[key].reshape(-1) for atoms in frames])
    return float(values.std())


def model_numbers(summary: dict, frames) -> dict:
    """Per output: RMSE against the reference, the reference's standard deviation,
    their ratio, the mean equivariance RMSE, its ratio to the RMSE, and the mean
    leakage, from an audit summary (``AuditResult.summary``)."""
    numbers = {}
    for name in OUTPUTS:
        entry = summary["outputs"][name]
        rmse = entry["target"]["rmse"]
        spread = reference_spread(frames, name)
        equivariance = entry["equivariance_rmse"]["mean"]
        numbers[name] = {
            "unit": entry["unit"],
            "rmse": rmse,
            "reference_std": spread,
            "rmse_over_reference_std": rmse / spread,
            "equivariance_rmse": equivariance,
            "equivariance_rmse_over_rmse": equivariance / rmse,
            "leakage": entry["leakage"]["mean"],
        }
    return numbers


def comparison_table(models: dict[str, dict], labels: dict[str, str]) -> str:
    """Markdown table of :py:func:`model_numbers`, one row per output and model."""
    lines = [
        "| output | model | RMSE | reference std | RMSE / std "
        "| equivariance RMSE | equivariance / RMSE | leakage |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in OUTPUTS:
        for model, numbers in models.items():
            entry = numbers[name]
            lines.append(
                f"| `{name}` ({entry['unit']}) | {labels[model]} "
                f"| {entry['rmse']:.3g} | {entry['reference_std']:.3g} "
                f"| {entry['rmse_over_reference_std']:.2f} "
                f"| {entry['equivariance_rmse']:.3g} "
                f"| {entry['equivariance_rmse_over_rmse']:.2g} "
                f"| {entry['leakage']:.2e} |"
            )
    return "\n".join(lines) + "\n"


def retrain_numbers(result) -> dict:
    """Validation RMSE and equivariance RMSE of each retrained output, per gamma."""
    return {
        "gammas": list(result.gammas),
        "outputs": {
            name: {
                "rmse": result.validation_rmse[name].tolist(),
                "equivariance_rmse": result.validation_equivariance_rmse[name].tolist(),
            }
            for name in result.validation_rmse
        },
    }


LEARNED = 0.2
"""largest RMSE / reference std of a model said to have learned an output"""

COLUMNS = """\
## What the columns mean

- **RMSE**: root-mean-square error of the model's predictions against the EMT \
reference on the validation structures (per structure for the energy, per force \
component for the forces).
- **reference std**: the spread (standard deviation) of the reference values. A \
model that predicted only their average would have an RMSE equal to it, so \
**RMSE / std** says how much the model learned: 0 is perfect, 1 is nothing.
- **equivariance RMSE**: how much the prediction changes when the structure is \
rotated (or inverted) and the prediction is rotated back: the root-mean-square \
deviation from the prediction averaged over all orientations. It is zero for an \
exactly equivariant model; PET is not one, and learns the symmetry only from \
randomly rotated training data.
- **equivariance / RMSE**: how large the error due to broken symmetry is, \
compared with the whole error.
- **leakage**: the fraction of the output that transforms in a way the physical \
quantity never does (for an energy, anything that is not rotationally invariant; \
for forces, anything that does not rotate as a vector).
"""


def explanation(numbers: dict) -> str:
    """What the columns mean and what the numbers show, in plain sentences."""
    plain = numbers["models"]["plain"]
    penalized = numbers["models"]["penalized"]
    force = "non_conservative_force"
    worst = max(
        model[name]["rmse_over_reference_std"]
        for model in numbers["models"].values()
        for name in OUTPUTS
    )
    if worst <= LEARNED:
        learned = (
            f"Both models learned: every RMSE is at most {worst:.2f} times the "
            "spread of the reference."
        )
    else:
        learned = (
            f"The models did not learn enough to compare them: an RMSE is "
            f"{worst:.2f} times the spread of the reference (more than "
            f"{LEARNED}); train longer with --epochs."
        )
    before = plain[force]["equivariance_rmse"]
    after = penalized[force]["equivariance_rmse"]
    change = penalized[force]["rmse"] / plain[force]["rmse"] - 1.0
    penalty = (
        f"The equivariance penalty made the forces {before / after:.1f} times more "
        f"equivariant ({before:.3g} eV/A without it, {after:.3g} eV/A with it), "
        f"while the force RMSE changed by {100 * change:+.0f} %."
    )
    gammas = numbers["retrain"]["gammas"]
    sweep = numbers["retrain"]["outputs"][force]
    retrain = (
        "Retraining only the last layer of the plain model in closed form "
        "(`retrain-plain/`, plotted in `retrain-plain/pareto.png`) trades "
        f"accuracy for symmetry in {numbers['seconds']['retrain']:.0f} s: from "
        f"gamma = {gammas[0]:g} to {gammas[-1]:g}, the validation force "
        f"equivariance RMSE goes from {sweep['equivariance_rmse'][0]:.3g} to "
        f"{sweep['equivariance_rmse'][-1]:.3g} eV/A and the force RMSE from "
        f"{sweep['rmse'][0]:.3g} to {sweep['rmse'][-1]:.3g} eV/A (on random "
        "rotations, so slightly different from the audits' figures)."
    )
    return (
        COLUMNS
        + "\n## What the numbers show\n\n"
        + "".join(f"- {line}\n" for line in (learned, penalty, retrain))
    )


def run_demo(
    output: Path, epochs: int = DEFAULT_EPOCHS, gamma: float = DEFAULT_GAMMA
) -> dict:
    """Run the demo into ``output`` (a new directory, written atomically).

    :param output: output directory
    :param epochs: training epochs of each model
    :param gamma: weight of the penalty in the penalised training
    :return: the numbers of ``summary.json``
    """
    if epochs < 1:
        raise ValueError(f"--epochs must be positive, got {epochs}")
    if gamma <= 0:
        raise ValueError(f"--gamma must be positive, got {gamma}")
    with atomic_directory(output) as staging:
        n_total = N_TRAIN + N_VALIDATION
        print(f"[1/5] generating {n_total} copper cells with ASE's EMT calculator")
        # unstrained cells: with strained ones, most of the energy's spread came
        # from the second and third neighbour shells, beyond the small cutoff,
        # and no model could learn it (RMSE 0.24 of the spread, against 0.07)
        frames = make_dataset(n_total, repeats=(1, 1, 1), rattle=0.1, strain=0.0)
        training = staging / "training"
        training.mkdir()
        ase.io.write(training / "train.xyz", frames[:N_TRAIN])
        ase.io.write(training / "validation.xyz", frames[N_TRAIN:])
        validation = frames[N_TRAIN:]
        seconds = _train_models(training, epochs, gamma)
        sweep, seconds["retrain"] = _retrain_plain(staging, training, frames)
        print("[4/5] auditing both models on rotated copies of the validation set")
        models, analyses = _audit_models(staging, training, validation)
        print("[5/5] writing the comparison")
        numbers = {
            "epochs": epochs,
            "gamma": gamma,
            "n_train": N_TRAIN,
            "n_validation": N_VALIDATION,
            "models": models,
            "retrain": retrain_numbers(sweep),
            "seconds": seconds,
        }
        table = comparison_table(models, {name: label for name, label, _ in RUNS})
        _write_comparison(staging, numbers, table, analyses)
    print()
    print(table)
    _print_contents(output)
    return numbers


def _train_models(training: Path, epochs: int, gamma: float) -> dict:
    """Both trainings (see :py:data:`RUNS`), at once; their wall times (s)."""
    print(
        f"[2/5] training a small PET twice at the same time for {epochs} "
        f"epochs: plain MSE, and equivariance penalty with gamma = {gamma}"
    )
    options = {
        name: pet_options(
            epochs,
            **MODEL,
            batch_size=8,
            training=penalty_options(gamma) if penalised else "",
            data="../",
            # the audits below evaluate the models; metatrain's own final
            # evaluation would add about a minute of compilation
            final_eval=False,
        )
        for name, _, penalised in RUNS
    }
    return _train_all({name: training / name for name in options}, options)


def _retrain_plain(staging: Path, training: Path, frames: list):
    """The closed-form readout sweep of the plain model, and its time (s)."""
    print(
        "[3/5] retraining the plain model's last layer in closed form for "
        "gamma = " + ", ".join(f"{g:g}" for g in RETRAIN_GAMMAS)
    )
    start = time.perf_counter()
    sweep = retrain_last_layer(
        training / "plain" / "model.ckpt",
        frames[:N_TRAIN],
        frames[N_TRAIN:],
        gammas=RETRAIN_GAMMAS,
        output=staging / "retrain-plain",
        progress=True,
    )
    return sweep, time.perf_counter() - start


def _audit_models(staging: Path, training: Path, validation: list):
    """Audit both trained models, writing ``audit-<name>/``; per model its
    :py:func:`model_numbers`, and per label its analysis."""
    models, analyses = {}, {}
    for name, label, _ in RUNS:
        # trained in float32 for speed; audited in float64, so that round-off
        # stays far below the errors measured
        model = load_model(training / name / "model.ckpt", dtype=torch.float64)
        result = audit(
            model,
            validation,
            outputs=list(OUTPUTS),
            features=layer_features(model),
            max_lambda=AUDIT_MAX_LAMBDA,
            progress=True,
        )
        directory = staging / f"audit-{name}"
        directory.mkdir()
        write_audit_report(result, directory)
        models[name] = model_numbers(result.summary, validation)
        analyses[label] = result.analysis
    return models, analyses


def _write_comparison(staging: Path, numbers: dict, table: str, analyses) -> None:
    """``summary.json``, ``summary.md`` and ``spectra.png``."""
    (staging / "summary.json").write_text(json.dumps(numbers, indent=2) + "\n")
    (staging / "summary.md").write_text(
        "# metatrain-symmetry demo\n\n"
        f"The same small PET trained for {numbers['epochs']} epochs on {N_TRAIN} "
        "EMT copper cells with a plain MSE loss and with the equivariance penalty "
        f"(gamma = {numbers['gamma']} on the energy and the non-conservative "
        f"forces), audited on {N_VALIDATION} validation cells. Energies in eV, "
        "forces in eV/A.\n\n" + table + "\n" + explanation(numbers)
    )
    plot_spectra(analyses, staging / "spectra.png")


def _print_contents(output: Path) -> None:
    print(f"Done. Look at {output}/summary.md and {output}/spectra.png;")
    for name, _, _ in RUNS:
        print(
            f"  {output}/audit-{name}/: audit.md, audit.json, spectra.png, and "
            "audit.html (open it in a browser: structures, maps and force "
            "deviations in chemiscope)"
        )
    print(f"  {output}/retrain-plain/pareto.png: the closed-form trade-off;")
    print(f"trained models and logs are in {output}/training/<plain|penalized>/.")
