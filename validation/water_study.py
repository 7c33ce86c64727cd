"""Validation on real DFT water: the findings of Langer et al. (2024) and Domina et
al. (2026) reproduced with metatrain-symmetry end to end.

    python validation/water_study.py -o DIR [--quick] [--data FILE] [--extra NAME=FILE]

Data: revPBE0-D3 bulk liquid water (100 boxes of 64 molecules, energies and
forces), from the data archive of Langer, Pozdnyakov and Ceriotti, Mach. Learn.:
Sci. Technol. 5, 04LT01 (2024); see ``../shared/data/water-revpbe0/README.md``.
The boxes are split into training, validation and test boxes, then:

1. a small PET is trained with ``mtt train`` twice, on energies with conservative
   forces (as Langer et al.) and on energies with non-conservative forces (as
   Domina et al.), keeping intermediate checkpoints;
2. both are audited on the test boxes, on water molecules and dimers cut out of
   them, on an ice Ih cell and on every ``--extra`` set;
3. spectra of outputs and features across epochs and layers
   (``training_dynamics``);
4. the accuracy-equivariance trade-off of the conservative model: fine-tuning
   with the ``equivariance`` loss through ``mtt train``, by rotated copies and by
   generators (the same epochs, then the same wall time), against the closed-form
   readout retraining sweep, timed;
5. the symmetrized export of the conservative model: its equivariance error and
   its cost per evaluation against the plain export.

DIR receives ``report.md``, ``report.json``, the figures, the models under
``DIR/models/`` and every audit under ``DIR/audits/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from water_consequences import report_lines as consequences_lines
from water_consequences import stage_consequences

from metatrain_symmetry.testing import CONSERVATIVE_TARGETS, PET_TARGETS
from metatrain_symmetry.testing import pet_options as testing_pet_options


ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "water-revpbe0" / "water-bulk-100.xyz"

# Langer, Pozdnyakov, Ceriotti, Mach. Learn.: Sci. Technol. 5, 04LT01 (2024), for
# their PET model of revPBE0-D3 water: the rotational error relative to the test
# error on the bulk liquid, and the force error of an isolated molecule
PUBLISHED = {
    "source": "Langer, Pozdnyakov, Ceriotti, Mach. Learn.: Sci. Technol. 5, 04LT01 "
    "(2024), PET model of revPBE0-D3 water",
    "bulk_energy_equivariance_over_mae": 0.07,
    "bulk_forces_equivariance_over_mae": 0.12,
    "molecule_forces_equivariance_rmse_meV_per_A": 11.8,
}

# Two sizes of the same pipeline. "quick" is a test of the suite (a few minutes
# on two cores); "full" is sized to finish within about 90 minutes there. Both
# models train at the same time, one thread each, in float32 (three to five
# times cheaper than float64 on a CPU); every analysis runs them in float64, so
# that float32 round-off (meV on the energy of a box) does not hide their
# equivariance errors. PET's forces stay at their initial error for the first few
# hundred optimizer steps, so the runs take one box per step and many epochs.
CONFIGS = {
    "quick": {
        "n_train": 6,
        "n_validation": 2,
        "n_test": 3,
        "width": 8,
        "gnn_layers": 2,
        "cutoff": 3.5,
        "batch_size": 2,
        "precision": 32,
        "epochs": {"conservative": 2, "non-conservative": 2},
        "checkpoints": 2,
        "learning_rate": 3e-3,
        "rotations": 10,
        "max_lambda": 3,
        "molecules_per_box": 2,
        "dimers_per_box": 1,
        "ice_repeats": (2, 2, 1),
        "dynamics_boxes": 1,
        "finetune_gammas": [1.0],
        "finetune_epochs": 1,
        "generator_gammas": [1.0],
        "retrain_gammas": [0.0, 10.0],
        "retrain_rotations": 4,
        "symmetrize_degree": 3,
        "symmetrized_audit_boxes": 0,
        "symmetrized_audit_clusters": 6,
        "timing_set": "ice Ih",
        "timing_repeats": 2,
    },
    "full": {
        "n_train": 60,
        "n_validation": 10,
        "n_test": 30,
        "width": 16,
        "gnn_layers": 2,
        "cutoff": 4.0,
        "batch_size": 1,
        "precision": 32,
        "epochs": {"conservative": 300, "non-conservative": 400},
        "checkpoints": 10,
        "learning_rate": 3e-3,
        "rotations": 16,
        "max_lambda": 4,
        "molecules_per_box": 4,
        "dimers_per_box": 2,
        "ice_repeats": (3, 2, 2),
        "dynamics_boxes": 3,
        "finetune_gammas": [0.0, 1.0, 10.0],
        "finetune_epochs": 5,
        # the generator penalty on the forces costs about 2.5 times the rotated
        # copies per epoch: one gamma adds about ten minutes to the run
        "generator_gammas": [10.0],
        "retrain_gammas": [0.0, 0.1, 1.0, 10.0, 100.0],
        "retrain_rotations": 8,
        "symmetrize_degree": 3,
        "symmetrized_audit_boxes": 1,
        "symmetrized_audit_clusters": 10,
        "timing_set": "test",
        "timing_repeats": 5,
    },
}

# name: (``mtt train`` targets, force output): energies with conservative forces
# (Langer et al.) and with a non-conservative force head (Domina et al.)
MODELS = {
    "conservative": (CONSERVATIVE_TARGETS, "forces"),
    "non-conservative": (PET_TARGETS, "non_conservative_force"),
}


# ------------------------------------------------------------------- structures
def split(frames, config, seed=0):
    """Training, validation and test boxes, drawn without replacement."""
    order = np.random.default_rng(seed).permutation(len(frames))
    sizes = [config["n_train"], config["n_validation"], config["n_test"]]
    if sum(sizes) > len(frames):
        raise SystemExit(f"the data set has {len(frames)} boxes, {sum(sizes)} needed")
    bounds = np.cumsum([0] + sizes)
    return [
        [frames[i] for i in order[a:b]]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def _molecules(box):
    """Water molecules of a box as (oxygen index, two hydrogen indices), the
    hydrogens assigned to their nearest oxygen under periodic boundaries."""
    numbers = box.numbers
    oxygens = np.flatnonzero(numbers == 8)
    hydrogens = np.flatnonzero(numbers == 1)
    distances = box.get_all_distances(mic=True)
    owner = oxygens[np.argmin(distances[np.ix_(hydrogens, oxygens)], axis=1)]
    molecules = []
    for oxygen in oxygens:
        members = hydrogens[owner == oxygen]
        if len(members) == 2:
            molecules.append((oxygen, members))
    return molecules, distances


def _cut(box, indices, center):
    """The atoms ``indices`` of a periodic box as an isolated cluster, each atom
    at its minimum-image position relative to atom ``center``."""
    import ase

    positions = box.positions
    vectors = positions[indices] - positions[center]
    cell = box.cell.array
    fractional = np.linalg.solve(cell.T, vectors.T).T
    vectors = (fractional - np.round(fractional)) @ cell
    return ase.Atoms(numbers=box.numbers[indices], positions=vectors)


def cut_molecules(boxes, per_box, seed=0):
    """Isolated water molecules cut out of the boxes (positions only)."""
    rng = np.random.default_rng(seed)
    result = []
    for box in boxes:
        molecules, _ = _molecules(box)
        for index in rng.choice(len(molecules), size=per_box, replace=False):
            oxygen, hydrogens = molecules[index]
            result.append(_cut(box, [oxygen, *hydrogens], oxygen))
    return result


def cut_dimers(boxes, per_box, seed=0):
    """Water dimers cut out of the boxes: a random molecule and the molecule
    whose oxygen is nearest to its oxygen (positions only)."""
    rng = np.random.default_rng(seed)
    result = []
    for box in boxes:
        molecules, distances = _molecules(box)
        by_oxygen = {oxygen: hydrogens for oxygen, hydrogens in molecules}
        oxygens = np.array(list(by_oxygen))
        for index in rng.choice(len(molecules), size=per_box, replace=False):
            first, hydrogens = molecules[index]
            others = oxygens[oxygens != first]
            second = others[np.argmin(distances[first, others])]
            indices = [first, *hydrogens, second, *by_oxygen[second]]
            result.append(_cut(box, indices, first))
    return result


def ice_ih(repeats=(3, 2, 2)):
    """A proton-ordered ice Ih cell.

    Oxygens on the hexagonal ice lattice (space group P6_3/mmc, the wurtzite-like
    arrangement with ideal tetrahedral bonding, u = 3/8) with the lattice constants
    a = 4.497 A and c = 7.322 A measured at low temperature by Roettger et al.,
    Acta Cryst. B 50, 644 (1994). Hydrogens sit on the O-O bonds, 1.0 A from their
    oxygen (so H-O-H is the tetrahedral 109.5 degrees, not the 104.5 degrees of the
    free molecule), in the first assignment of the four-molecule cell that obeys
    the Bernal-Fowler ice rules (two hydrogens per oxygen, one per bond); such an
    ordering exists in this cell, as in ice XI.
    """
    import itertools

    import ase

    a, c, u = 4.497, 7.322, 3.0 / 8.0
    cell = np.array([[a, 0, 0], [-a / 2, a * math.sqrt(3) / 2, 0], [0, 0, c]])
    fractional = np.array(
        [
            [1 / 3, 2 / 3, 0],
            [2 / 3, 1 / 3, 1 / 2],
            [1 / 3, 2 / 3, u],
            [2 / 3, 1 / 3, 0.5 + u],
        ]
    )
    oxygens = fractional @ cell
    # each O-O bond once: (i, j, cell shift of j), from i < j, or i == j with a
    # positive shift (the reverse bond is the same bond)
    bonds = []
    for i, j in itertools.product(range(4), repeat=2):
        for shift in itertools.product((-1, 0, 1), repeat=3):
            if i > j or (i == j and shift <= (0, 0, 0)):
                continue
            vector = oxygens[j] + np.array(shift) @ cell - oxygens[i]
            if 2.0 < np.linalg.norm(vector) < 3.0:
                bonds.append((i, j, shift))
    assert len(bonds) == 8, "each of the 4 oxygens has 4 bonds"
    for donors in itertools.product((0, 1), repeat=len(bonds)):
        count = np.zeros(4, dtype=int)
        for (i, j, _), donor in zip(bonds, donors, strict=True):
            count[i if donor == 0 else j] += 1
        if np.all(count == 2):
            break
    positions, numbers = list(oxygens), [8] * 4
    for (i, j, shift), donor in zip(bonds, donors, strict=True):
        vector = oxygens[j] + np.array(shift) @ cell - oxygens[i]
        start, direction = (oxygens[i], vector) if donor == 0 else (oxygens[j], -vector)
        positions.append(start + direction / np.linalg.norm(direction))
        numbers.append(1)
    atoms = ase.Atoms(numbers=numbers, positions=positions, cell=cell, pbc=True)
    atoms.wrap()
    return atoms.repeat(repeats)


# ---------------------------------------------------------------------- training
def pet_options(config, targets, epochs, training="", finetune=None):
    """``mtt train`` options of the study's PET (files relative to the run
    directory ``models/<name>``), with ``config["checkpoints"]`` intermediate
    checkpoints."""
    if finetune is not None:
        training = f"finetune: {{read_from: {finetune}, method: full}}\n" + training
    return testing_pet_options(
        epochs,
        width=config["width"],
        gnn_layers=config["gnn_layers"],
        cutoff=config["cutoff"],
        batch_size=config["batch_size"],
        learning_rate=config["learning_rate"],
        precision=config["precision"],
        log_interval=1,
        checkpoint_interval=max(1, epochs // config["checkpoints"]),
        training=training,
        targets=targets,
        data="../../data/",
        final_eval=False,
    )


def mtt_train(directory: Path, options: str) -> float:
    """Run ``mtt train`` in ``directory``; return its wall time in seconds."""
    return wait_for(start_training(directory, options))


def start_training(directory: Path, options: str, threads: int | None = None):
    """Start ``mtt train`` in ``directory`` (``threads``: its CPU threads)."""
    directory.mkdir(parents=True)
    (directory / "options.yaml").write_text(options)
    command = [sys.executable, "-m", "metatrain", "train", "options.yaml"]
    command += ["-o", "model.pt"]
    environment = dict(os.environ)
    if threads is not None:
        environment["OMP_NUM_THREADS"] = str(threads)
    log = open(directory / "train.log", "w")
    process = subprocess.Popen(
        command, cwd=directory, stdout=log, stderr=subprocess.STDOUT, env=environment
    )
    return directory, process, log, time.perf_counter()


def wait_for(training) -> float:
    """Wait for a training of :py:func:`start_training`; its wall time."""
    directory, process, log, start = training
    returncode = process.wait()
    elapsed = time.perf_counter() - start
    log.close()
    if returncode != 0:
        tail = (directory / "train.log").read_text().splitlines()[-8:]
        raise RuntimeError(f"'mtt train' failed in {directory}:\n" + "\n".join(tail))
    return elapsed


def intermediate_checkpoints(directory: Path) -> list[Path]:
    """The ``model_<epoch>.ckpt`` files ``mtt train`` wrote under ``outputs/``."""
    return sorted(
        directory.glob("outputs/*/*/model_*.ckpt"),
        key=lambda path: int(path.stem.split("_")[-1]),
    )


# ------------------------------------------------------------------------ report
def number(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def audit_entry(result, output):
    """The numbers of one audited output for the report."""
    entry = result.summary["outputs"][output]
    target = entry["target"] or {}
    equivariance = entry["equivariance_rmse"]
    return {
        "unit": entry["unit"],
        "mae": target.get("mae"),
        "rmse": target.get("rmse"),
        "symmetrized_rmse": target.get("symmetrized_rmse"),
        "equivariance_rmse": equivariance["mean"],
        "equivariance_rmse_standard_error": equivariance["mean_standard_error"],
        "equivariance_over_mae": equivariance.get("fraction_of_mae"),
        "equivariance_over_rmse": equivariance.get("fraction_of_rmse"),
        "leakage": (entry["leakage"] or {}).get("mean"),
        "leakage_standard_error": (entry["leakage"] or {}).get("mean_standard_error"),
    }


def spearman(result, output):
    """Rank correlation between per-structure equivariance RMSE and per-structure
    model error of ``output``."""
    from scipy.stats import spearmanr

    errors = result.structure_errors(output)
    equivariance = result.analysis.equivariance_rmse(output)
    if errors is None or len(errors) < 3:
        return None
    correlation = spearmanr(errors.numpy(), equivariance.numpy())
    return {
        "rho": number(correlation.statistic),
        "p_value": number(correlation.pvalue),
        "n_structures": len(errors),
    }


def fmt(value, scale=1.0, digits=3):
    if value is None:
        return "n/a"
    return f"{value * scale:.{digits}g}"


def fmt_estimate(value, error, scale=1.0):
    """A value with ``± standard error`` when it is a random-grid estimate."""
    if value is None or error is None:
        return fmt(value, scale)
    return f"{fmt(value, scale)} ± {fmt(error, scale, 2)}"


def audit_table(audits):
    lines = [
        "| model | set | output | MAE | RMSE | equivariance RMSE | "
        "equivariance / MAE | leakage |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, sets in audits.items():
        for name, entries in sets.items():
            for output, entry in entries["outputs"].items():
                scale = 1000.0  # meV, meV/A
                unit = "meV" if output == "energy" else "meV/Å"
                rmse = entry["equivariance_rmse"]
                rmse_error = entry["equivariance_rmse_standard_error"]
                leakage_error = entry.get("leakage_standard_error")
                lines.append(
                    f"| {model} | {name} | `{output}` ({unit}) "
                    f"| {fmt(entry['mae'], scale)} | {fmt(entry['rmse'], scale)} "
                    f"| {fmt_estimate(rmse, rmse_error, scale)} "
                    f"| {fmt(entry['equivariance_over_mae'])} "
                    f"| {fmt_estimate(entry['leakage'], leakage_error)} |"
                )
    return "\n".join(lines) + "\n"


def training_table(report):
    lines = [
        "| model | epochs | minutes | final validation energy MAE (meV/atom) "
        "| final validation force MAE (meV/Å) |",
        "|---|---|---|---|---|",
    ]
    for name, entry in report["training"].items():
        curve = report["learning"][name]
        lines.append(
            f"| {name} | {entry['epochs']} | {entry['seconds'] / 60:.0f} "
            f"| {fmt(curve['energy_mae_per_atom_meV'][-1])} "
            f"| {fmt(curve['force_mae_meV_per_A'][-1])} |"
        )
    lines.append(
        "\nA model predicting zero forces has a force MAE of "
        f"{fmt(report['zero_force_mae'], 1000)} meV/Å on the training boxes."
    )
    return "\n".join(lines) + "\n"


def tradeoff_table(rows):
    lines = [
        "| method | gamma | epochs | time (s) | energy RMSE (meV) | energy "
        "equivariance RMSE (meV) | force RMSE (meV/Å) | force equivariance RMSE "
        "(meV/Å) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {fmt(row['gamma'])} | {fmt(row.get('epochs'))} "
            f"| {fmt(row['seconds'])} "
            f"| {fmt(row['energy_rmse'], 1000)} "
            f"| {fmt(row['energy_equivariance_rmse'], 1000)} "
            f"| {fmt(row['force_rmse'], 1000)} "
            f"| {fmt(row['force_equivariance_rmse'], 1000)} |"
        )
    return "\n".join(lines) + "\n"


def plot_tradeoff(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, (quantity, label) in zip(
        axes,
        [("energy", "energy (meV)"), ("force", "forces (meV/Å)")],
        strict=True,
    ):
        for method, marker in (
            ("trained", "*"),
            ("fine-tuned", "o"),
            ("fine-tuned, equal time", "o"),
            ("fine-tuned, generators", "^"),
            ("fine-tuned, generators, equal time", "^"),
            ("retrained", "s"),
        ):
            points = [row for row in rows if row["method"] == method]
            if not points:
                continue
            x = [1000 * row[f"{quantity}_equivariance_rmse"] for row in points]
            y = [1000 * row[f"{quantity}_rmse"] for row in points]
            axis.plot(
                x, y, marker=marker, linestyle="-" if len(x) > 1 else "", label=method
            )
            for row, xi, yi in zip(points, x, y, strict=True):
                if method != "trained":
                    axis.annotate(f"γ={row['gamma']:g}", (xi, yi), fontsize=7)
        axis.set_xscale("log")
        axis.set_xlabel(f"equivariance RMSE, {label}")
        axis.set_ylabel(f"test RMSE, {label}")
        axis.legend()
    figure.suptitle(f"accuracy against equivariance, {TRADEOFF_MODEL} PET, test boxes")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def learning_curves(output):
    """Validation MAE of energy (per atom) and forces against epoch, for each
    model, from the ``train.csv`` that ``mtt train`` writes."""
    import csv

    curves = {}
    for name, (_, force) in MODELS.items():
        (path,) = (output / "models" / name).glob("outputs/*/*/train.csv")
        with open(path, newline="") as file:
            rows = list(csv.reader(file))
        header, rows = [column.strip() for column in rows[0]], rows[2:]

        def column(label, header=header, rows=rows):
            index = header.index(label)
            return [float(row[index]) for row in rows]

        force_label = next(
            label for label in header if label.startswith(f"validation {force} MAE")
        )
        curves[name] = {
            "epoch": [int(value) for value in column("Epoch")],
            "energy_mae_per_atom_meV": column("validation energy MAE (per atom)"),
            "force_mae_meV_per_A": column(force_label),
        }
    return curves


def plot_learning(curves, zero_force_mae, path):
    """Validation MAE against epoch, forces next to the MAE of predicting
    zero forces."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, curve in curves.items():
        axes[0].plot(curve["epoch"], curve["energy_mae_per_atom_meV"], label=name)
        axes[1].plot(curve["epoch"], curve["force_mae_meV_per_A"], label=name)
    axes[1].axhline(
        1000 * zero_force_mae, color="grey", linestyle=":", label="zero forces"
    )
    axes[0].set_ylabel("validation energy MAE (meV/atom)")
    axes[1].set_ylabel("validation force MAE (meV/Å)")
    for axis in axes:
        axis.set_xlabel("epoch")
        axis.set_yscale("log")
        axis.legend(fontsize=8)
    figure.suptitle("training of the two PET models (validation boxes)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_ratios(audits, path):
    """Equivariance RMSE over MAE of both models on the labelled test boxes,
    next to the published values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values = [], []
    for model, sets in audits.items():
        for output, entry in sets["test"]["outputs"].items():
            labels.append(f"{model}\n{output}")
            values.append(entry["equivariance_over_mae"] or 0.0)
    labels += ["Langer et al.\nenergy", "Langer et al.\nforces"]
    values += [
        PUBLISHED["bulk_energy_equivariance_over_mae"],
        PUBLISHED["bulk_forces_equivariance_over_mae"],
    ]
    figure, axis = plt.subplots(figsize=(8, 3.5))
    colors = ["C0"] * (len(values) - 2) + ["C3", "C3"]
    axis.bar(range(len(values)), values, color=colors)
    axis.set_xticks(range(len(values)), labels, fontsize=7)
    axis.set_ylabel("equivariance RMSE / MAE")
    axis.set_yscale("log")
    axis.set_title("rotational error relative to the test error, bulk water")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ------------------------------------------------------------------------ stages
class Timer:
    def __init__(self):
        self.stages = {}

    def run(self, name, function, *args, **kwargs):
        print(f"[{name}] ...", flush=True)
        start = time.perf_counter()
        value = function(*args, **kwargs)
        self.stages[name] = time.perf_counter() - start
        print(f"[{name}] done in {self.stages[name]:.1f} s", flush=True)
        return value


def stage_data(output, data, config, extras):
    import ase.io

    frames = ase.io.read(data, ":")
    train, validation, test = split(frames, config)
    directory = output / "data"
    directory.mkdir()
    for name, subset in (("train", train), ("validation", validation), ("test", test)):
        ase.io.write(directory / f"{name}.xyz", subset)
    sets = {
        "test": test,
        "molecules": cut_molecules(test, config["molecules_per_box"]),
        "dimers": cut_dimers(test, config["dimers_per_box"]),
        "ice Ih": [ice_ih(config["ice_repeats"])],
    }
    for name in ("molecules", "dimers", "ice Ih"):
        ase.io.write(directory / f"{name.replace(' ', '-')}.xyz", sets[name])
    known = {int(z) for atoms in train for z in atoms.numbers}
    for name, path in extras.items():
        structures = ase.io.read(path, ":")
        unknown = {int(z) for atoms in structures for z in atoms.numbers} - known
        if unknown:
            raise SystemExit(
                f"--extra {name}={path}: atomic numbers {sorted(unknown)} are not in "
                f"the training data (only {sorted(known)})"
            )
        sets[name] = structures
    return train, validation, sets


def stage_train(output, config):
    """Train both models at the same time, one thread each."""
    started = {}
    for name, (targets, _) in MODELS.items():
        options = pet_options(config, targets, config["epochs"][name])
        started[name] = start_training(output / "models" / name, options, threads=1)
    trained = {}
    for name, training in started.items():
        seconds = wait_for(training)
        directory = output / "models" / name
        trained[name] = {
            "seconds": seconds,
            "epochs": config["epochs"][name],
            "checkpoint": str((directory / "model.ckpt").relative_to(output)),
            "exported": str((directory / "model.pt").relative_to(output)),
            "intermediate_checkpoints": [
                str(path.relative_to(output))
                for path in intermediate_checkpoints(directory)
            ],
        }
    return trained


def stage_audits(output, config, sets):
    import metatrain_symmetry as msym
    from metatrain_symmetry.audit import write_audit_report

    grid = msym.O3Grid.random(config["rotations"], seed=1)
    audits, correlations, screened = {}, {}, {}
    for model_name, (_, force) in MODELS.items():
        model = msym.load_model(
            output / "models" / model_name / "model.ckpt", dtype=torch.float64
        )
        audits[model_name], screened[model_name] = {}, {}
        for set_name, frames in sets.items():
            started = time.perf_counter()
            result = msym.audit(
                model,
                frames,
                outputs=["energy", force],
                max_lambda=config["max_lambda"],
                grid=grid,
            )
            screened[model_name][set_name] = {
                "seconds": time.perf_counter() - started,
                "equivariance_rmse": {
                    name: result.analysis.equivariance_rmse(name)
                    for name in ("energy", force)
                },
            }
            directory = output / "audits" / model_name / set_name.replace(" ", "-")
            directory.mkdir(parents=True)
            write_audit_report(result, directory)
            audits[model_name][set_name] = {
                "n_structures": len(frames),
                "n_atoms": int(sum(len(atoms) for atoms in frames)),
                "directory": str(directory.relative_to(output)),
                "outputs": {
                    name: audit_entry(result, name) for name in ("energy", force)
                },
            }
            if set_name == "test":
                correlations[model_name] = {
                    name: spearman(result, name) for name in ("energy", force)
                }
    return audits, correlations, screened


# the sets on which the infinitesimal screen is compared with the grid audit
SCREENED_SETS = ("test", "molecules", "dimers")


def lie_rmse(result, name: str, n_structures: int) -> torch.Tensor:
    """``(n_structures,)`` the root mean square over the entries of ``name`` of
    ``sum_k (L_k f)^2``, per structure: the screen's analogue of the
    equivariance RMSE, in the output's unit per radian."""
    block = result.lie_derivative[name].block()
    system = block.samples.column("system").to(torch.long)
    squares = block.values.double().square().sum(dim=1).flatten(1).sum(dim=1)
    entries = block.values[0, 0].numel()
    total = torch.zeros(n_structures, dtype=torch.float64).index_add(0, system, squares)
    count = torch.bincount(system, minlength=n_structures).double() * entries
    return (total / count.clamp(min=1)).sqrt()


def stage_screen(output, sets, audited):
    """The infinitesimal screen against the grid audit: the rank correlation of
    their per-structure errors, and the cost per structure of each."""
    from scipy.stats import spearmanr

    import metatrain_symmetry as msym

    rows = {}
    for model_name, (_, force) in MODELS.items():
        model = msym.load_model(
            output / "models" / model_name / "model.ckpt", dtype=torch.float64
        )
        rows[model_name] = {}
        for set_name in SCREENED_SETS:
            frames = sets[set_name]
            started = time.perf_counter()
            result = msym.infinitesimal(model, frames, ["energy", force])
            seconds = time.perf_counter() - started
            audit = audited[model_name][set_name]
            entry = {
                "n_structures": len(frames),
                "screen_seconds_per_structure": seconds / len(frames),
                "audit_seconds_per_structure": audit["seconds"] / len(frames),
                "outputs": {},
            }
            for name in ("energy", force):
                screen = lie_rmse(result, name, len(frames)).numpy()
                grid = audit["equivariance_rmse"][name].numpy()
                keep = np.isfinite(screen) & np.isfinite(grid)
                correlation = (
                    spearmanr(screen[keep], grid[keep]) if keep.sum() >= 3 else None
                )
                entry["outputs"][name] = {
                    "rho": None
                    if correlation is None
                    else number(correlation.statistic),
                    "p_value": None
                    if correlation is None
                    else number(correlation.pvalue),
                    "mean_lie_rmse": number(float(np.mean(screen[keep]))),
                }
            rows[model_name][set_name] = entry
    return rows


def screen_rows(screen: dict) -> list[str]:
    """Rows of the table comparing the infinitesimal screen with the audit."""
    rows = []
    for model, sets in screen.items():
        for set_name, entry in sets.items():
            cost = (
                entry["audit_seconds_per_structure"]
                / entry["screen_seconds_per_structure"]
            )
            for name, value in entry["outputs"].items():
                rows.append(
                    f"| {model} | {set_name} | `{name}` | {fmt(value['rho'])} "
                    f"| {fmt(value['p_value'])} | {entry['n_structures']} "
                    f"| {fmt(entry['screen_seconds_per_structure'])} "
                    f"| {fmt(entry['audit_seconds_per_structure'])} | {fmt(cost)} |"
                )
    return rows


def stage_dynamics(output, config, test, trained):
    import metatrain_symmetry as msym
    from metatrain_symmetry.dynamics import save_dynamics

    grid = msym.O3Grid.random(config["rotations"], seed=2)
    frames = test[: config["dynamics_boxes"]]
    report = {}
    for model_name in MODELS:
        checkpoints = [
            output / path for path in trained[model_name]["intermediate_checkpoints"]
        ]
        dynamics = msym.training_dynamics(
            checkpoints,
            frames,
            max_lambda=config["max_lambda"],
            grid=grid,
            dtype=torch.float64,
        )
        directory = output / "dynamics" / model_name
        directory.mkdir(parents=True)
        save_dynamics(dynamics, directory)
        names = list(dynamics.names)
        report[model_name] = {
            "directory": str(directory.relative_to(output)),
            "epochs": list(dynamics.epochs),
            "names": names,
            # the fraction of each spectrum outside the irreps the output
            # should carry, epoch by epoch (for features: outside (0, +1))
            "invariant_fraction": {
                name: [
                    number(spectrum[0, 0]) for spectrum in dynamics.spectrum_array(name)
                ]
                for name in names
            },
        }
    return report


def _test_errors(model, test, config, force):
    import metatrain_symmetry as msym

    result = msym.audit(
        msym.load_model(model, dtype=torch.float64),
        test,
        outputs=["energy", force],
        max_lambda=1,
        grid=msym.O3Grid.random(config["rotations"], seed=3),
    )
    energy = audit_entry(result, "energy")
    forces = audit_entry(result, force)
    return {
        "energy_rmse": energy["rmse"],
        "energy_equivariance_rmse": energy["equivariance_rmse"],
        "force_rmse": forces["rmse"],
        "force_equivariance_rmse": forces["equivariance_rmse"],
    }


# the model of the accuracy-equivariance trade-off: its forces are the energy's
# position gradients, penalised through the energy's ``gradients`` entry
TRADEOFF_MODEL = "conservative"


# trade-off rows of fine-tunings, by the penalty's method
FINETUNED = {"rotations": "fine-tuned", "generators": "fine-tuned, generators"}


def _finetune_loss(gamma: float, penalty: str) -> str:
    """The ``loss`` section of a fine-tuning: the equivariance penalty with
    ``gamma`` on the energy and on its forces, by rotated copies (``"rotations"``)
    or by generators (``"generators"``)."""
    if penalty == "generators":
        energy = f"type: equivariance, base: mse, gamma: {gamma}, method: generators"
        forces = energy
    else:
        energy = f"type: equivariance, base: mse, gamma: {gamma}, n_rotations: 2"
        forces = f"type: equivariance, base: mse, gamma: {gamma}"
    return f"loss:\n  energy: {{{energy}, gradients: {{positions: {{{forces}}}}}}}\n"


def _finetune(output, config, test, gamma, penalty, epochs):
    """Fine-tune the trade-off's model with ``mtt train``; its trade-off row."""
    targets, force = MODELS[TRADEOFF_MODEL]
    name = f"finetune-{penalty}-gamma-{gamma:g}-epochs-{epochs}"
    directory = output / "models" / name
    options = pet_options(
        config,
        targets,
        epochs,
        training=_finetune_loss(gamma, penalty),
        finetune=f"../{TRADEOFF_MODEL}/model.ckpt",
    )
    seconds = mtt_train(directory, options)
    return {
        "method": FINETUNED[penalty],
        "gamma": gamma,
        "seconds": seconds,
        "epochs": epochs,
    } | _test_errors(directory / "model.ckpt", test, config, force)


def _penalty_methods(output, config, test, rows):
    """Fine-tunings with the generator penalty at ``generator_gammas`` (some of
    the gammas of the rotated copies), first for the same number of epochs, then
    the cheaper of the two methods again for as many epochs as fill the other's
    wall time."""
    epochs = config["finetune_epochs"]
    for gamma in config["generator_gammas"]:
        (rotations,) = [
            row
            for row in rows
            if row["method"] == FINETUNED["rotations"] and row["gamma"] == gamma
        ]
        generators = _finetune(output, config, test, gamma, "generators", epochs)
        rows.append(generators)
        if generators["seconds"] < rotations["seconds"]:
            faster, slower, penalty = generators, rotations, "generators"
        else:
            faster, slower, penalty = rotations, generators, "rotations"
        longer = max(epochs + 1, round(epochs * slower["seconds"] / faster["seconds"]))
        row = _finetune(output, config, test, gamma, penalty, longer)
        rows.append(row | {"method": f"{row['method']}, equal time"})


def stage_tradeoff(output, config, test):
    import metatrain_symmetry as msym

    targets, force = MODELS[TRADEOFF_MODEL]
    base = output / "models" / TRADEOFF_MODEL / "model.ckpt"
    rows = [
        {"method": "trained", "gamma": None, "seconds": None, "epochs": None}
        | _test_errors(base, test, config, force)
    ]
    for gamma in config["finetune_gammas"]:
        epochs = config["finetune_epochs"]
        rows.append(_finetune(output, config, test, gamma, "rotations", epochs))
    _penalty_methods(output, config, test, rows)

    directory = output / "models" / "retrained"
    start = time.perf_counter()
    result = msym.retrain_last_layer(
        base,
        output / "data" / "train.xyz",
        validation=output / "data" / "test.xyz",
        gammas=config["retrain_gammas"],
        n_rotations=config["retrain_rotations"],
        output=directory,
    )
    seconds = time.perf_counter() - start
    for gamma, checkpoint in zip(result.gammas, result.checkpoints, strict=True):
        rows.append(
            # the sweep solves every gamma in one pass: its time is shared
            {"method": "retrained", "gamma": gamma, "seconds": seconds, "epochs": None}
            | _test_errors(checkpoint, test, config, force)
        )
    retrain = {
        "seconds": seconds,
        "directory": str(directory.relative_to(output)),
        "table": result.table(),
    }
    return rows, retrain


def _seconds_per_evaluation(path, atoms, repeats):
    from metatomic_ase import MetatomicCalculator

    atoms = atoms.copy()
    atoms.calc = MetatomicCalculator(str(path))
    # TorchScript's profiling executor compiles and optimizes during the first
    # calls (seconds each); the same positions every time (the cached results
    # dropped) keep it on one specialization, so that both models are timed alike
    times = []
    for index in range(3 + repeats):
        atoms.calc.reset()
        start = time.perf_counter()
        atoms.get_forces()
        if index >= 3:
            times.append(time.perf_counter() - start)
    return min(times)


def stage_symmetrize(output, config, sets):
    import metatrain_symmetry as msym

    directory = output / "models" / "conservative"
    checkpoint = directory / "model.ckpt"
    grid = msym.O3Grid.random(config["rotations"], seed=4)
    # the audit stored in the exports (of the model before averaging)
    audit_frames = sets["test"][: max(config["symmetrized_audit_boxes"], 1)]
    if config["symmetrized_audit_boxes"] == 0:
        audit_frames = sets["dimers"]
    exports = {}
    for kind, symmetrize in (("plain", False), ("symmetrized", True)):
        path = directory / f"audited-{kind}.pt"
        msym.export_audited(
            checkpoint,
            path,
            audit_frames,
            symmetrize=symmetrize,
            grid_degree=config["symmetrize_degree"] if symmetrize else None,
            audit_grid=grid,
            outputs=["energy", "forces"],
        )
        exports[kind] = path

    # each evaluation of the averaged model is one per quadrature element: a few
    # molecules and dimers, and boxes only in the full run
    clusters = config["symmetrized_audit_clusters"]
    frames = sets["molecules"][:clusters] + sets["dimers"][:clusters]
    frames += sets["test"][: config["symmetrized_audit_boxes"]]
    report = {
        "grid_degree": config["symmetrize_degree"],
        "files": {
            kind: str(path.relative_to(output)) for kind, path in exports.items()
        },
        "n_structures": len(frames),
        "timing_structure": {
            "set": config["timing_set"],
            "n_atoms": len(sets[config["timing_set"]][0]),
        },
    }
    for kind, path in exports.items():
        result = msym.audit(
            path, frames, outputs=["energy", "forces"], max_lambda=1, grid=grid
        )
        report[kind] = {
            name: {
                "equivariance_rmse": result.summary["outputs"][name][
                    "equivariance_rmse"
                ]["mean"],
                "equivariance_rmse_max": result.summary["outputs"][name][
                    "equivariance_rmse"
                ]["max"],
            }
            for name in ("energy", "forces")
        }
        report[kind]["seconds_per_evaluation"] = _seconds_per_evaluation(
            path, sets[config["timing_set"]][0], config["timing_repeats"]
        )
    report["cost_ratio"] = (
        report["symmetrized"]["seconds_per_evaluation"]
        / report["plain"]["seconds_per_evaluation"]
    )
    return report


# ------------------------------------------------------------------------- main
def finish_report(output, report):
    """Add the learning curves to ``report``, draw the figures and write
    ``report.json`` and ``report.md`` into ``output``."""
    import ase.io

    train = ase.io.read(output / "data" / "train.xyz", ":")
    forces = np.concatenate([atoms.get_forces() for atoms in train])
    # the force MAE of a model that predicts zero
    report["zero_force_mae"] = float(np.abs(forces).mean())
    report["learning"] = learning_curves(output)
    plot_learning(report["learning"], report["zero_force_mae"], output / "learning.png")
    plot_ratios(report["audits"], output / "ratios.png")
    plot_tradeoff(report["tradeoff"], output / "tradeoff.png")
    write_report(output, report)


def correlation_rows(correlation: dict) -> list[str]:
    """Rows of the table of rank correlations between equivariance and model
    errors."""
    rows = []
    for model, outputs in correlation.items():
        for name, value in outputs.items():
            value = value or {}
            rows.append(
                f"| {model} | `{name}` | {fmt(value.get('rho'))} "
                f"| {fmt(value.get('p_value'))} | {value.get('n_structures', 'n/a')} |"
            )
    return rows


def symmetrized_export_lines(symmetrized: dict) -> list[str]:
    """The table and the sentence on the symmetrized export."""
    lines = [
        "| model | energy equivariance RMSE (meV) | force equivariance RMSE (meV/Å) "
        "| seconds per evaluation (energy and forces) |",
        "|---|---|---|---|",
    ]
    for kind in ("plain", "symmetrized"):
        entry = symmetrized[kind]
        lines.append(
            f"| {kind} | {fmt(entry['energy']['equivariance_rmse'], 1000)} "
            f"| {fmt(entry['forces']['equivariance_rmse'], 1000)} "
            f"| {fmt(entry['seconds_per_evaluation'])} |"
        )
    return lines + [
        "",
        f"Averaging on a Lebedev quadrature of degree {symmetrized['grid_degree']}; "
        f"cost ratio {fmt(symmetrized['cost_ratio'])}, timed with metatomic's ASE "
        f"calculator on one structure of {symmetrized['timing_structure']['n_atoms']} "
        f"atoms ({symmetrized['timing_structure']['set']}): the fastest of "
        "repeated calls on the same positions, after three warm-up calls.",
    ]


def write_report(output, report):
    (output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    audits = report["audits"]
    lines = [
        "# Symmetry of PET on revPBE0-D3 water",
        "",
        f"Configuration: `{report['mode']}`; {report['split']['train']} training, "
        f"{report['split']['validation']} validation and {report['split']['test']} "
        "test boxes of 64 molecules. Audits on "
        f"{report['config']['rotations']} random O(3) elements (mean over "
        "structures of the per-structure equivariance RMSE).",
        "",
        "## Training",
        "",
        training_table(report),
        "![learning curves](learning.png)",
        "",
        "## Errors and equivariance",
        "",
        audit_table(audits),
        f"Published ({PUBLISHED['source']}): equivariance/MAE "
        f"{PUBLISHED['bulk_energy_equivariance_over_mae']} (energy) and "
        f"{PUBLISHED['bulk_forces_equivariance_over_mae']} (forces) on the bulk "
        f"liquid; {PUBLISHED['molecule_forces_equivariance_rmse_meV_per_A']} meV/Å "
        "force equivariance error on an isolated molecule.",
        "",
        "![ratios](ratios.png)",
        "",
        "## Does the equivariance error track the model error? (test boxes)",
        "",
        "| model | output | Spearman rho | p | structures |",
        "|---|---|---|---|---|",
    ]
    lines += correlation_rows(report["correlation"])
    lines += [
        "",
        "## The infinitesimal screen against the grid audit",
        "",
        "Spearman rank correlation between the per-structure RMS Lie derivative "
        "(`msym.infinitesimal`) and the per-structure equivariance RMSE of the "
        "audit, and the cost per structure of each (the audit's includes its "
        "report's statistics).",
        "",
        "| model | set | output | Spearman rho | p | structures "
        "| screen s/structure | audit s/structure | audit / screen |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += screen_rows(report.get("screen", {}))
    lines += ["", "## Spectra across epochs and layers", ""]
    for model, entry in report["dynamics"].items():
        lines += [
            f"{model}: epochs {entry['epochs']}, `{entry['directory']}/dynamics.png`, "
            f"`{entry['directory']}/layers.png`",
            "",
        ]
    lines += [
        f"## Accuracy against equivariance ({TRADEOFF_MODEL} model, test boxes)",
        "",
        tradeoff_table(report["tradeoff"]),
        "The retraining time is that of the whole sweep (all gammas in one pass).",
        "",
        "![trade-off](tradeoff.png)",
        "",
        "## Symmetrized export (conservative model)",
        "",
    ]
    lines += symmetrized_export_lines(report["symmetrized_export"])
    if "consequences" in report:
        lines += [""] + consequences_lines(report["consequences"])
    lines += [
        "",
        "## Stages",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    lines += [
        f"| {name} | {seconds:.0f} |" for name, seconds in report["timings"].items()
    ]
    (output / "report.md").write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", required=True, type=Path)
    parser.add_argument("--quick", action="store_true", help="the small, short run")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="more structures to audit every model on, reported under NAME",
    )
    parser.add_argument("--force", action="store_true", help="replace DIR")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="redraw the figures and rewrite the report of the finished run in DIR "
        "from its report.json, data and training logs",
    )
    return parser


def prepare_output(args) -> tuple[Path, dict[str, Path]]:
    """Check the data and the ``--extra`` files, and empty the output directory
    (``--force``); the output directory and the extra sets by name."""
    if not args.data.is_file():
        raise SystemExit(
            f"water data not found at {args.data}: pass --data, or provide "
            "../shared/data/water-revpbe0/water-bulk-100.xyz next to the repository"
        )
    extras = {}
    for item in args.extra:
        name, _, path = item.partition("=")
        if not name or not path or not Path(path).is_file():
            raise SystemExit(f"--extra expects NAME=FILE with an existing file: {item}")
        extras[name] = Path(path)
    output = args.output
    if output.exists() and any(output.iterdir()):
        if not args.force:
            raise SystemExit(f"{output} is not empty (use --force to replace it)")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    return output, extras


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.report_only:
        report_path = args.output / "report.json"
        if not report_path.is_file():
            raise SystemExit(f"--report-only: no finished run in {args.output}")
        finish_report(args.output, json.loads(report_path.read_text()))
        print(f"report: {args.output / 'report.md'}")
        return
    output, extras = prepare_output(args)
    mode = "quick" if args.quick else "full"
    config = CONFIGS[mode]
    timer = Timer()
    start = time.perf_counter()
    train, validation, sets = timer.run(
        "data", stage_data, output, args.data, config, extras
    )
    trained = timer.run("train", stage_train, output, config)
    audits, correlations, audited = timer.run(
        "audits", stage_audits, output, config, sets
    )
    screen = timer.run("screen", stage_screen, output, sets, audited)
    dynamics = timer.run(
        "dynamics", stage_dynamics, output, config, sets["test"], trained
    )
    tradeoff, retrain = timer.run(
        "trade-off", stage_tradeoff, output, config, sets["test"]
    )
    symmetrized = timer.run(
        "symmetrized export", stage_symmetrize, output, config, sets
    )
    simulations = timer.run(
        "consequences",
        stage_consequences,
        output,
        mode,
        output / "models" / "conservative" / "model.pt",
        sets,
    )
    timer.stages["total"] = time.perf_counter() - start

    report = {
        "mode": mode,
        "config": config,
        "data": str(args.data),
        "split": {
            "train": len(train),
            "validation": len(validation),
            "test": len(sets["test"]),
        },
        "sets": {name: len(frames) for name, frames in sets.items()},
        "published": PUBLISHED,
        "training": trained,
        "audits": audits,
        "correlation": correlations,
        "screen": screen,
        "dynamics": dynamics,
        "tradeoff": tradeoff,
        "retrain": retrain,
        "symmetrized_export": symmetrized,
        "consequences": simulations,
        "timings": timer.stages,
    }
    finish_report(output, report)
    print(f"report: {output / 'report.md'}")


if __name__ == "__main__":
    main()
