"""Every file of a consequences run: ``consequences.json``, ``consequences.md``,
the plots, the trajectories as extended XYZ and a chemiscope file that plays
them."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import ase.io
import numpy as np

from .markdown import consequences_markdown
from .molecules import angular_momentum
from .plots import save_plots
from .result import ConsequencesResult, json_key


__all__ = ["CHEMISCOPE_FRAMES", "save_consequences", "trajectory_frames"]


CHEMISCOPE_FRAMES = 50
"""frames of each trajectory shown in the chemiscope file"""


def save_consequences(result: ConsequencesResult, directory: str | os.PathLike) -> None:
    """Write the files of ``result`` into ``directory`` (created if needed).

    Callers wanting all-or-nothing output write into a temporary directory and
    move it in place once complete, as ``mtt-symmetry consequences`` does.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "consequences.json").write_text(result.to_json())
    (directory / "consequences.md").write_text(consequences_markdown(result))
    save_plots(result, directory)
    trajectories = directory / "trajectories"
    trajectories.mkdir(exist_ok=True)
    frames = {key: trajectory_frames(result, *key) for key in result.trajectories}
    for (experiment, variant, index), kept in frames.items():
        name = f"{json_key(experiment)}-{variant}-{index}.xyz"
        ase.io.write(trajectories / name, kept, format="extxyz")
    for (variant, index), atoms in result.relaxed.items():
        ase.io.write(
            trajectories / f"relax-{variant}-{index}.xyz", atoms, format="extxyz"
        )
    _write_chemiscope(frames, directory / "consequences.chemiscope.json.gz")


def trajectory_frames(
    result: ConsequencesResult, experiment: str, variant: str, index: int
) -> list:
    """The kept frames of one trajectory as ``ase.Atoms``, with ``time_ps``,
    ``potential_energy_eV`` and (for molecules) ``angular_momentum_hbar`` in
    ``info`` and the forces in ``arrays["model_forces"]``."""
    trajectory = result.trajectories[(experiment, variant, index)]
    molecule = not np.any(trajectory.pbc)
    if molecule:
        momentum = np.linalg.norm(angular_momentum(trajectory), axis=1)
    frames = []
    for frame in range(len(trajectory.time_ps)):
        atoms = trajectory.atoms(frame)
        atoms.info["time_ps"] = float(trajectory.time_ps[frame])
        atoms.info["potential_energy_eV"] = float(trajectory.potential_energy[frame])
        atoms.arrays["model_forces"] = trajectory.forces[frame]
        if molecule:
            atoms.info["angular_momentum_hbar"] = float(momentum[frame])
        frames.append(atoms)
    return frames


def _write_chemiscope(trajectories: dict, path: Path) -> None:
    """Every trajectory (``{(experiment, variant, structure): frames}``, at most
    :py:data:`CHEMISCOPE_FRAMES` frames each) with experiment, variant,
    structure, time, energy and angular momentum as properties of each frame."""
    import chemiscope

    frames, properties = (
        [],
        {name: [] for name in ("experiment", "variant", "structure", "time", "energy")},
    )
    momentum = []
    for (experiment, variant, index), all_frames in trajectories.items():
        step = max(1, len(all_frames) // CHEMISCOPE_FRAMES)
        for atoms in all_frames[::step]:
            # a copy: the XYZ files keep their info and arrays
            atoms = atoms.copy()
            frames.append(atoms)
            properties["experiment"].append(experiment)
            properties["variant"].append(variant)
            properties["structure"].append(index)
            properties["time"].append(atoms.info["time_ps"])
            properties["energy"].append(atoms.info["potential_energy_eV"])
            momentum.append(atoms.info.get("angular_momentum_hbar", np.nan))
    if not frames:
        return
    units = {"time": "ps", "energy": "eV"}
    described = {
        name: {
            "target": "structure",
            "values": values,
            **({"units": units[name]} if name in units else {}),
        }
        for name, values in properties.items()
    }
    if not np.all(np.isnan(momentum)):
        described["angular momentum"] = {
            "target": "structure",
            "values": [float(np.nan_to_num(m, nan=0.0)) for m in momentum],
            "units": "ħ",
        }
    for atoms in frames:
        atoms.info = {}
        atoms.arrays.pop("model_forces", None)
        atoms.arrays.pop("momenta", None)
    data = chemiscope.create_input(
        frames,
        properties=described,
        metadata={"name": "consequences of rotational symmetry breaking"},
        settings={
            "map": {
                "x": {"property": "time"},
                "y": {"property": "energy"},
                "color": {"property": "variant"},
            }
        },
    )
    with gzip.open(path, "wt") as handle:
        json.dump(data, handle)
