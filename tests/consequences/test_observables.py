"""Radial distribution functions, mean-squared displacement and bond
correlations against closed forms."""

import numpy as np
import pytest

from metatrain_symmetry.consequences.observables import (
    bond_correlation,
    mean_squared_displacement,
    radial_distribution,
)
from metatrain_symmetry.consequences.simulation import Trajectory


def _box_trajectory(positions, numbers, length):
    positions = np.asarray(positions, dtype=float)
    n_frames = len(positions)
    return Trajectory(
        time_ps=np.arange(n_frames) * 0.01,
        positions=positions,
        momenta=np.zeros_like(positions),
        forces=np.zeros_like(positions),
        potential_energy=np.zeros(n_frames),
        kinetic_energy=np.zeros(n_frames),
        masses=np.ones(len(numbers)),
        numbers=np.asarray(numbers),
        cell=np.eye(3) * length,
        pbc=np.ones(3, dtype=bool),
        seconds_per_step=0.0,
    )


def test_rdf_of_an_ideal_gas_is_one_within_its_errors():
    """Uniform random positions: g(r) = 1 for every pair, and the block errors
    describe the scatter around it: with B blocks the pulls follow Student's t
    with B - 1 degrees of freedom, of mean square (B - 1) / (B - 3)."""
    rng = np.random.default_rng(0)
    length, n_atoms, n_frames, n_blocks = 8.0, 60, 80, 10
    positions = rng.uniform(0, length, (n_frames, n_atoms, 3))
    numbers = [8] * 20 + [1] * 40
    rdf = radial_distribution(_box_trajectory(positions, numbers, length), n_blocks)
    assert set(rdf) == {"O-O", "O-H", "H-H"}
    for curve in rdf.values():
        r, g, error = (np.array(curve[key]) for key in ("r", "g", "error"))
        far = r > 2.0
        pulls = (g[far] - 1.0) / error[far]
        assert np.all(np.abs(pulls) < 7.0)
        expected = (n_blocks - 1) / (n_blocks - 3)
        assert np.mean(pulls**2) == pytest.approx(expected, rel=0.4)


def test_rdf_of_a_simple_cubic_lattice_counts_its_shells():
    """Six neighbours at the lattice constant: the integral of rho g 4 pi r^2 dr
    over the first peak is 6."""
    length = 6.0
    grid = np.stack(np.meshgrid(*[np.arange(3) * 2.0] * 3, indexing="ij"), -1)
    positions = grid.reshape(1, -1, 3).repeat(4, axis=0)
    rdf = radial_distribution(_box_trajectory(positions, [29] * 27, length), 2)
    r, g = np.array(rdf["Cu-Cu"]["r"]), np.array(rdf["Cu-Cu"]["g"])
    density = (27 - 1) / length**3  # the other atoms
    peak = (r > 1.8) & (r < 2.2)
    count = np.sum(density * g[peak] * 4 * np.pi * r[peak] ** 2 * 0.05)
    assert count == pytest.approx(6.0, rel=0.02)
    assert np.all(g[r < 1.9] == 0.0)


def test_msd_of_ballistic_atoms_is_v2_t2():
    """Atoms moving at constant velocities (the centre of mass at rest): MSD(t)
    = <|v_i - v_com|^2> t^2, with no spread between blocks."""
    rng = np.random.default_rng(1)
    velocities = rng.normal(size=(10, 3))
    velocities -= velocities.mean(axis=0)
    time = np.arange(50) * 0.01
    positions = velocities[None] * time[:, None, None]
    msd = mean_squared_displacement(_box_trajectory(positions, [1] * 10, 20.0), 5)
    lag = np.array(msd["time_ps"])
    expected = (velocities**2).sum(axis=1).mean() * lag**2
    np.testing.assert_allclose(msd["msd_A2"], expected, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(msd["msd_error_A2"], 0.0, atol=1e-12)


def test_bond_correlation_of_rotating_molecules_is_p2_of_the_angle():
    """Molecules spinning at a constant rate about an axis perpendicular to
    their bond: C2(t) = P2(cos(omega t)); across a periodic boundary too."""
    rate = 2.0
    time = np.arange(40) * 0.01
    positions = []
    for t in time:
        bond = 0.5 * np.array([np.cos(rate * t), np.sin(rate * t), 0.0])
        # the second molecule straddles the boundary of the 10 Å box
        positions.append([[5, 5, 5], 5 + bond, [9.8, 5, 2], [9.8, 5, 2] + bond])
    positions = np.array(positions, dtype=float)
    positions[:, 3, 0] %= 10.0
    correlation = bond_correlation(_box_trajectory(positions, [8, 1, 8, 1], 10.0), 2)
    assert correlation["n_bonds"] == 2
    lag = np.array(correlation["time_ps"])
    expected = 1.5 * np.cos(rate * lag) ** 2 - 0.5
    np.testing.assert_allclose(correlation["c2"], expected, atol=1e-12)
