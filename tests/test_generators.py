import numpy as np
import pytest
import scipy.linalg
import torch
from metatomic.torch.o3 import O3Transformations

from metatrain_symmetry.generators import (
    apply_generator,
    inversion_sign,
    so3_generators,
    spherical_generators,
)
from metatrain_symmetry.irreps import BlockLayout


def commutator(a, b):
    return a @ b - b @ a


def test_generators_rotate_about_their_axis():
    generators = so3_generators()
    r = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64)
    for k in range(3):
        axis = torch.zeros(3, dtype=torch.float64)
        axis[k] = 1.0
        assert torch.allclose(generators[k] @ r, torch.linalg.cross(axis, r))
    x, y, z = generators
    assert torch.allclose(commutator(x, y), z)
    assert torch.allclose(commutator(y, z), x)


@pytest.mark.parametrize("o3_lambda", range(7))
def test_spherical_generators_represent_the_algebra(o3_lambda):
    lx, ly, lz = spherical_generators(o3_lambda)
    for matrix in (lx, ly, lz):
        assert torch.allclose(matrix, -matrix.T, atol=1e-13)
    assert torch.allclose(commutator(lx, ly), lz, atol=1e-12)
    assert torch.allclose(commutator(ly, lz), lx, atol=1e-12)
    # the exponential of the combination is metatomic's Wigner matrix of the
    # rotation, at a finite angle other than the one they were computed at
    angles = torch.tensor([0.9, -1.7, 0.4], dtype=torch.float64)
    rotation = torch.linalg.matrix_exp(
        torch.einsum("k,kij->ij", angles, so3_generators())
    )
    wigner = O3Transformations(rotation[None], o3_lambda).wigner_D_matrices(o3_lambda)
    exponential = scipy.linalg.expm(
        np.einsum("k,kij->ij", angles.numpy(), np.stack([lx, ly, lz]))
    )
    assert np.allclose(exponential, wigner[0].numpy(), atol=1e-12)


def test_degree_one_is_the_vector_representation():
    # real spherical components of a vector are (y, z, x)
    order = [1, 2, 0]
    cartesian = so3_generators()[:, order][:, :, order]
    assert torch.allclose(spherical_generators(1), cartesian, atol=1e-13)


def test_generators_act_on_matrices_by_commutator():
    generator = so3_generators()[1]
    matrix = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    layout = BlockLayout("matrix", 0, 1, ("xyz_1", "xyz_2"))
    expected = torch.einsum("ij,sjkp->sikp", generator, matrix) - torch.einsum(
        "sijp,jk->sikp", matrix, generator
    )
    assert torch.allclose(apply_generator(matrix, layout, generator), expected)
    invariant = BlockLayout("invariant")
    assert torch.all(apply_generator(matrix[:, 0], invariant, generator) == 0)


def test_inversion_signs():
    assert inversion_sign(BlockLayout("invariant")) == 1
    assert inversion_sign(BlockLayout("vector", 1, 1, ("xyz",))) == -1
    assert inversion_sign(BlockLayout("matrix", 0, 1, ("xyz_1", "xyz_2"))) == 1
    assert inversion_sign(BlockLayout("spherical", 1, -1, ("o3_mu",))) == 1
    assert inversion_sign(BlockLayout("spherical", 2, -1, ("o3_mu",))) == -1
