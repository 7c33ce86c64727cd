import pytest
import torch

from metatrain_symmetry import O3Grid


@pytest.mark.parametrize("degree", [0, 3, 8])
def test_quadrature_grid_is_normalised_o3(degree):
    grid = O3Grid(degree)
    identity = torch.eye(3, dtype=torch.float64)
    assert grid.rotations.dtype == torch.float64
    assert torch.allclose(grid.rotations @ grid.rotations.transpose(1, 2), identity)
    determinants = torch.linalg.det(grid.rotations)
    assert torch.allclose(determinants.abs(), torch.ones_like(determinants))
    assert abs(float(grid.weights.sum()) - 1.0) < 1e-14
    # half of the weight on each coset
    assert abs(float(grid.weights[grid.improper].sum()) - 0.5) < 1e-14
    assert grid.max_lambda == degree // 2


@pytest.mark.parametrize("degree", [4, 8])
def test_quadrature_integrates_wigner_products_exactly(degree):
    """Schur orthogonality: sum_g w_g D^l_mn(g) D^l'_m'n'(g) = delta / (2l + 1)
    for all l + l' <= degree."""
    grid = O3Grid(degree, inversion=False)
    wigner = grid.wigner_matrices(degree // 2)
    for first in range(degree // 2 + 1):
        for second in range(degree // 2 + 1):
            product = torch.einsum(
                "g,gab,gcd->abcd", grid.weights, wigner[first], wigner[second]
            )
            expected = torch.zeros_like(product)
            if first == second:
                size = 2 * first + 1
                for a in range(size):
                    for b in range(size):
                        expected[a, b, a, b] = 1.0 / size
            assert torch.allclose(product, expected, atol=1e-13)


def test_quadrature_is_not_exact_beyond_its_degree():
    grid = O3Grid(2, inversion=False)
    wigner = grid.wigner_matrices(2)[2]
    product = torch.einsum("g,gab,gcd->abcd", grid.weights, wigner, wigner)
    exact = torch.einsum("abab->", product)  # would be 1 for an exact rule
    assert abs(float(exact) - 1.0) > 1e-3


def test_random_grid_pairs_cosets():
    grid = O3Grid.random(64, seed=3)
    assert len(grid) == 64
    assert grid.max_lambda is None
    assert torch.allclose(grid.rotations[:32], -grid.rotations[32:])
    assert torch.allclose(grid.weights, torch.full((64,), 1 / 64, dtype=torch.float64))
    same = O3Grid.random(64, seed=3)
    assert torch.equal(grid.rotations, same.rotations)
    assert not torch.equal(grid.rotations, O3Grid.random(64, seed=4).rotations)


def test_grid_errors():
    with pytest.raises(ValueError, match="between 0 and 131"):
        O3Grid(200)
    with pytest.raises(ValueError, match="must be even"):
        O3Grid.random(5)
    with pytest.raises(ValueError, match="degree at least 10"):
        O3Grid(8).check_lambda(5)
