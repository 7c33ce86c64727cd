"""(lambda, sigma) bookkeeping: spectrum columns, undoing rotations and the
decomposition of Cartesian blocks."""

import pytest
import torch
from scipy.spatial.transform import Rotation

from metatrain_symmetry.irreps import (
    BlockLayout,
    decompose,
    irrep_keys,
    irrep_name,
    sigma_index,
    spectrum_column,
    spectrum_irreps,
    undo_rotation,
)


def rotations(n: int, seed: int = 0) -> torch.Tensor:
    matrices = Rotation.random(n, random_state=seed).as_matrix()
    return torch.from_numpy(matrices)


def test_spectrum_columns_follow_the_irrep_order():
    irreps = spectrum_irreps(3)
    assert irreps[:4] == [(0, 1), (0, -1), (1, 1), (1, -1)]
    assert len(irreps) == 8
    for column, (o3_lambda, sigma) in enumerate(irreps):
        assert spectrum_column(o3_lambda, sigma) == column
        assert sigma_index(sigma) == column % 2
    assert irrep_name(2, -1) == "(2,-)"
    assert irrep_name(0, 1) == "(0,+)"


@pytest.mark.parametrize("layout", ["vector", "matrix"])
def test_undo_rotation_recovers_equivariant_responses(layout):
    """A response that rotates with the structure is constant once the rotation
    is undone."""
    torch.manual_seed(0)
    grid = rotations(5)
    if layout == "vector":
        value = torch.randn(2, 3, 4, dtype=torch.float64)
        rotated = torch.einsum("cij,sjp->csip", grid, value)
        block = BlockLayout("vector", 1, 1, ("xyz",))
    else:
        value = torch.randn(2, 3, 3, 1, dtype=torch.float64)
        rotated = torch.einsum("cij,ckl,sjlp->csikp", grid, grid, value)
        block = BlockLayout("matrix", 0, 1, ("xyz_1", "xyz_2"))
    back = undo_rotation(rotated, block, grid, [], None)
    assert torch.allclose(back, value.expand_as(back), atol=1e-12)


def test_matrix_decomposition_is_orthonormal():
    torch.manual_seed(1)
    values = torch.randn(4, 2, 3, 3, 5, dtype=torch.float64)
    parts = decompose(values, BlockLayout("matrix", 0, 1, ("xyz_1", "xyz_2")))
    assert [part.shape[2] for part in parts] == [1, 3, 5]
    total = sum(part.square().sum() for part in parts)
    assert torch.allclose(total, values.square().sum())
    # the identity is pure lambda = 0, an antisymmetric matrix pure lambda = 1
    identity = torch.eye(3, dtype=torch.float64).reshape(1, 1, 3, 3, 1)
    l0, l1, l2 = decompose(identity, BlockLayout("matrix", 0, 1, ()))
    assert torch.allclose(l1, torch.zeros_like(l1))
    assert torch.allclose(l2, torch.zeros_like(l2))
    assert torch.allclose(l0.square().sum(), torch.tensor(3.0, dtype=torch.float64))


def test_irrep_keys_add_lambda_and_sigma():
    layout = BlockLayout("vector", 1, 1, ("xyz",))
    (irrep,) = layout.irreps
    assert irrep_keys(["_"], torch.tensor([0]), irrep) == (
        ["o3_lambda", "o3_sigma"],
        [1, 1],
    )
    invariant = BlockLayout("invariant", add_scalar_key=False).irreps[0]
    assert irrep_keys(["_"], torch.tensor([0]), invariant) == (["_"], [0])
