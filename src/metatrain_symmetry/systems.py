"""Turning ``ase.Atoms`` and metatomic ``System`` objects into systems ready for a
model: in its dtype, on its device, in its length unit and with its neighbour
lists."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol, Union

import torch
from metatomic.torch import (
    NeighborListOptions,
    System,
    systems_to_torch,
    unit_conversion_factor,
)


__all__ = [
    "SystemLike",
    "SystemRequirements",
    "attach_neighbor_lists",
    "is_system",
    "prepare_systems",
    "systems_fingerprint",
]


SystemLike = Union[System, "ase.Atoms"]  # noqa: F821


class SystemRequirements(Protocol):
    """What systems must match to be evaluated by a model (a
    :py:class:`~metatrain_symmetry.LoadedModel` provides it)."""

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def length_unit(self) -> str: ...

    def requested_neighbor_lists(self) -> list[NeighborListOptions]: ...

    def check_systems(self, systems: Sequence[System]) -> None: ...


def is_system(value) -> bool:
    """Whether ``value`` is a metatomic ``System`` (a TorchScript class)."""
    return isinstance(value, torch.ScriptObject) and hasattr(
        value, "known_neighbor_lists"
    )


def prepare_systems(
    systems: SystemLike | Sequence[SystemLike], model: SystemRequirements
) -> list[System]:
    """Convert ``ase.Atoms`` or ``System`` inputs to the model's dtype, device and
    length unit, with the neighbour lists the model requests attached."""
    if is_system(systems) or not isinstance(systems, (list, tuple)):
        systems = [systems]
    dtype, device = model.dtype, model.device
    converted: list[System] = []
    for index, system in enumerate(systems):
        if is_system(system):
            system = system.to(dtype=dtype, device=device)
        else:
            try:
                system = systems_to_torch(system, dtype=dtype, device=device)
            except Exception as error:
                raise TypeError(
                    f"structure {index} is a {type(system).__name__}; pass ase.Atoms "
                    "or metatomic System objects"
                ) from error
            factor = unit_conversion_factor("angstrom", model.length_unit)
            if factor != 1.0:
                system = System(
                    types=system.types,
                    positions=system.positions * factor,
                    cell=system.cell * factor,
                    pbc=system.pbc,
                )
        converted.append(system)
    model.check_systems(converted)
    attach_neighbor_lists(model, converted)
    return converted


def attach_neighbor_lists(model: SystemRequirements, systems: list[System]) -> None:
    """Compute the neighbour lists ``model`` requests that ``systems`` lack."""
    from vesin.metatomic import NeighborList

    for option in model.requested_neighbor_lists():
        calculator = None
        for system in systems:
            if any(option == known for known in system.known_neighbor_lists()):
                continue
            if calculator is None:
                calculator = NeighborList(option, model.length_unit, skin=0.0)
            system.add_neighbor_list(option, calculator.compute(system))


def systems_fingerprint(systems: Sequence[System]) -> str:
    """SHA-256 of what a model sees of systems: atomic types, positions, cell and
    periodicity (in float64), in order."""
    digest = hashlib.sha256()
    for system in systems:
        for tensor in (system.types, system.positions, system.cell, system.pbc):
            tensor = tensor.detach().to("cpu")
            if tensor.is_floating_point():
                tensor = tensor.to(torch.float64)
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()
