"""Trajectories that are interrupted and started again continue exactly where
they stopped: thermostat noise, random frames and kept frames included."""

import json
import time

import ase
import ase.build
import numpy as np
import pytest
from ase import units
from ase.calculators.emt import EMT

from metatrain_symmetry.calculators import RandomRotationCalculator
from metatrain_symmetry.consequences.ipi import run_dynamics_ipi
from metatrain_symmetry.consequences.simulation import (
    Settings,
    TrajectoryCheckpoint,
    relax,
    run_dynamics,
)


SETTINGS = Settings(steps=60, frames=20, temperature_K=500.0, seed=3)


class Interrupt(Exception):
    pass


class StopAfter:
    """A progress bar that interrupts the run after ``steps`` steps."""

    def __init__(self, steps: int):
        self.steps = steps
        self.done = 0

    def update(self, steps: int = 1) -> None:
        self.done += steps
        if self.done >= self.steps:
            raise Interrupt()


def cluster():
    atoms = ase.build.molecule("CH3OH")
    atoms.set_chemical_symbols(["Cu"] * len(atoms))
    atoms.positions *= 1.6
    return atoms


class FieldEMT(EMT):
    """EMT in a uniform field along z: not invariant, so that every random
    frame of ``random_rotation`` gives other forces."""

    field = 0.3  # eV/A

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        super().calculate(atoms, properties, system_changes)
        self.results["energy"] -= self.field * self.atoms.positions[:, 2].sum()
        self.results["forces"] = self.results["forces"] + [0.0, 0.0, self.field]


def calculator(variant: str, seed: int = 5):
    # a fresh calculator, as a new process would make it
    if variant == "plain":
        return FieldEMT()
    return RandomRotationCalculator(FieldEMT(), seed=seed)


# the two engines of molecular dynamics
ENGINES = {"ase": run_dynamics, "ipi": run_dynamics_ipi}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("variant", ["plain", "random_rotation"])
@pytest.mark.parametrize("ensemble", ["nve", "nvt"])
def test_an_interrupted_trajectory_continues_exactly(
    tmp_path, engine, variant, ensemble
):
    dynamics = ENGINES[engine]
    atoms = cluster()
    whole = dynamics(atoms, calculator(variant), SETTINGS, ensemble, seed=7)
    if variant == "random_rotation":
        # another stream of random frames gives another trajectory
        other = dynamics(atoms, calculator(variant, 6), SETTINGS, ensemble, 7)
        assert np.abs(other.forces[-1] - whole.forces[-1]).max() > 1e-3

    checkpoint = TrajectoryCheckpoint(tmp_path / "state.npz", every_seconds=0.0)
    with pytest.raises(Interrupt):
        dynamics(
            atoms, calculator(variant), SETTINGS, ensemble, 7, StopAfter(38), checkpoint
        )
    # the last state saved is that of a kept frame close to the stop
    with np.load(checkpoint.path) as saved:
        steps = json.loads(str(saved["meta"]))["steps"]
        assert abs(steps - 38) < SETTINGS.save_every
        assert len(saved["frames_t"]) == steps // SETTINGS.save_every + 1

    progress = StopAfter(10**6)
    resumed = dynamics(
        atoms, calculator(variant), SETTINGS, ensemble, 7, progress, checkpoint
    )
    assert progress.done == SETTINGS.steps
    assert len(resumed.time_ps) == len(whole.time_ps) == SETTINGS.frames + 1
    for name in ("time_ps", "positions", "momenta", "forces", "potential_energy"):
        np.testing.assert_allclose(
            getattr(resumed, name), getattr(whole, name), rtol=1e-12, atol=1e-12
        )
    # and the trajectory moved
    assert np.abs(whole.positions[-1] - whole.positions[0]).max() > 1e-2


def test_without_a_saved_state_the_run_starts_from_the_beginning(tmp_path):
    atoms = cluster()
    checkpoint = TrajectoryCheckpoint(tmp_path / "none.npz", every_seconds=1e9)
    trajectory = run_dynamics(
        atoms, EMT(), SETTINGS, "nvt", seed=7, checkpoint=checkpoint
    )
    reference = run_dynamics(atoms, EMT(), SETTINGS, "nvt", seed=7)
    np.testing.assert_array_equal(trajectory.positions, reference.positions)
    # no save within the interval, and removing a missing file is fine
    assert not checkpoint.path.exists()
    checkpoint.remove()


@pytest.mark.parametrize("engine", ENGINES)
def test_the_thermostat_holds_a_small_molecule_at_its_temperature(engine):
    """Three atoms with the centre of mass fixed have six degrees of freedom, so
    their mean kinetic energy is ``3 kT``. (Langevin's own ``fixcm`` gives about
    ``4.4 kT`` here.)"""
    atoms = ase.Atoms("Cu3", positions=[[0, 0, 0], [2.5, 0, 0], [1.25, 2.1, 0]])
    settings = Settings(
        steps=10000,
        frames=2000,
        time_step_fs=2.0,
        temperature_K=600.0,
        friction_per_fs=0.05,
        seed=1,
    )
    trajectory = ENGINES[engine](atoms, EMT(), settings, "nvt", 1)
    kinetic = trajectory.kinetic_energy[len(trajectory.kinetic_energy) // 10 :]
    # 20 ps over a 20 fs relaxation: the mean is known to about 2 %
    assert np.mean(kinetic) / (3 * units.kB * 600.0) == pytest.approx(1.0, abs=0.1)
    centre = trajectory.positions.mean(axis=1)
    assert np.ptp(centre, axis=0).max() < 1e-8


class SlowStartEMT(EMT):
    """EMT whose first two calls take a second more, as a TorchScript model's
    first calls do."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        self.calls += 1
        if self.calls <= 2:
            time.sleep(1.0)
        super().calculate(atoms, properties, system_changes)


@pytest.mark.parametrize("engine", ENGINES)
def test_the_time_per_step_leaves_out_slow_first_calls(engine):
    settings = Settings(steps=40, frames=10, temperature_K=300.0)
    trajectory = ENGINES[engine](cluster(), SlowStartEMT(), settings, "nve", 0)
    assert 0 < trajectory.seconds_per_step < 0.1


def test_the_time_per_step_of_a_relaxation_leaves_out_slow_first_calls():
    settings = Settings(steps=30, fmax=1e-6)
    result = relax(cluster(), SlowStartEMT(), settings)
    assert result["n_steps"] == 30
    assert 0 < result["seconds_per_step"] < 0.1


def test_a_relaxation_that_starts_converged_has_a_cost():
    # no step to time: the cost is that of its one evaluation, so that other
    # variants' costs can be given relative to it
    result = relax(cluster(), EMT(), Settings(fmax=1e3))
    assert result["n_steps"] == 0
    assert result["seconds_per_step"] > 0
