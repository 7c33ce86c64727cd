"""What rotational symmetry breaking does to an isolated molecule: angular
momentum and torque in NVE, and the orientations it samples in the lab frame.

A rotation-invariant energy exerts no net torque, so an isolated molecule started
without angular momentum keeps none (to round-off), and a thermostatted molecule
samples every orientation with the same probability. A lab-frame term breaks both.
"""

from __future__ import annotations

import numpy as np
from ase import units
from scipy import stats

from .simulation import Trajectory


__all__ = [
    "HBAR",
    "ORIENTATION_BINS",
    "angular_momentum",
    "molecule_nve_summary",
    "net_torque",
    "orientation_free_energy",
    "orientations_summary",
    "principal_axes",
    "statistical_inefficiency",
    "uniformity_test",
]


HBAR = units._hbar / units._e * 1e15 * units.fs
"""the reduced Planck constant in ASE units (eV times ASE time)"""

ORIENTATION_BINS = (10, 12)
"""bins of the orientation maps in cos(theta) (upper hemisphere) and phi"""


def _centred(trajectory: Trajectory) -> np.ndarray:
    """``(n_frames, n_atoms, 3)`` positions relative to the centre of mass."""
    masses = trajectory.masses
    centre = np.einsum("a,fax->fx", masses, trajectory.positions) / masses.sum()
    return trajectory.positions - centre[:, None, :]


def angular_momentum(trajectory: Trajectory) -> np.ndarray:
    """Total angular momentum about the centre of mass, ``(n_frames, 3)``, in ħ."""
    return np.cross(_centred(trajectory), trajectory.momenta).sum(axis=1) / HBAR


def net_torque(trajectory: Trajectory) -> np.ndarray:
    """Net torque ``sum_i (r_i - r_com) x F_i``, ``(n_frames, 3)``, in eV."""
    return np.cross(_centred(trajectory), trajectory.forces).sum(axis=1)


def _inertia(centred: np.ndarray, masses: np.ndarray) -> np.ndarray:
    """``(n_frames, 3, 3)`` inertia tensors about the centre of mass."""
    squared = np.einsum("a,fax,fax->f", masses, centred, centred)
    outer = np.einsum("a,fax,fay->fxy", masses, centred, centred)
    return squared[:, None, None] * np.eye(3) - outer


def rotational_kinetic_energy(trajectory: Trajectory) -> np.ndarray:
    """``L . I^-1 L / 2`` per frame, ``(n_frames,)``, in eV."""
    centred = _centred(trajectory)
    inertia = _inertia(centred, trajectory.masses)
    momentum = np.cross(centred, trajectory.momenta).sum(axis=1)
    inverse = np.linalg.pinv(inertia)
    return 0.5 * np.einsum("fx,fxy,fy->f", momentum, inverse, momentum)


def principal_axes(trajectory: Trajectory) -> np.ndarray:
    """Unit principal axes of inertia in the lab frame, ``(n_frames, 3, 3)``: axis
    ``k`` (by increasing moment) of frame ``f`` is ``axes[f, :, k]``, with its sign
    chosen to point into the upper hemisphere (axes are lines, not arrows)."""
    _, vectors = np.linalg.eigh(_inertia(_centred(trajectory), trajectory.masses))
    signs = np.where(vectors[:, 2:3, :] < 0, -1.0, 1.0)
    return vectors * signs


def molecule_nve_summary(trajectory: Trajectory, temperature_K: float) -> dict:
    """The NVE record of one molecule: angular momentum, torque, energy drift and
    how fast the molecule spins up.

    ``time_to_kT_ps`` is the first kept time at which the rotational kinetic
    energy reaches kT; when it does not within the run, it is extrapolated as
    ``t_end sqrt(kT / E_rot(t_end))`` (a constant torque spins the molecule up
    as ``E_rot ~ t^2``) and ``time_to_kT_extrapolated`` is true; ``None`` when the
    rotational energy stays at round-off.
    """
    momentum = angular_momentum(trajectory)
    torque = net_torque(trajectory)
    total = trajectory.potential_energy + trajectory.kinetic_energy
    time = trajectory.time_ps
    drift = float(np.polyfit(time, total, 1)[0]) if len(time) > 1 else 0.0
    rotational = rotational_kinetic_energy(trajectory)
    kT = units.kB * temperature_K
    reached = np.nonzero(rotational >= kT)[0]
    extrapolated = False
    if len(reached) > 0:
        time_to_kT = float(time[reached[0]])
    elif rotational[-1] > 1e-10 * kT and time[-1] > 0:
        time_to_kT = float(time[-1] * np.sqrt(kT / rotational[-1]))
        extrapolated = True
    else:
        time_to_kT = None
    change = np.linalg.norm(momentum - momentum[0], axis=1)
    return {
        "initial_torque_eV": torque[0].tolist(),
        "angular_momentum_hbar": momentum.tolist(),
        "torque_eV": torque.tolist(),
        "max_angular_momentum_change_hbar": float(change.max()),
        "energy_drift_eV_per_ps": drift,
        "rotational_kinetic_energy_eV": rotational.tolist(),
        "time_to_kT_ps": time_to_kT,
        "time_to_kT_extrapolated": extrapolated,
        "time_ps": time.tolist(),
    }


