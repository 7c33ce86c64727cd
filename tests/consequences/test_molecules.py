"""Angular momentum, torque and the orientation statistics against closed forms
and known distributions."""

import numpy as np
import pytest
from ase import units
from scipy.spatial.transform import Rotation

from metatrain_symmetry.consequences.molecules import (
    HBAR,
    angular_momentum,
    molecule_nve_summary,
    net_torque,
    principal_axes,
    statistical_inefficiency,
    uniformity_test,
)
from metatrain_symmetry.consequences.simulation import Trajectory


def _trajectory(positions, momenta=None, forces=None, masses=None):
    positions = np.asarray(positions, dtype=float)
    n_frames, n_atoms, _ = positions.shape
    zeros = np.zeros_like(positions)
    return Trajectory(
        time_ps=np.linspace(0.0, 1.0, n_frames),
        positions=positions,
        momenta=zeros if momenta is None else np.asarray(momenta, dtype=float),
        forces=zeros if forces is None else np.asarray(forces, dtype=float),
        potential_energy=np.zeros(n_frames),
        kinetic_energy=np.zeros(n_frames),
        masses=np.ones(n_atoms) if masses is None else np.asarray(masses, float),
        numbers=np.ones(n_atoms, dtype=int),
        cell=np.zeros((3, 3)),
        pbc=np.zeros(3, dtype=bool),
        seconds_per_step=0.0,
    )


WATER = np.array([[0.0, 0.0, 0.1], [0.76, 0.0, -0.5], [-0.76, 0.0, -0.5]])
MASSES = np.array([16.0, 1.0, 1.0])


def test_angular_momentum_of_a_rigid_rotation_is_inertia_times_omega():
    """v = omega x (r - r_com) gives L = I omega, and a translation adds nothing."""
    omega = np.array([0.01, -0.02, 0.03])
    centre = MASSES @ WATER / MASSES.sum()
    centred = WATER - centre
    velocities = np.cross(omega, centred) + np.array([0.5, 0.0, 0.0])
    momenta = MASSES[:, None] * velocities
    inertia = sum(
        m * (np.dot(r, r) * np.eye(3) - np.outer(r, r))
        for m, r in zip(MASSES, centred, strict=True)
    )
    trajectory = _trajectory(WATER[None] + 3.0, momenta[None], masses=MASSES)
    expected = inertia @ omega / HBAR
    np.testing.assert_allclose(angular_momentum(trajectory)[0], expected, rtol=1e-12)


def test_hbar_in_ase_units():
    # hbar = 6.582e-16 eV s, and one ASE time unit is 10.18 fs
    assert HBAR == pytest.approx(6.582119569e-16 / (1e-15 / units.fs), rel=1e-8)


def test_torque_of_central_and_lab_forces():
    """Forces along the bonds from the centre of mass exert no torque; a
    constant force F on one atom at r exerts r x F."""
    centre = MASSES @ WATER / MASSES.sum()
    central = (WATER - centre) * np.array([[1.0], [2.0], [-3.0]])
    trajectory = _trajectory(WATER[None], forces=central[None], masses=MASSES)
    np.testing.assert_allclose(net_torque(trajectory)[0], 0.0, atol=1e-14)
    forces = np.zeros((3, 3))
    forces[1] = [0.0, 0.0, 1.0]
    trajectory = _trajectory(WATER[None], forces=forces[None], masses=MASSES)
    expected = np.cross(WATER[1] - centre, forces[1])
    np.testing.assert_allclose(net_torque(trajectory)[0], expected, atol=1e-14)


def test_a_spinning_molecule_reaches_kT():
    """A molecule whose angular momentum grows linearly: its rotational energy
    grows as t^2, and the time to kT is found (extrapolated when not reached)."""
    omega = np.array([0.0, 0.0, 1.0])
    centred = WATER - MASSES @ WATER / MASSES.sum()
    growth = np.linspace(0.0, 1.0, 11)
    momenta = [
        MASSES[:, None] * np.cross(scale * 0.05 * omega, centred) for scale in growth
    ]
    trajectory = _trajectory([WATER] * 11, momenta, masses=MASSES)
    summary = molecule_nve_summary(trajectory, temperature_K=300.0)
    rotational = np.array(summary["rotational_kinetic_energy_eV"])
    np.testing.assert_allclose(rotational, rotational[-1] * growth**2, rtol=1e-10)
    kT = units.kB * 300.0
    if rotational[-1] < kT:
        expected = np.sqrt(kT / rotational[-1])
        assert summary["time_to_kT_extrapolated"]
        assert summary["time_to_kT_ps"] == pytest.approx(expected, rel=1e-10)
    else:
        assert not summary["time_to_kT_extrapolated"]
        assert rotational[growth == summary["time_to_kT_ps"]][0] >= kT


def test_statistical_inefficiency_of_known_series():
    """About 1 for independent samples, (1 + phi) / (1 - phi) for AR(1)."""
    rng = np.random.default_rng(0)
    assert statistical_inefficiency(rng.standard_normal(20000)) < 1.1
    phi = 0.8
    series = np.zeros(40000)
    noise = rng.standard_normal(len(series))
    for t in range(1, len(series)):
        series[t] = phi * series[t - 1] + noise[t]
    expected = (1 + phi) / (1 - phi)
    assert statistical_inefficiency(series) == pytest.approx(expected, rel=0.15)


def _axes_of(rotations: Rotation) -> np.ndarray:
    """Principal axes of water rotated by ``rotations``."""
    positions = np.einsum("fxy,ay->fax", rotations.as_matrix(), WATER)
    return principal_axes(_trajectory(positions, masses=MASSES))


def test_uniformity_of_haar_and_of_aligned_orientations():
    """Haar-random orientations pass; orientations within 20 degrees of one
    orientation fail."""
    rng = np.random.default_rng(1)
    p_value, n_samples = uniformity_test(_axes_of(Rotation.random(400, rng=rng)))
    assert p_value > 0.01
    assert n_samples > 300
    small = Rotation.from_rotvec(0.35 * rng.uniform(-1, 1, (400, 3)))
    p_value, _ = uniformity_test(_axes_of(small))
    assert p_value < 1e-10


def test_correlated_samples_count_as_fewer():
    """The same 40 Haar orientations, each repeated 10 times in a row, count as
    about 40 samples, not 400."""
    rng = np.random.default_rng(2)
    axes = np.repeat(_axes_of(Rotation.random(40, rng=rng)), 10, axis=0)
    _, n_samples = uniformity_test(axes)
    assert 20 <= n_samples <= 80
