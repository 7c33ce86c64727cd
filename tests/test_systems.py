"""Structures made ready for a model: its dtype, length unit and neighbour
lists, and the fingerprint of what the model sees."""

import ase
import numpy as np
import pytest
import torch
from metatomic.torch import NeighborListOptions, System, systems_to_torch

from metatrain_symmetry.systems import (
    attach_neighbor_lists,
    is_system,
    prepare_systems,
    systems_fingerprint,
)


class Requirements:
    """A model in nanometres and float32 asking for a half neighbour list within
    0.15 nm, that checks nothing."""

    dtype = torch.float32
    device = torch.device("cpu")
    length_unit = "nm"

    def __init__(self):
        self.options = NeighborListOptions(cutoff=0.15, full_list=False, strict=True)
        self.checked = []

    def requested_neighbor_lists(self):
        return [self.options]

    def check_systems(self, systems):
        self.checked.append(len(systems))


def pair(distance: float) -> ase.Atoms:
    return ase.Atoms("H2", positions=[[0.0, 0.0, 0.0], [distance, 0.0, 0.0]])


def test_atoms_are_converted_to_the_model_units_and_dtype():
    model = Requirements()
    atoms = ase.Atoms(
        "OH2",
        positions=[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]],
        cell=np.diag([10.0, 10.0, 10.0]),
        pbc=True,
    )
    (system,) = prepare_systems(atoms, model)
    assert is_system(system) and not is_system(atoms)
    assert system.positions.dtype == torch.float32
    # 1 A = 0.1 nm
    expected = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.2, 0.0]])
    torch.testing.assert_close(system.positions, expected)
    torch.testing.assert_close(system.cell, torch.eye(3))
    assert system.types.tolist() == [8, 1, 1]
    assert model.checked == [1]
    # 0.1 nm and 0.2236 nm apart from the oxygen, 0.2236 nm from each other:
    # the pair within 0.15 nm is the only one
    neighbors = system.get_neighbor_list(model.options)
    assert neighbors.samples.values[:, :2].tolist() == [[0, 1]]
    torch.testing.assert_close(
        neighbors.values.reshape(-1, 3), torch.tensor([[0.1, 0.0, 0.0]])
    )


def test_systems_keep_their_positions():
    """A ``System`` is already in the model's units: only its dtype changes."""
    model = Requirements()
    system = systems_to_torch(pair(1.0), dtype=torch.float64)
    (converted,) = prepare_systems([system], model)
    assert converted.positions.dtype == torch.float32
    assert converted.positions[1, 0].item() == 1.0
    # no pair within 0.15 "nm" of positions 1 apart
    assert len(converted.get_neighbor_list(model.options).samples) == 0


def test_neighbor_lists_are_attached_once(monkeypatch):
    import vesin.metatomic

    model = Requirements()
    (system,) = prepare_systems([pair(1.0)], model)
    known = system.get_neighbor_list(model.options)

    def refuse(*args, **kwargs):
        raise AssertionError("a known neighbour list is computed again")

    monkeypatch.setattr(vesin.metatomic, "NeighborList", refuse)
    attach_neighbor_lists(model, [system])
    assert len(system.known_neighbor_lists()) == 1
    assert torch.equal(system.get_neighbor_list(model.options).values, known.values)
    # a system without it needs the calculator
    with pytest.raises(AssertionError, match="computed again"):
        attach_neighbor_lists(model, [systems_to_torch(pair(1.0))])


def test_other_inputs_are_refused():
    with pytest.raises(TypeError, match="structure 1 is a str; pass ase.Atoms"):
        prepare_systems([pair(1.0), "water.xyz"], Requirements())


def test_fingerprint_of_what_the_model_sees():
    # positions exactly representable in float32
    first = systems_to_torch(pair(1.25), dtype=torch.float64)
    water = ase.Atoms("OH2", positions=[[0, 0, 0], [0.75, 0.5, 0], [-0.75, 0.5, 0]])
    second = systems_to_torch(water, dtype=torch.float64)
    reference = systems_fingerprint([first, second])
    assert len(reference) == 64 and reference == systems_fingerprint([first, second])
    # the same numbers in float32 are the same structures
    as_float32 = [system.to(dtype=torch.float32) for system in (first, second)]
    assert systems_fingerprint(as_float32) == reference
    assert systems_fingerprint([second, first]) != reference
    moved = System(
        types=first.types,
        positions=first.positions + 1e-12,
        cell=first.cell,
        pbc=first.pbc,
    )
    assert systems_fingerprint([moved, second]) != reference
    periodic = System(
        types=first.types,
        positions=first.positions,
        cell=torch.eye(3, dtype=torch.float64) * 5,
        pbc=torch.ones(3, dtype=torch.bool),
    )
    assert systems_fingerprint([periodic, second]) != reference
