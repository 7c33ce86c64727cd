"""The water study's settings (the two sizes of its pipeline, the
published figures it is compared with) and its structures: the split of the
boxes, molecules and dimers cut out of them, and an ice Ih cell.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from metatrain_symmetry.testing import CONSERVATIVE_TARGETS, PET_TARGETS


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


# ------------------------------------------------------------------ data stage


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


def number(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def fmt(value, scale=1.0, digits=3) -> str:
    """A number of the report, to ``digits`` significant digits."""
    if value is None:
        return "n/a"
    return f"{value * scale:.{digits}g}"


def fmt_estimate(value, error, scale=1.0) -> str:
    """A value with ``± standard error`` when it is a random-grid estimate."""
    if value is None or error is None:
        return fmt(value, scale)
    return f"{fmt(value, scale)} ± {fmt(error, scale, 2)}"
