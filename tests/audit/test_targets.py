"""What an audit compares: outputs with dataset targets, the targets, and the
predictions on unrotated structures."""

import ase.build
import numpy as np
import pytest
import torch
from metatomic.torch import AtomisticModel, ModelMetadata
from metatomic_ase import MetatomicCalculator
from metatrain.utils.data.target_info import get_energy_target_info

import metatrain_symmetry as msym
from metatrain_symmetry.audit import default_targets, predict
from metatrain_symmetry.audit.targets import (
    check_target,
    has_target,
    read_target,
    resolve_targets,
)
from metatrain_symmetry.testing import labelled_molecules, tiny_pet
from tests.helpers import AnalyticModel, capabilities


def test_conservative_forces_and_stress_by_autograd(periodic_frames):
    """Derived forces and stress equal metatomic's ASE calculator on the same
    model (both are derivatives of the same energy)."""
    pet = tiny_pet()
    calculator = MetatomicCalculator(pet.export())
    model = msym.load_model(pet)
    bulk = periodic_frames[:1]
    predicted = predict(model, bulk, ["forces", "stress"])
    for index, atoms in enumerate(bulk):
        atoms.calc = calculator
        forces = atoms.get_forces()
        stress = atoms.get_stress(voigt=False)
        assert np.allclose(predicted["forces"][index].numpy(), forces, atol=1e-10)
        # the calculator reports the symmetric part; the antisymmetric part of
        # dE/d(strain) only exists for a model that is not rotationally invariant
        ours = predicted["stress"][index].numpy().reshape(3, 3)
        assert np.allclose((ours + ours.T) / 2, stress, atol=1e-10)
        assert np.abs(ours - ours.T).max() > 1e-6


def test_force_output_mapping():
    model = msym.load_model(tiny_pet())
    assert default_targets(model) == {
        "energy": "energy",
        "non_conservative_force": "forces",
    }
    # a model whose energy was trained with forces gets the conservative forces
    pet = tiny_pet()
    pet.dataset_info.targets["energy"] = get_energy_target_info(
        "energy", {"quantity": "energy", "unit": "eV"}, add_position_gradients=True
    )
    assert default_targets(msym.load_model(pet))["forces"] == "forces"
    # no dataset information, no non-conservative force: conservative forces
    bare = tiny_pet().export()
    capabilities = bare.capabilities()
    outputs = {"energy": capabilities.outputs["energy"]}
    capabilities.outputs = outputs
    energy_only = AtomisticModel(bare.module, ModelMetadata(), capabilities)
    assert "forces" in default_targets(msym.load_model(energy_only))


def test_resolve_targets_defaults():
    """Without outputs, the energy and the force output; without targets, the
    default keys that every structure has."""
    model = msym.load_model(tiny_pet())
    frames = labelled_molecules(("H2O", "CH4"), seed=1)
    assert resolve_targets(model, frames, None, None) == (
        ["energy", "non_conservative_force"],
        {"energy": "energy", "non_conservative_force": "forces"},
    )
    # a key that one structure lacks is not compared, but the output is audited
    del frames[1].arrays["forces"]
    assert resolve_targets(model, frames, None, None) == (
        ["energy", "non_conservative_force"],
        {"energy": "energy"},
    )
    assert resolve_targets(model, frames, ["energy"], None) == (
        ["energy"],
        {"energy": "energy"},
    )
    # named targets are kept as given, and name the outputs by default
    assert resolve_targets(model, frames, None, {"energy": "free_energy"}) == (
        ["energy"],
        {"energy": "free_energy"},
    )


def test_resolve_targets_errors():
    model = msym.load_model(tiny_pet())
    frames = labelled_molecules(("H2O",), seed=1)
    with pytest.raises(ValueError, match=r"targets are given for \['forces'\]"):
        resolve_targets(model, frames, ["energy"], {"forces": "forces"})
    features_only = capabilities()
    features_only.outputs = {"mtt::distance": features_only.outputs["mtt::distance"]}
    model = msym.load_model(AnalyticModel(), capabilities=features_only)
    with pytest.raises(ValueError, match="neither an energy nor a force output"):
        resolve_targets(model, frames, None, None)


def test_read_target():
    atoms = ase.build.molecule("H2O")
    forces = np.arange(9.0).reshape(3, 3)
    atoms.arrays["forces"] = forces
    # Voigt order: xx, yy, zz, yz, xz, xy
    atoms.info["stress"] = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    atoms.info["charges6"] = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert read_target(atoms, "forces", 0).tolist() == forces.reshape(-1).tolist()
    stress = read_target(atoms, "stress", 0)
    assert stress.dtype == torch.float64
    assert stress.reshape(3, 3).tolist() == [
        [1.0, 6.0, 5.0],
        [6.0, 2.0, 4.0],
        [5.0, 4.0, 3.0],
    ]
    # six values under another key are six values
    assert read_target(atoms, "charges6", 0).tolist() == [1, 2, 3, 4, 5, 6]
    # the target is a copy: changing the tensor leaves the structure alone
    read_target(atoms, "forces", 0)[0] = 100.0
    assert atoms.arrays["forces"][0, 0] == 0.0

    with pytest.raises(ValueError, match="structure 3 has no target 'energy'"):
        read_target(atoms, "energy", 3)
    atoms.info["name"] = "water"
    with pytest.raises(ValueError, match="structure 2: the value of 'name' is not"):
        read_target(atoms, "name", 2)
    assert has_target(atoms, "stress") and not has_target(atoms, "energy")


def test_check_target():
    check_target("energy", "energy", 0, torch.zeros(1, 1), torch.zeros(1))
    with pytest.raises(
        ValueError,
        match="the target 'e' of structure 2 has 2 values but the output 'energy' "
        "has 1",
    ):
        check_target("e", "energy", 2, torch.zeros(1, 1), torch.zeros(2))
