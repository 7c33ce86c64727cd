"""Molecular dynamics through i-PI, for users who run production MD with it.

i-PI (the ``ipi`` package) integrates the same initial state as the ASE engine
(:py:func:`~metatrain_symmetry.consequences.simulation.initial_state`), in the
same process: its ``ffdirect`` force field calls the variant's ASE calculator
through a small i-PI driver (``_ipi_driver.py``), so that the plain model, its
O(3) average and the random rotations run unchanged. The frames come back as the
same :py:class:`~metatrain_symmetry.consequences.simulation.Trajectory` as ASE's,
and a run saves its state in the same
:py:class:`~metatrain_symmetry.consequences.simulation.TrajectoryCheckpoint` to
continue exactly after an interruption.
"""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator

from .simulation import (
    FrameRecorder,
    Settings,
    StepTimer,
    Trajectory,
    TrajectoryCheckpoint,
    calculator_results,
    initial_state,
    saved_results,
)


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
    checkpoint: TrajectoryCheckpoint | None = None,
) -> Trajectory:
    """Molecular dynamics of ``atoms`` (not modified) with ``calculator``,
    integrated by i-PI from the initial state of the ASE engine.

    :param ensemble: ``"nve"`` (velocity Verlet) or ``"nvt"`` (i-PI's Langevin
        thermostat with the settings' friction, centre of mass fixed)
    :param seed: seed of the initial velocities (as with ASE) and of i-PI's
        random numbers
    :param progress: a progress bar advanced by one every step, or ``None``
    :param checkpoint: save the running state there (i-PI's restart file, the
        kept frames, the calculator's random generator and last results), and
        continue from the state saved there by an interrupted run
    """
    from ipi.scripting import InteractiveSimulation

    if ensemble not in ("nve", "nvt"):
        raise ValueError(f"unknown ensemble '{ensemble}', use 'nve' or 'nvt'")
    start = initial_state(atoms, settings, np.random.default_rng(seed))
    key = uuid.uuid4().hex
    recorder = FrameRecorder(start)
    rngs = {}
    if isinstance(getattr(calculator, "rng", None), np.random.Generator):
        rngs["calculator"] = calculator.rng
    saved = None if checkpoint is None else checkpoint.read(recorder, rngs)
    # on resuming, i-PI first recomputes the forces of the saved positions: the
    # interrupted run's results, which a random frame would not give again
    _CALCULATORS[key] = (
        calculator if saved is None else _Replay(calculator, saved_results(*saved))
    )
    try:
        with _working_directory(checkpoint):
            start.write("template.xyz")
            boxed = _in_a_cell(start)
            simulation = InteractiveSimulation(
                _simulation_xml(boxed, settings, ensemble, seed, key)
            )
            simulation.set_structures(boxed)
            if saved is None:
                _record(recorder, simulation, 0, settings)
                first_step = 0
            else:
                first_step = _restore(simulation, *saved)
            if progress is not None:
                progress.update(first_step)

            def kept(at: int) -> None:
                _record(recorder, simulation, at, settings)
                if checkpoint is not None and checkpoint.due():
                    _save(checkpoint, simulation, at, recorder, rngs, calculator)

            timer = StepTimer()
            _integrate(simulation, first_step, settings, kept, progress, timer)
    finally:
        del _CALCULATORS[key]
    return recorder.trajectory(timer.seconds_per_step())


@contextlib.contextmanager
def _working_directory(checkpoint: TrajectoryCheckpoint | None):
    """Run in a new working directory for i-PI, which writes its outputs and
    restart files there (a resumed run reads its state from the checkpoint
    instead: i-PI's restart file rounds positions, momenta and masses). Next to
    the checkpoint, a killed run leaves it in the work directory, which the
    finished command removes."""
    parent = None if checkpoint is None else checkpoint.path.parent
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="ipi-", dir=parent) as directory,
        contextlib.chdir(directory),
    ):
        yield


def _integrate(
    simulation, step: int, settings: Settings, kept, progress, timer: StepTimer
) -> None:
    """Run ``simulation`` from ``step`` to ``settings.steps``, from one kept frame
    to the next in one call, calling ``kept(step)`` at each kept frame, and
    marking every call's end on ``timer``."""
    timer.mark(step)
    while step < settings.steps:
        run = min(
            settings.save_every - step % settings.save_every, settings.steps - step
        )
        simulation.run(run, write_outputs=False)
        step += run
        timer.mark(step)
        if step % settings.save_every == 0:
            kept(step)
        if progress is not None:
            progress.update(run)


def _save(checkpoint, simulation, step, recorder, rngs, calculator) -> None:
    """Save i-PI's positions and momenta (atomic units, to the last digit) and
    random generator with the kept frames, the generators and the calculator's
    last results. What else the simulation holds comes from its input again."""
    results = calculator_results(calculator)
    beads = simulation.syslist[0].beads
    states = simulation.prng.state
    arrays = {
        "ipi_q": np.array(beads.q[0]),
        "ipi_p": np.array(beads.p[0]),
        **{f"ipi_prng_{i}": state["state"]["key"] for i, state in enumerate(states)},
        **{f"result_{name}": value for name, value in results.items()},
    }
    meta = {
        "results": list(results),
        "ipi_prng": [
            {**state, "state": {"pos": state["state"]["pos"]}} for state in states
        ],
    }
    checkpoint.write(step, recorder, rngs, meta, arrays)


def _restore(simulation, meta: dict, arrays: dict) -> int:
    """Put the state :py:func:`_save` saved into a new simulation; its step."""
    beads = simulation.syslist[0].beads
    beads.q[0], beads.p[0] = arrays["ipi_q"], arrays["ipi_p"]
    simulation.prng.state = [
        {**state, "state": {"key": arrays[f"ipi_prng_{i}"], **state["state"]}}
        for i, state in enumerate(meta["ipi_prng"])
    ]
    return meta["steps"]


class _Replay(Calculator):
    """``calculator``, whose first call returns ``results`` instead."""

    implemented_properties = ("energy", "forces", "stress")

    def __init__(self, calculator: Calculator, results: dict):
        super().__init__()
        self.calculator = calculator
        self.replay = results

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        super().calculate(atoms, properties, system_changes)
        if self.replay is not None:
            self.results, self.replay = dict(self.replay), None
        else:
            self.results = {
                name: self.calculator.get_property(name, atoms) for name in properties
            }


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
    xml = simulation_xml(
        structure,
        forcefield,
        motion,
        # i-PI's 'ase' unit of temperature is the kelvin (kB times ASE's energy)
        temperature=settings.temperature_K,
        output="<output prefix='ipi'></output>",
    )
    # i-PI's random numbers (thermostat noise) from the run's seed
    opening = xml.index(">", xml.index("<simulation")) + 1
    return xml[:opening] + f"<prng><seed> {seed} </seed></prng>" + xml[opening:]