def statistical_inefficiency(series: np.ndarray) -> float:
    """Statistical inefficiency ``g = 1 + 2 sum_{t <= M} rho(t)`` of a time
    series ``(n,)``, or the mean over the columns of ``(n, k)`` that fluctuate:
    ``n / g`` samples are about independent. The window ``M`` is Sokal's: the
    smallest with ``M >= 5 g(M)``, which keeps the noise of ``rho`` at long lags
    out. (The largest over columns would be biased high by their noise.)"""
    series = np.asarray(series, dtype=np.float64).reshape(len(series), -1)
    n = len(series)
    values = []
    for column in series.T:
        fluctuation = column - column.mean()
        if not np.any(fluctuation):
            continue
        spectrum = np.fft.rfft(fluctuation, 2 * n)
        covariance = np.fft.irfft(spectrum * np.conj(spectrum))[:n] / n
        cumulative = 1.0 + 2.0 * np.cumsum(covariance[1:] / covariance[0])
        windows = np.arange(1, n)
        enough = np.nonzero(windows >= 5.0 * cumulative)[0]
        g = cumulative[enough[0]] if len(enough) else cumulative[-1]
        values.append(max(float(g), 1.0))
    return float(np.mean(values)) if values else 1.0


def uniformity_test(
    axes: np.ndarray, max_samples: float | None = None
) -> tuple[float, int]:
    """Test that a molecule samples orientations uniformly (Haar).

    For uniform orientations every principal axis, folded into the upper
    hemisphere, has ``cos(theta)`` uniform on [0, 1] and ``phi`` uniform on
    [-pi, pi]. Each of these six marginals gets a Kolmogorov-Smirnov test with
    the effective number of independent samples ``n / g`` (``g`` the statistical
    inefficiency of the axes' outer products, which are blind to the folding), and
    the smallest p-value is Bonferroni-corrected.

    :param axes: ``(n_frames, 3, 3)`` from :py:func:`principal_axes`
    :param max_samples: at most this many independent samples (a run shorter
        than the time a molecule takes to turn cannot see its own correlations)
    :return: the p-value and the effective number of samples
    """
    n_frames = len(axes)
    outer = np.einsum("fxk,fyk->fkxy", axes, axes).reshape(n_frames, -1)
    n_effective = n_frames / statistical_inefficiency(outer)
    if max_samples is not None:
        n_effective = min(n_effective, max_samples)
    n_effective = max(int(n_effective), 1)
    p_values = []
    for k in range(3):
        cos_theta = axes[:, 2, k]
        phi = np.arctan2(axes[:, 1, k], axes[:, 0, k])
        for sample, cdf in (
            (cos_theta, stats.uniform(0.0, 1.0).cdf),
            (phi, stats.uniform(-np.pi, 2 * np.pi).cdf),
        ):
            distance = stats.kstest(sample, cdf).statistic
            p_values.append(float(stats.kstwo.sf(distance, n_effective)))
    return min(1.0, len(p_values) * min(p_values)), n_effective


def orientation_free_energy(axes: np.ndarray, temperature_K: float) -> np.ndarray:
    """``-kT ln P(cos theta, phi)`` of the largest-moment axis (the normal of a
    planar molecule) on :py:data:`ORIENTATION_BINS`, relative to its uniform
    value, ``(n_cos, n_phi)`` in eV; ``nan`` in bins never visited."""
    axis = axes[:, :, 2]
    counts, _, _ = np.histogram2d(
        axis[:, 2],
        np.arctan2(axis[:, 1], axis[:, 0]),
        bins=ORIENTATION_BINS,
        range=[[0.0, 1.0], [-np.pi, np.pi]],
    )
    probability = counts / counts.sum()
    uniform = 1.0 / counts.size
    with np.errstate(divide="ignore"):
        energy = -units.kB * temperature_K * np.log(probability / uniform)
    return np.where(np.isfinite(energy), energy, np.nan)


def turning_time_ps(trajectory: Trajectory, temperature_K: float) -> float:
    """``sqrt(I_max / kT)``, the time a free molecule at temperature takes to turn
    by one radian about its axis of largest moment, in ps: the shortest time in
    which its orientation can decorrelate."""
    moments = np.linalg.eigvalsh(_inertia(_centred(trajectory), trajectory.masses))
    largest = float(moments[:, -1].mean())
    return float(np.sqrt(largest / (units.kB * temperature_K)) / (1000 * units.fs))


def orientations_summary(trajectory: Trajectory, temperature_K: float) -> dict:
    """The orientations a thermostatted molecule samples: the uniformity test
    (with at most one independent sample per :py:func:`turning_time_ps`) and the
    orientational free-energy map."""
    axes = principal_axes(trajectory)
    duration = float(trajectory.time_ps[-1] - trajectory.time_ps[0])
    turns = duration / turning_time_ps(trajectory, temperature_K)
    p_value, n_effective = uniformity_test(axes, max_samples=turns)
    return {
        "uniformity_p_value": p_value,
        "n_samples": n_effective,
        "n_frames": len(axes),
        "free_energy_eV": orientation_free_energy(axes, temperature_K).tolist(),
    }
