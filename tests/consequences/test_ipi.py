"""Molecular dynamics through i-PI: the trajectories of the ASE engine from the
same initial state, and a clear error without i-PI."""

import sys

import ase
import ase.build
import numpy as np
import pytest

from metatrain_symmetry.calculators import model_calculator
from metatrain_symmetry.consequences.ipi import check_ipi, run_dynamics_ipi
from metatrain_symmetry.consequences.simulation import Settings, run_dynamics
from tests.helpers import PairPotential, pair_capabilities


@pytest.fixture(scope="module")
def calculator():
    from metatomic.torch import AtomisticModel, ModelMetadata

    module = PairPotential(lab_frame=1.0).eval()
    return model_calculator(
        AtomisticModel(module, ModelMetadata(), pair_capabilities())
    )


def structures():
    molecule = ase.Atoms(
        "Cu4", positions=[[0, 0, 0], [2.5, 0.1, 0], [0.2, 2.4, 0.1], [0.3, 0.2, 2.6]]
    )
    box = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    box.rattle(0.05, seed=1)
    return {"molecule": molecule, "box": box}


@pytest.mark.parametrize("kind", ["molecule", "box"])
def test_nve_equals_ases(calculator, kind):
    """Velocity Verlet in both engines, from the same state: the same frames, to
    the difference of their unit constants (i-PI's and ASE's electronvolt in
    atomic units differ by about 1e-7)."""
    atoms = structures()[kind]
    settings = Settings(steps=30, frames=10, temperature_K=500.0)
    expected = run_dynamics(atoms, calculator, settings, "nve", seed=4)
    got = run_dynamics_ipi(atoms, calculator, settings, "nve", seed=4)
    np.testing.assert_allclose(got.time_ps, expected.time_ps, rtol=1e-12)
    np.testing.assert_allclose(got.positions, expected.positions, atol=1e-8)
    np.testing.assert_allclose(got.momenta, expected.momenta, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got.forces, expected.forces, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(
        got.potential_energy, expected.potential_energy, rtol=1e-6
    )
    np.testing.assert_allclose(got.kinetic_energy, expected.kinetic_energy, rtol=1e-6)
    assert np.array_equal(got.numbers, atoms.numbers)
    # the molecule moves: the comparison is not between two frozen frames
    assert np.abs(got.positions[-1] - got.positions[0]).max() > 1e-3


def test_nvt_is_seeded_and_keeps_the_centre_of_mass(calculator):
    box = structures()["box"]
    settings = Settings(steps=20, frames=5, temperature_K=300.0, friction_per_fs=0.1)
    first = run_dynamics_ipi(box, calculator, settings, "nvt", seed=1)
    again = run_dynamics_ipi(box, calculator, settings, "nvt", seed=1)
    other = run_dynamics_ipi(box, calculator, settings, "nvt", seed=2)
    np.testing.assert_array_equal(first.positions, again.positions)
    assert np.abs(first.positions[-1] - other.positions[-1]).max() > 1e-6
    assert first.positions.shape == (6, len(box), 3)
    np.testing.assert_allclose(first.momenta.sum(axis=1), 0.0, atol=1e-10)
    with pytest.raises(ValueError, match="unknown ensemble 'npt'"):
        run_dynamics_ipi(box, calculator, settings, "npt", seed=1)


def test_missing_ipi_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipi.scripting", None)
    with pytest.raises(ValueError, match="needs i-PI, which is not installed"):
        check_ipi()
