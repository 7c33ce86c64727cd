"""Rotated and transformed copies of structures, made from their stored tensors:
positions, cell, neighbour-list vectors and data are transformed together, and
neighbour lists are never recomputed."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from metatensor.torch import TensorBlock
from metatomic.torch import NeighborListOptions, System, register_autograd_neighbors
from metatomic.torch.o3 import O3Transformations


__all__ = [
    "PreparedSystem",
    "prepare_rotations",
    "rotated_copies",
    "rotated_systems",
    "transformed_copies",
]


@dataclass
class PreparedSystem:
    """What rotated copies of a system are made from: its detached positions and
    cell, and the neighbour lists and data attached to it. Make one with
    :py:func:`prepare_rotations` once per system, then any number of copies with
    :py:func:`rotated_copies`."""

    positions: torch.Tensor
    """``(n_atoms, 3)``"""
    cell: torch.Tensor
    """``(3, 3)``"""
    types: torch.Tensor
    pbc: torch.Tensor
    neighbors: list[tuple[object, TensorBlock]]
    """``(options, neighbour list)`` pairs"""
    data: dict[str, object]


def rotated_systems(system: System, rotations: torch.Tensor) -> list[System]:
    """Copies of ``system`` rotated by each of ``rotations``, with their neighbour
    lists and data rotated along (never recomputed).

    :param system: a system with the neighbour lists the model needs
    :param rotations: ``(n, 3, 3)`` orthogonal matrices, in the system's dtype and
        on its device
    :return: the ``n`` rotated systems
    """
    return rotated_copies(prepare_rotations(system), rotations)[0]


def prepare_rotations(system: System) -> PreparedSystem:
    """Take from ``system`` (with the neighbour lists the model needs) what its
    rotated copies are made from."""
    neighbors = []
    for options in system.known_neighbor_lists():
        neighbors.append((options, system.get_neighbor_list(options)))
    data = {name: system.get_data(name) for name in system.known_data()}
    return PreparedSystem(
        positions=system.positions.detach(),
        cell=system.cell.detach(),
        types=system.types,
        pbc=system.pbc,
        neighbors=neighbors,
        data=data,
    )


def rotated_copies(
    system: PreparedSystem, rotations: torch.Tensor, differentiable: bool = False
) -> tuple[list[System], list[tuple[torch.Tensor, torch.Tensor]]]:
    """One rotated ``System`` per matrix in ``rotations`` (``(n, 3, 3)``, in the
    system's dtype and on its device), with its neighbour lists and data rotated
    along (never recomputed).

    With ``differentiable=True`` the positions of every copy require gradients and
    are multiplied, with the cell, by ``1 + strain`` for a zero ``(3, 3)`` strain
    that also requires gradients; the rotated neighbour-list vectors are attached
    to both through metatomic's ``register_autograd_neighbors``.

    :return: the copies, and the ``(positions, strain)`` leaf tensors of each copy
        (empty unless ``differentiable``)
    """
    transposed = rotations.transpose(1, 2)
    positions = list((system.positions.unsqueeze(0) @ transposed).unbind(0))
    cells = list((system.cell.unsqueeze(0) @ transposed).unbind(0))
    leaves = []
    if differentiable:
        for index in range(len(positions)):
            leaf = positions[index].detach().requires_grad_(True)
            strain = torch.zeros_like(cells[index], requires_grad=True)
            deformation = torch.eye(3, dtype=strain.dtype, device=strain.device)
            deformation = deformation + strain
            positions[index] = leaf @ deformation
            cells[index] = cells[index] @ deformation
            leaves.append((leaf, strain))
    copies = _systems_with(system, positions, cells, rotations, differentiable)
    return copies, leaves


def transformed_copies(system: PreparedSystem, matrices: torch.Tensor) -> list[System]:
    """One copy of ``system`` per matrix ``M`` in ``matrices`` (``(n, 3, 3)``),
    with positions ``M r``, cell vectors ``M a`` and neighbour-list vectors
    transformed along, all differentiable with respect to ``M`` and to
    ``system.positions`` (the vectors are attached to the positions and cell of
    each copy through metatomic's ``register_autograd_neighbors``).

    Use it for derivatives with respect to a rotation or deformation of the
    structure: ``M`` may depend on tensors that require gradients, and
    ``system.positions`` may be a leaf that requires them.
    """
    transposed = matrices.transpose(1, 2)
    positions = list((system.positions.unsqueeze(0) @ transposed).unbind(0))
    cells = list((system.cell.unsqueeze(0) @ transposed).unbind(0))
    return _systems_with(system, positions, cells, matrices, True)


def _systems_with(
    system: PreparedSystem,
    positions: list[torch.Tensor],
    cells: list[torch.Tensor],
    matrices: torch.Tensor,
    differentiable: bool,
) -> list[System]:
    """The copies of ``system`` with the given positions and cells, their
    neighbour-list vectors and data transformed by ``matrices``."""
    copies = _build_systems()(
        system.types,
        positions,
        cells,
        system.pbc,
        [options for options, _ in system.neighbors],
        [neighbors for _, neighbors in system.neighbors],
        matrices.transpose(1, 2),
        differentiable,
    )
    for index, copy in enumerate(copies):
        for name, data in system.data.items():
            copy.add_data(name, _rotate_data(data, matrices[index : index + 1]))
    return copies


def _build_systems_impl(
    types: torch.Tensor,
    positions: list[torch.Tensor],
    cells: list[torch.Tensor],
    pbc: torch.Tensor,
    options: list[NeighborListOptions],
    neighbors: list[TensorBlock],
    transposed: torch.Tensor,
    differentiable: bool,
) -> list[System]:
    vectors = [
        block.values.squeeze(-1).unsqueeze(0) @ transposed for block in neighbors
    ]
    copies: list[System] = []
    for index in range(len(positions)):
        rotated = System(
            types=types, positions=positions[index], cell=cells[index], pbc=pbc
        )
        for which in range(len(neighbors)):
            values = vectors[which][index].unsqueeze(-1)
            if differentiable:
                # metatomic attaches the vectors to the positions and cell
                values = values.detach()
            block = TensorBlock(
                values=values,
                samples=neighbors[which].samples,
                components=neighbors[which].components,
                properties=neighbors[which].properties,
            )
            if differentiable:
                register_autograd_neighbors(rotated, block, False)
            rotated.add_neighbor_list(options[which], block)
        copies.append(rotated)
    return copies


@functools.cache
def _build_systems():
    """``_build_systems_impl`` compiled with TorchScript: calling the methods of
    metatomic and metatensor objects from TorchScript costs half as much per copy
    as calling them from Python, which dominates for small structures."""
    return torch.jit.script(_build_systems_impl)


def _rotate_data(data, rotation: torch.Tensor):
    if all(len(block.components) == 0 for block in data.blocks()):
        return data
    return O3Transformations(rotation, 8).transform_tensormap(data)
