"""The result of ``consequences``: the JSON-ready summary (``consequences.json``,
following ``schemas/consequences.schema.json``), the trajectories and the relaxed
structures."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
from ase import Atoms
from ase.geometry import find_mic

from .. import __version__
from .molecules import ORIENTATION_BINS
from .simulation import Trajectory


__all__ = ["SCHEMA_VERSION", "ConsequencesResult", "assemble", "consequences_schema"]


SCHEMA_VERSION = 1
"""version of the ``consequences.json`` format"""

VARIANT_ORDER = ("plain", "average", "random_rotation")


def consequences_schema() -> dict:
    """The JSON schema of ``consequences.json``."""
    text = (
        resources.files("metatrain_symmetry")
        .joinpath("schemas/consequences.schema.json")
        .read_text()
    )
    return json.loads(text)


def json_key(experiment: str) -> str:
    """``"molecule-nve"`` (command line) -> ``"molecule_nve"`` (JSON)."""
    return experiment.replace("-", "_")


@dataclass
class ConsequencesResult:
    """What ``consequences`` found."""

    summary: dict
    """the content of ``consequences.json``"""
    frames: list[Atoms]
    """the input structures"""
    trajectories: dict[tuple[str, str, int], Trajectory] = field(default_factory=dict)
    """per ``(experiment, variant, structure)`` the kept frames"""
    relaxed: dict[tuple[str, int], Atoms] = field(default_factory=dict)
    """per ``(variant, structure)`` the relaxed structure"""

    def to_json(self) -> str:
        return json.dumps(_json_ready(self.summary), indent=1, allow_nan=False)


def _json_ready(value):
    """NaN and infinities (a bin never visited) as ``null``."""
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def assemble(
    records: dict, selected: dict, identity: dict, frames, grid
) -> ConsequencesResult:
    """The result, from the record of every task.

    :param records: per task (with ``experiment``, ``variant`` and ``structure``)
        what it returned
    :param selected: per experiment the structures it ran on
    :param identity: model, structures, settings and grid of the run
    """
    by_key = {(t.experiment, t.variant, t.structure): r for t, r in records.items()}
    result = ConsequencesResult(
        summary={
            "schema_version": SCHEMA_VERSION,
            "generator": {"name": "metatrain-symmetry", "version": __version__},
            **identity,
            "experiments": {},
        },
        frames=list(frames),
    )
    for experiment, indices in selected.items():
        if experiment == "relax":
            entry = _relax_entry(by_key, indices, frames, result)
        else:
            entry = _dynamics_entry(experiment, by_key, indices, result)
        _add_costs(entry, by_key, experiment, indices)
        result.summary["experiments"][json_key(experiment)] = entry
    return result


def _dynamics_entry(experiment: str, by_key, indices, result) -> dict:
    variants = {}
    for variant in VARIANT_ORDER:
        structures = []
        for index in indices:
            record = by_key[(experiment, variant, index)]
            result.trajectories[(experiment, variant, index)] = record["trajectory"]
            structures.append({"structure": index, **record["summary"]})
        if experiment == "observables":
            variants[variant] = structures[0]
        else:
            variants[variant] = {"structures": structures}
    entry = {"variants": variants}
    if experiment == "orientations":
        entry["cos_theta_edges"] = np.linspace(0, 1, ORIENTATION_BINS[0] + 1).tolist()
        entry["phi_edges"] = np.linspace(
            -np.pi, np.pi, ORIENTATION_BINS[1] + 1
        ).tolist()
    return entry


def _add_costs(entry: dict, by_key, experiment: str, indices) -> None:
    """Seconds per step of each variant, and relative to ``plain``."""
    seconds = {
        variant: float(
            np.mean(
                [by_key[(experiment, variant, i)]["seconds_per_step"] for i in indices]
            )
        )
        for variant in VARIANT_ORDER
    }
    for variant, value in seconds.items():
        entry["variants"][variant]["seconds_per_step"] = value
        entry["variants"][variant]["cost_per_step_relative"] = value / seconds["plain"]


def _rmsd(atoms: Atoms, positions: np.ndarray, reference: np.ndarray) -> float:
    """RMSD between two sets of positions of ``atoms`` (minimum image where
    periodic), the mean displacement removed."""
    difference = positions - reference
    if np.any(atoms.pbc):
        difference = find_mic(difference, atoms.cell, atoms.pbc)[0]
    difference -= difference.mean(axis=0)
    return float(np.sqrt((difference**2).sum(axis=1).mean()))


def _relax_entry(by_key, indices, frames, result) -> dict:
    """Relaxed energies, relative energies per atom, RMSD from the ``average``
    variant's relaxed structure, and the energy ranking of each variant."""
    variants = {}
    for variant in VARIANT_ORDER:
        records = [by_key[("relax", variant, i)] for i in indices]
        per_atom = [
            r["energy_eV"] / len(frames[i])
            for r, i in zip(records, indices, strict=True)
        ]
        lowest = min(per_atom)
        structures = []
        for record, index, energy in zip(records, indices, per_atom, strict=True):
            reference = by_key[("relax", "average", index)]["positions"]
            relaxed = frames[index].copy()
            relaxed.positions = record["positions"]
            result.relaxed[(variant, index)] = relaxed
            structures.append(
                {
                    "structure": index,
                    "energy_eV": record["energy_eV"],
                    "relative_energy_eV_per_atom": energy - lowest,
                    "rmsd_A": _rmsd(frames[index], record["positions"], reference),
                    "converged": record["converged"],
                    "n_steps": record["n_steps"],
                }
            )
        ranking = [indices[k] for k in np.argsort(per_atom, kind="stable")]
        variants[variant] = {"structures": structures, "ranking": ranking}
    changed = variants["plain"]["ranking"] != variants["average"]["ranking"]
    return {"variants": variants, "ranking_changed": bool(changed)}
