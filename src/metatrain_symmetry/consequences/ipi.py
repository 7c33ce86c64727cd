"""Molecular dynamics through i-PI, for users who run production MD with it.

i-PI (the ``ipi`` package) integrates the same initial state as the ASE engine
(:py:func:`~metatrain_symmetry.consequences.simulation.initial_state`), in the
same process: its ``ffdirect`` force field calls the variant's ASE calculator
through a small i-PI driver (``_ipi_driver.py``), so that the plain model, its
O(3) average and the random rotations run unchanged. The frames come back as the
same :py:class:`~metatrain_symmetry.consequences.simulation.Trajectory` as ASE's.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator

from .simulation import FrameRecorder, Settings, Trajectory, initial_state


__all__ = ["check_ipi", "registered_calculator", "run_dynamics_ipi"]

DRIVER = Path(__file__).with_name("_ipi_driver.py")
"""the i-PI driver file, loaded by i-PI as a ``custom`` PES"""

# the calculators the driver evaluates, by key, while their simulation runs
_CALCULATORS: dict[str, Calculator] = {}


def check_ipi() -> None:
    """Refuse to go on without i-PI, with a one-line error saying how to get it."""
    try:
        import ipi.scripting  # noqa: F401
    except ImportError as error:
        raise ValueError(
            "--engine ipi needs i-PI, which is not installed: pip install ipi "
            "(or metatrain-symmetry[ipi]), or use --engine ase"
        ) from error


def registered_calculator(key: str) -> Calculator:
    """The calculator a running i-PI simulation asked for by ``key``."""
    return _CALCULATORS[key]


def run_dynamics_ipi(
    atoms: Atoms,
    calculator: Calculator,
    settings: Settings,
    ensemble: str,
    seed: int,
    progress=None,
) -> Trajectory:
    """Molecular dynamics of ``atoms`` (not modified) with ``calculator``,
    integrated by i-PI from the initial state of the ASE engine.

    :param ensemble: ``"nve"`` (velocity Verlet) or ``"nvt"`` (i-PI's Langevin
        thermostat with the settings' friction, centre of mass fixed)
    :param seed: seed of the initial velocities (as with ASE) and of i-PI's
        random numbers
    :param progress: a progress bar advanced by one every step, or ``None``
    """
    from ipi.scripting import InteractiveSimulation

    if ensemble not in ("nve", "nvt"):
        raise ValueError(f"unknown ensemble '{ensemble}', use 'nve' or 'nvt'")
    rng = np.random.default_rng(seed)
    start = initial_state(atoms, settings, rng)
    key = uuid.uuid4().hex
    _CALCULATORS[key] = calculator
    recorder = FrameRecorder(start)
    try:
        # i-PI writes its outputs and restart files in the working directory
        with tempfile.TemporaryDirectory() as directory, contextlib.chdir(directory):
            start.write("template.xyz")
            boxed = _in_a_cell(start)
            xml = _simulation_xml(boxed, settings, ensemble, seed, key)
            simulation = InteractiveSimulation(xml)
            simulation.set_structures(boxed)
            _record(recorder, simulation, 0, settings)
            began = time.perf_counter()
            step, every = 0, settings.save_every
            while step < settings.steps:
                # from one kept frame to the next in one call: i-PI saves its
                # restart data at the end of each
                run = min(every - step % every, settings.steps - step)
                simulation.run(run, write_outputs=False)
                step += run
                if step % every == 0:
                    _record(recorder, simulation, step, settings)
                if progress is not None:
                    progress.update(run)
            elapsed = time.perf_counter() - began
    finally:
        del _CALCULATORS[key]
    return recorder.trajectory(elapsed / settings.steps)


def _in_a_cell(atoms: Atoms) -> Atoms:
    """``atoms`` with a cell i-PI accepts: its own when periodic, and for a
    molecule a box far larger than it (the calculators see the template's
    ``pbc``, not this box). The experiments never give i-PI a structure periodic
    in some directions only."""
    atoms = atoms.copy()
    if not atoms.pbc.any():
        span = np.ptp(atoms.positions, axis=0).max()
        atoms.cell = np.eye(3) * (span + 100.0)
    return atoms


def _record(recorder: FrameRecorder, simulation, step: int, settings) -> None:
    structure = simulation.get_structures()
    recorder.record(
        step * settings.time_step_fs / 1000,
        structure.get_positions(),
        structure.get_momenta(),
        structure.get_forces(),
        structure.get_potential_energy(),
    )


def _simulation_xml(
    start: Atoms, settings: Settings, ensemble: str, seed: int, key: str
) -> str:
    """The i-PI input: the structure with ASE's masses, the driver force field,
    and the integrator."""
    from ipi.scripting import simulation_xml

    structure = start.copy()
    # i-PI reads masses from "mass" (else from its own table, which differs)
    structure.arrays["mass"] = start.get_masses()
    periodic = bool(np.all(start.pbc))
    forcefield = (
        "<ffdirect name='model'><pes>custom</pes>"
        f"<pes_path>{DRIVER}</pes_path>"
        f"<parameters>{{template: template.xyz, key: {key}, "
        f"periodic: {periodic}}}</parameters></ffdirect>"
    )
    time_step = settings.time_step_fs * units.fs
    if ensemble == "nve":
        # as ASE's velocity Verlet: no constraint on the centre of mass
        motion = (
            "<motion mode='dynamics'><fixcom> False </fixcom>"
            "<dynamics mode='nve'>"
            f"<timestep units='ase'> {time_step} </timestep>"
            "</dynamics></motion>"
        )
    else:
        tau = 1.0 / (settings.friction_per_fs / units.fs)
        motion = (
            "<motion mode='dynamics'><fixcom> True </fixcom>"
            "<dynamics mode='nvt'>"
            f"<timestep units='ase'> {time_step} </timestep>"
            f"<thermostat mode='langevin'><tau units='ase'> {tau} </tau>"
            "</thermostat></dynamics></motion>"
        )
    temperature = settings.temperature_K * units.kB
    xml = simulation_xml(
        structure,
        forcefield,
        motion,
        temperature=temperature,
        output="<output prefix='ipi'></output>",
    )
    # i-PI's random numbers (thermostat noise) from the run's seed
    opening = xml.index(">", xml.index("<simulation")) + 1
    return xml[:opening] + f"<prng><seed> {seed} </seed></prng>" + xml[opening:]
