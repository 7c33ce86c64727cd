"""Structural and dynamical observables of a periodic trajectory, each with a
block-averaged standard error: radial distribution functions per element pair,
the mean-squared displacement, and the orientational time correlation of the
bonds of the molecules the structure holds."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols
from ase.geometry import find_mic
from ase.neighborlist import natural_cutoffs, neighbor_list

from .simulation import Trajectory


__all__ = [
    "RDF_BIN_WIDTH",
    "RDF_MAX_DISTANCE",
    "block_mean",
    "bond_correlation",
    "find_bonds",
    "mean_squared_displacement",
    "observables_summary",
    "radial_distribution",
]


RDF_MAX_DISTANCE = 6.0
"""largest distance of the radial distribution functions, in Å"""
RDF_BIN_WIDTH = 0.05
"""bin width of the radial distribution functions, in Å"""


def block_mean(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over blocks ``(n_blocks, ...)`` and its standard error
    ``std / sqrt(n_blocks)``."""
    values = np.asarray(values, dtype=np.float64)
    error = values.std(axis=0, ddof=1) / np.sqrt(len(values))
    return values.mean(axis=0), error


def _blocks(n_frames: int, n_blocks: int) -> list[range]:
    """Consecutive ranges of frames, as equal as possible."""
    if n_frames < n_blocks:
        raise ValueError(
            f"{n_frames} frames cannot be cut into {n_blocks} blocks: keep more "
            "frames or run more steps"
        )
    edges = np.linspace(0, n_frames, n_blocks + 1).astype(int)
    return [range(edges[i], edges[i + 1]) for i in range(n_blocks)]


def _pair_name(a: int, b: int) -> str:
    """``"O-H"``: the heavier element first."""
    first, second = sorted((a, b), reverse=True)
    return f"{chemical_symbols[first]}-{chemical_symbols[second]}"


def radial_distribution(trajectory: Trajectory, n_blocks: int) -> dict:
    """``g(r)`` per element pair (``"O-H"``, ...), periodic images included.

    For the ordered pairs ``(i, j)`` with ``i`` of element a and ``j`` of element
    b, ``g_ab(r) = V n_ab(r) / (N_a (N_b - delta_ab) 4 pi r^2 dr)`` averaged over
    the frames of each block.

    :return: per pair, ``r`` (bin centres, Å), ``g`` and ``error``
    """
    edges = np.arange(0.0, RDF_MAX_DISTANCE + RDF_BIN_WIDTH / 2, RDF_BIN_WIDTH)
    centres = 0.5 * (edges[1:] + edges[:-1])
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    numbers = trajectory.numbers
    elements = sorted(set(numbers.tolist()))
    volume = abs(np.linalg.det(trajectory.cell))
    pairs = {}
    for index, a in enumerate(elements):
        for b in elements[index:]:
            n_a, n_b = int((numbers == a).sum()), int((numbers == b).sum())
            norm = n_a * (n_b - (a == b)) / volume
            if norm > 0:
                pairs[(a, b)] = norm
    per_block = {pair: [] for pair in pairs}
    for frames in _blocks(len(trajectory.time_ps), n_blocks):
        counts = {pair: np.zeros(len(centres)) for pair in pairs}
        for frame in frames:
            atoms = Atoms(
                numbers=numbers,
                positions=trajectory.positions[frame],
                cell=trajectory.cell,
                pbc=trajectory.pbc,
            )
            first, second, distance = neighbor_list("ijd", atoms, RDF_MAX_DISTANCE)
            for a, b in pairs:
                mask = (numbers[first] == a) & (numbers[second] == b)
                counts[(a, b)] += np.histogram(distance[mask], bins=edges)[0]
        for pair, norm in pairs.items():
            per_block[pair].append(counts[pair] / (len(frames) * norm * shell))
    result = {}
    for (a, b), blocks in per_block.items():
        mean, error = block_mean(blocks)
        result[_pair_name(a, b)] = {
            "r": centres.tolist(),
            "g": mean.tolist(),
            "error": error.tolist(),
        }
    return result


def _lag_average(values: np.ndarray, correlate) -> np.ndarray:
    """``correlate(values[t], values[t + lag])`` averaged over origins ``t``, for
    every lag shorter than the series ``(n, ...)``."""
    return np.array(
        [
            correlate(values[: len(values) - lag], values[lag:])
            for lag in range(len(values))
        ]
    )


def mean_squared_displacement(trajectory: Trajectory, n_blocks: int) -> dict:
    """Mean-squared displacement of the atoms, the centre-of-mass motion removed,
    averaged over time origins within each block and over atoms.

    :return: ``time_ps`` (lags), ``msd_A2`` and ``msd_error_A2``
    """
    masses = trajectory.masses
    centre = np.einsum("a,fax->fx", masses, trajectory.positions) / masses.sum()
    positions = trajectory.positions - centre[:, None, :]
    blocks = _blocks(len(positions), n_blocks)
    length = min(len(block) for block in blocks)
    per_block = [
        _lag_average(
            positions[block.start : block.start + length],
            lambda a, b: float(((b - a) ** 2).sum(axis=-1).mean()),
        )
        for block in blocks
    ]
    mean, error = block_mean(per_block)
    time = trajectory.time_ps[:length] - trajectory.time_ps[0]
    return {
        "time_ps": time.tolist(),
        "msd_A2": mean.tolist(),
        "msd_error_A2": error.tolist(),
    }


def find_bonds(atoms: Atoms) -> np.ndarray:
    """Pairs ``(i, j)``, ``i < j``, closer than the sum of their natural
    (covalent) radii, ``(n_bonds, 2)``."""
    first, second = neighbor_list("ij", atoms, natural_cutoffs(atoms))
    keep = first < second
    return np.stack([first[keep], second[keep]], axis=1)


def bond_correlation(trajectory: Trajectory, n_blocks: int) -> dict | None:
    """Orientational time correlation ``C2(t) = <P2(u(0) . u(t))>`` of the bond
    directions of the molecules in the first frame (bonds by covalent radii, the
    minimum image), over time origins within each block and over bonds; ``None``
    when the structure has no bonds."""
    bonds = find_bonds(trajectory.atoms(0))
    if len(bonds) == 0:
        return None
    cell = trajectory.cell
    vectors = (
        trajectory.positions[:, bonds[:, 1]] - trajectory.positions[:, bonds[:, 0]]
    )
    if np.any(trajectory.pbc):
        shape = vectors.shape
        vectors = find_mic(vectors.reshape(-1, 3), cell, trajectory.pbc)[0]
        vectors = vectors.reshape(shape)
    units = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)
    blocks = _blocks(len(units), n_blocks)
    length = min(len(block) for block in blocks)

    def legendre(a, b):
        cosine = (a * b).sum(axis=-1)
        return float((1.5 * cosine**2 - 0.5).mean())

    per_block = [
        _lag_average(units[block.start : block.start + length], legendre)
        for block in blocks
    ]
    mean, error = block_mean(per_block)
    time = trajectory.time_ps[:length] - trajectory.time_ps[0]
    return {
        "n_bonds": len(bonds),
        "time_ps": time.tolist(),
        "c2": mean.tolist(),
        "error": error.tolist(),
    }


def observables_summary(trajectory: Trajectory, n_blocks: int) -> dict:
    """The observables of one periodic trajectory (the keys of
    ``consequences.json``'s ``observables`` variants)."""
    msd = mean_squared_displacement(trajectory, n_blocks)
    return {
        "rdf": radial_distribution(trajectory, n_blocks),
        **msd,
        "bond_correlation": bond_correlation(trajectory, n_blocks),
    }
