"""The three ASE calculators against exact symmetry and closed forms."""

import ase
import ase.build
import ase.neighborlist
import ase.stress
import numpy as np
import pytest
from metatomic.torch import AtomisticModel, ModelMetadata

import metatrain_symmetry as msym
from metatrain_symmetry.calculators import (
    AveragedCalculator,
    RandomRotationCalculator,
    model_calculator,
    random_orthogonal_matrix,
)
from tests.helpers import PairPotential, pair_capabilities


LAB_FRAME = 0.3


def _model(lab_frame=0.0):
    return AtomisticModel(
        PairPotential(lab_frame=lab_frame, bond_length=1.1).eval(),
        ModelMetadata(),
        pair_capabilities(),
    )


def _structures():
    molecule = ase.Atoms(
        "OH2", positions=[[0, 0, 0], [1.0, 0.1, 0.3], [-0.3, 0.9, 0.4]]
    )
    box = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    box.set_cell(box.cell @ [[1, 0, 0], [0.2, 1, 0], [0, -0.1, 1]], scale_atoms=True)
    box.rattle(0.05, seed=3)
    return [molecule, box]


def _evaluate(calculator, atoms):
    atoms = atoms.copy()
    atoms.calc = calculator
    stress = atoms.get_stress() if atoms.pbc.all() else None
    return atoms.get_potential_energy(), atoms.get_forces(), stress


def _lab_term(atoms, scale=1.0):
    """``scale * a * sum_{i<j} |r_ij|^2 / 3`` (the O(3) average of the lab-frame
    term ``a sum (r_ij . e_z)^2``) over the pairs within the cutoff, its forces,
    and (periodic) its stress."""
    first, second, vectors = ase.neighborlist.neighbor_list("ijD", atoms, 3.0)
    keep = first < second
    first, second, vectors = first[keep], second[keep], vectors[keep]
    a = scale * LAB_FRAME / 3
    energy = a * (vectors**2).sum()
    forces = np.zeros((len(atoms), 3))
    np.add.at(forces, first, 2 * a * vectors)
    np.add.at(forces, second, -2 * a * vectors)
    stress = None
    if atoms.pbc.all():
        virial = 2 * a * np.einsum("pi,pj->ij", vectors, vectors)
        stress = virial / atoms.get_volume()
    return energy, forces, stress


@pytest.mark.parametrize("index", [0, 1], ids=["molecule", "box"])
def test_average_of_an_invariant_model_is_the_model(index):
    atoms = _structures()[index]
    plain = _evaluate(model_calculator(_model()), atoms)
    average = _evaluate(AveragedCalculator(_model(), msym.O3Grid(3)), atoms)
    assert average[0] == pytest.approx(plain[0], abs=1e-12)
    np.testing.assert_allclose(average[1], plain[1], atol=1e-12)
    if plain[2] is not None:
        np.testing.assert_allclose(average[2], plain[2], atol=1e-12)


@pytest.mark.parametrize("index", [0, 1], ids=["molecule", "box"])
def test_average_of_a_lab_frame_term_is_its_closed_form(index):
    """A quadratic lab-frame term averages to a third of the squared length on
    any grid of degree at least 2: energy, forces and stress."""
    atoms = _structures()[index]
    invariant = _evaluate(model_calculator(_model()), atoms)
    average = _evaluate(AveragedCalculator(_model(LAB_FRAME), msym.O3Grid(3)), atoms)
    energy, forces, stress = _lab_term(atoms)
    assert average[0] == pytest.approx(invariant[0] + energy, abs=1e-11)
    np.testing.assert_allclose(average[1], invariant[1] + forces, atol=1e-11)
    if stress is not None:
        voigt = ase.stress.full_3x3_to_voigt_6_stress(stress)
        np.testing.assert_allclose(average[2], invariant[2] + voigt, atol=1e-11)


def test_random_rotation_evaluates_the_model_in_the_drawn_frame():
    """E(x) = E_model(R x), F = R^T F_model(R x), sigma = R^T sigma_model(R x) R,
    with R the matrix the seed draws."""
    atoms = _structures()[1]
    seed = 11
    rotation = random_orthogonal_matrix(np.random.default_rng(seed))
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rotation.T
    rotated.cell = atoms.cell.array @ rotation.T
    plain = model_calculator(_model(LAB_FRAME))
    energy, forces, stress = _evaluate(plain, rotated)
    calculator = RandomRotationCalculator(model_calculator(_model(LAB_FRAME)), seed)
    result = _evaluate(calculator, atoms)
    assert result[0] == pytest.approx(energy, abs=1e-12)
    np.testing.assert_allclose(result[1], forces @ rotation, atol=1e-12)
    full = ase.stress.voigt_6_to_full_3x3_stress(stress)
    expected = ase.stress.full_3x3_to_voigt_6_stress(rotation.T @ full @ rotation)
    np.testing.assert_allclose(result[2], expected, atol=1e-12)


def test_random_rotation_of_an_invariant_model_is_the_model():
    atoms = _structures()[0]
    plain = _evaluate(model_calculator(_model()), atoms)
    calculator = RandomRotationCalculator(model_calculator(_model()), seed=0)
    for _ in range(3):
        atoms.positions[0, 0] += 0.01
        plain = _evaluate(model_calculator(_model()), atoms)
        rotated = _evaluate(calculator, atoms)
        assert rotated[0] == pytest.approx(plain[0], abs=1e-12)
        np.testing.assert_allclose(rotated[1], plain[1], atol=1e-12)


def test_random_orthogonal_matrices_are_haar_on_both_cosets():
    """Orthogonal, both determinants about equally often, and E[R] = 0 and
    E[R_ij^2] = 1/3 within four standard errors."""
    rng = np.random.default_rng(0)
    matrices = np.stack([random_orthogonal_matrix(rng) for _ in range(4000)])
    identity = np.broadcast_to(np.eye(3), matrices.shape)
    np.testing.assert_allclose(
        matrices @ matrices.transpose(0, 2, 1), identity, atol=1e-12
    )
    determinants = np.linalg.det(matrices)
    np.testing.assert_allclose(np.abs(determinants), 1.0, atol=1e-12)
    assert abs(np.mean(determinants > 0) - 0.5) < 4 * 0.5 / np.sqrt(4000)
    error = np.sqrt(1 / 3 / 4000)
    assert np.all(np.abs(matrices.mean(axis=0)) < 4 * error)
    assert np.all(np.abs((matrices**2).mean(axis=0) - 1 / 3) < 4 * 0.3 / np.sqrt(4000))


def test_a_model_without_energy_is_refused():
    from tests.helpers import AnalyticModel, capabilities

    model = msym.load_model(AnalyticModel(), capabilities=capabilities())
    assert "energy" not in model.outputs
    with pytest.raises(ValueError, match="has no 'energy' output"):
        AveragedCalculator(model)
