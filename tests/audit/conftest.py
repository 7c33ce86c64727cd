"""Fixtures of the audit tests."""

import ase.build
import ase.io
import pytest
from metatomic.torch import ModelOutput
from metatomic_ase import MetatomicCalculator

import metatrain_symmetry as msym
from metatrain_symmetry.testing import tiny_pet


@pytest.fixture(scope="package")
def pet_audit():
    """A PET audited on molecules whose targets are metatomic's predictions plus
    known offsets."""
    pet = tiny_pet()
    exported = pet.export()
    calculator = MetatomicCalculator(exported)
    frames = [ase.build.molecule(name) for name in ("CH3OH", "H2O", "CH4")]
    request = {"non_conservative_force": ModelOutput(sample_kind="atom")}
    for atoms in frames:
        atoms.calc = calculator
        atoms.info["energy"] = atoms.get_potential_energy() + 0.25
        # the raw output: the calculator's forces have their sum removed
        forces = calculator.run_model(atoms, request)["non_conservative_force"]
        atoms.arrays["forces"] = forces.block().values[..., 0].detach().numpy() - 0.5
        atoms.calc = None
    result = msym.audit(
        pet, frames, features=["mtt::feature::gnn_layers.1_node"], max_lambda=2
    )
    return pet, frames, result
