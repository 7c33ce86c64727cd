"""Molecular dynamics and relaxations of one structure with one calculator, with
ASE's integrators, thermostat and optimizer, recorded frame by frame."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.constraints import FixCom
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta
from ase.md.verlet import VelocityVerlet
from ase.optimize import FIRE

from .._utils import is_integer


__all__ = [
    "CHECKPOINT_SECONDS",
    "FrameRecorder",
    "Settings",
    "StepTimer",
    "Trajectory",
    "TrajectoryCheckpoint",
    "calculator_results",
    "initial_state",
    "relax",
    "run_dynamics",
    "saved_results",
]


@dataclass(frozen=True)
class Settings:
    """What every experiment and variant shares: the same initial conditions,
    thermostat and random seeds."""

    steps: int = 2000
    """molecular-dynamics steps of a trajectory, or largest number of optimizer
    steps of a relaxation"""
    time_step_fs: float = 0.5
    """integration time step, in fs"""
    temperature_K: float = 300.0
    """temperature of the initial velocities and of the thermostat, in K"""
    seed: int = 0
    """seed of initial velocities, thermostat noise and random rotations"""
    friction_per_fs: float = 0.01
    """friction of the Langevin thermostat, in 1/fs"""
    fmax: float = 0.01
    """force threshold of the relaxations, in eV/Å"""
    frames: int = 200
    """frames kept per trajectory (evenly spaced, the first included)"""
    blocks: int = 5
    """blocks of a trajectory for block-averaged standard errors"""

    def check(self, names: dict[str, str] | None = None) -> None:
        """Refuse settings that cannot run, with one-line errors.

        :param names: how the errors call each field (e.g. ``"--time-step"`` for
            ``time_step_fs``); by default the field's name
        """
        names = names or {}
        for field in ("steps", "frames", "blocks"):
            value = getattr(self, field)
            if not is_integer(value) or value < 1:
                raise ValueError(
                    f"{names.get(field, field)} must be a positive integer, "
                    f"got {value!r}"
                )
        for field in ("time_step_fs", "temperature_K", "friction_per_fs", "fmax"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(
                    f"{names.get(field, field)} must be a positive number, "
                    f"got {value!r}"
                )
        if not is_integer(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.blocks < 2:
            raise ValueError(
                f"{names.get('blocks', 'blocks')} must be at least 2 for standard "
                f"errors, got {self.blocks}"
            )

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def save_every(self) -> int:
        """steps between kept frames"""
        return max(1, self.steps // self.frames)


@dataclass
class Trajectory:
    """The kept frames of one trajectory, in ASE units (Å, eV, amu)."""

    time_ps: np.ndarray
    """``(n_frames,)``"""
    positions: np.ndarray
    """``(n_frames, n_atoms, 3)``, unwrapped"""
    momenta: np.ndarray
    """``(n_frames, n_atoms, 3)``, amu Å / ASE time"""
    forces: np.ndarray
    """``(n_frames, n_atoms, 3)``, eV/Å"""
    potential_energy: np.ndarray
    """``(n_frames,)``, eV"""
    kinetic_energy: np.ndarray
    """``(n_frames,)``, eV"""
    masses: np.ndarray
    """``(n_atoms,)``, amu"""
    numbers: np.ndarray
    """``(n_atoms,)`` atomic numbers"""
    cell: np.ndarray
    """``(3, 3)``, Å"""
    pbc: np.ndarray
    """``(3,)``"""
    seconds_per_step: float
    """wall time of one step (one force evaluation and the integrator)"""

    def atoms(self, frame: int) -> Atoms:
        """Frame ``frame`` as ``ase.Atoms`` with its momenta."""
        atoms = Atoms(
            numbers=self.numbers,
            positions=self.positions[frame],
            cell=self.cell,
            pbc=self.pbc,
            masses=self.masses,
        )
        atoms.set_momenta(self.momenta[frame])
        return atoms


def initial_state(atoms: Atoms, settings: Settings, rng: np.random.Generator) -> Atoms:
    """A copy of ``atoms`` with the initial momenta every variant and engine
    shares: Maxwell-Boltzmann at the settings' temperature drawn from ``rng``,
    without total momentum and, for a molecule, without angular momentum."""
    atoms = Atoms(
        numbers=atoms.numbers,
        positions=atoms.positions,
        cell=atoms.cell,
        pbc=atoms.pbc,
        masses=atoms.get_masses(),
    )
    thermalize_momenta(atoms, settings.temperature_K, rng=rng)
    Stationary(atoms)
    if not atoms.pbc.any() and len(atoms) > 1:
        ZeroRotation(atoms)
    return atoms


class FrameRecorder:
    """The kept frames of a trajectory, recorded one at a time (ASE units)."""

    def __init__(self, atoms: Atoms):
        self.atoms = atoms
        self.masses = atoms.get_masses()
        self.frames: dict[str, list] = {key: [] for key in "txpfuk"}

    def record(self, time_ps, positions, momenta, forces, energy) -> None:
        """Keep one frame: its time (ps), positions (Å), momenta, forces (eV/Å)
        and potential energy (eV)."""
        kinetic = 0.5 * float((momenta**2 / self.masses[:, None]).sum())
        for key, value in zip(
            "txpfuk",
            (time_ps, positions, momenta, forces, energy, kinetic),
            strict=True,
        ):
            self.frames[key].append(value)

    def trajectory(self, seconds_per_step: float) -> Trajectory:
        frames, atoms = self.frames, self.atoms
        return Trajectory(
            time_ps=np.array(frames["t"]),
            positions=np.array(frames["x"]),
            momenta=np.array(frames["p"]),
            forces=np.array(frames["f"]),
            potential_energy=np.array(frames["u"]),
            kinetic_energy=np.array(frames["k"]),
            masses=self.masses,
            numbers=atoms.numbers.copy(),
            cell=atoms.cell.array.copy(),
            pbc=atoms.pbc.copy(),
            seconds_per_step=seconds_per_step,
        )


class StepTimer:
    """The wall time per step of a run: the median over the intervals between
    marked steps, so that a model's first, slower calls (TorchScript's warm-up)
    and rare pauses (a saved state) do not count as the cost of a step."""

    def __init__(self):
        self.started = time.perf_counter()
        self.marks: list[tuple[float, int]] = []

    def mark(self, step: int) -> None:
        """Note that the run has reached ``step`` (steps counted from its start)."""
        self.marks.append((time.perf_counter(), step))

    def seconds_per_step(self) -> float:
        """The median over intervals of their seconds per step; for a run of no
        step (a relaxation that starts converged), the time from the timer's
        creation to the last mark, the cost of its one evaluation."""
        rates = [
            (later - earlier) / (last - first)
            for (earlier, first), (later, last) in zip(
                self.marks[:-1], self.marks[1:], strict=True
            )
            if last > first
        ]
        if rates:
            return float(np.median(rates))
        end = self.marks[-1][0] if self.marks else time.perf_counter()
        return end - self.started


# the results of a calculator that a saved state keeps: a calculator that draws
# a random frame at every call would not give them again
_SAVED_RESULTS = ("energy", "forces", "stress")


def calculator_results(calculator: Calculator) -> dict[str, np.ndarray]:
    """The calculator's last energy, forces and stress (those it has)."""
    return {
        name: np.asarray(calculator.results[name])
        for name in _SAVED_RESULTS
        if name in calculator.results
    }


def saved_results(meta: dict, arrays: dict) -> dict:
    """The calculator results of a saved state, as ASE calculators keep them."""
    results = {}
    for name in meta["results"]:
        value = arrays[f"result_{name}"]
        results[name] = float(value) if value.ndim == 0 else value
    return results


CHECKPOINT_SECONDS = 60.0
"""shortest wall time between two saved states of a running trajectory"""

# test-only hook: save at every kept frame and SIGKILL this process once a
# trajectory has saved its state at this many steps (an interruption mid-run)
KILL_AFTER_STEPS_VARIABLE = "MTT_SYMMETRY_TEST_KILL_AFTER_STEPS"


class TrajectoryCheckpoint:
    """The state of a running trajectory in a file, saved at kept frames at most
    every ``every_seconds``, so that a run interrupted and started again
    continues from the last saved step, exactly as if it had not stopped.

    The state is the step count, positions and momenta, the frames kept so far,
    the state of every random number generator (initial velocities and
    thermostat noise, the random frames of a calculator that draws them) and the
    calculator's results at that step (a calculator that draws a random frame at
    every call would not give them again). It is written as ``.npz`` arrays and
    JSON, read without running code, and replaced atomically.

    :param path: the file (``.npz``); its directory is made when first saved
    :param every_seconds: shortest wall time between two saves
    """

    def __init__(
        self, path: str | os.PathLike, every_seconds: float = CHECKPOINT_SECONDS
    ):
        # absolute: i-PI runs in a working directory of its own
        self.path = Path(path).absolute()
        self._kill_after = int(os.environ.get(KILL_AFTER_STEPS_VARIABLE, "0"))
        self.every_seconds = 0.0 if self._kill_after else every_seconds
        self._saved = time.monotonic()

    def due(self) -> bool:
        """Whether ``every_seconds`` have passed since the last save (then the
        clock restarts)."""
        now = time.monotonic()
        if now - self._saved < self.every_seconds:
            return False
        self._saved = now
        return True

    def write(
        self, steps: int, recorder: FrameRecorder, rngs: dict, meta: dict, arrays: dict
    ) -> None:
        """Save the state after ``steps`` steps: the kept frames, the generators'
        states, and an engine's own JSON-ready ``meta`` and numpy ``arrays``."""
        meta = {
            "steps": steps,
            "rngs": {name: rng.bit_generator.state for name, rng in rngs.items()},
            **meta,
        }
        arrays = {
            **arrays,
            **{
                f"frames_{key}": np.array(value)
                for key, value in recorder.frames.items()
            },
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial.npz")
        np.savez(partial, meta=np.array(json.dumps(meta)), **arrays)
        os.replace(partial, self.path)
        if self._kill_after and steps >= self._kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def read(self, recorder: FrameRecorder, rngs: dict) -> tuple[dict, dict] | None:
        """Restore the saved kept frames and generators' states, if any; the
        saved ``meta`` (with ``steps``) and ``arrays`` (``None`` without a file)."""
        if not self.path.exists():
            return None
        with np.load(self.path, allow_pickle=False) as saved:
            meta = json.loads(str(saved["meta"]))
            arrays = {key: saved[key] for key in saved.files if key != "meta"}
        for key in recorder.frames:
            recorder.frames[key] = list(arrays[f"frames_{key}"])
        for name, state in meta["rngs"].items():
            rngs[name].bit_generator.state = state
        return meta, arrays

    def save(self, dynamics, recorder: FrameRecorder, rngs: dict) -> None:
        """Save the state of ASE's ``dynamics`` at the current step, if
        ``every_seconds`` have passed since the last save."""
        if not self.due():
            return
        atoms = dynamics.atoms
        results = calculator_results(atoms.calc)
        arrays = {
            "positions": atoms.get_positions(),
            "momenta": atoms.get_momenta(),
            **{f"result_{name}": value for name, value in results.items()},
        }
        meta = {"results": list(results)}
        self.write(int(dynamics.nsteps), recorder, rngs, meta, arrays)

    def restore(self, dynamics, recorder: FrameRecorder, rngs: dict) -> int:
        """Restore the saved state, if any, into ASE's dynamics, the recorder and
        the generators; the number of steps it had run (0 without a file)."""
        saved = self.read(recorder, rngs)
        if saved is None:
            return 0
        meta, arrays = saved
        atoms = dynamics.atoms
        atoms.set_positions(arrays["positions"])
        atoms.set_momenta(arrays["momenta"])
        # one real call sets the calculator up for these positions; its results
        # are then those of the interrupted run, and the generators' states
        # (restored again) undo any draw it made
        restored = {name: rng.bit_generator.state for name, rng in rngs.items()}
        atoms.calc.get_forces(atoms)
        atoms.calc.results.update(saved_results(meta, arrays))
        for name, state in restored.items():
            rngs[name].bit_generator.state = state
        dynamics.nsteps = meta["steps"]
        return meta["steps"]

    def remove(self) -> None:
        """Remove the file, once the trajectory is complete."""
        self.path.unlink(missing_ok=True)


def run_dynamics(
    atoms: Atoms,
    calculator: Calculator,
    settings: Settings,
    ensemble: str,
    seed: int,
    progress=None,
    checkpoint: TrajectoryCheckpoint | None = None,
) -> Trajectory:
    """Molecular dynamics of ``atoms`` (not modified) with ``calculator`` and
    ASE's integrators, from :py:func:`initial_state` drawn with ``seed``.

    :param ensemble: ``"nve"`` (velocity Verlet) or ``"nvt"`` (Langevin, with the
        centre of mass fixed)
    :param progress: a progress bar advanced by one every step, or ``None``
    :param checkpoint: save the running state there, and continue from the state
        saved there by an interrupted run of the same trajectory
    """
    rng = np.random.default_rng(seed)
    atoms = initial_state(atoms, settings, rng)
    atoms.calc = calculator
    time_step = settings.time_step_fs * units.fs
    if ensemble == "nve":
        dynamics = VelocityVerlet(atoms, timestep=time_step)
    elif ensemble == "nvt":
        # the centre of mass is fixed by a constraint, not by Langevin's own
        # ``fixcm``, which overheats small molecules (a water molecule at 600 K
        # samples about 2,400 K with it)
        atoms.set_constraint(FixCom())
        dynamics = Langevin(
            atoms,
            timestep=time_step,
            temperature_K=settings.temperature_K,
            friction=settings.friction_per_fs / units.fs,
            fixcm=False,
            # the thermostat's noise continues the stream of the velocities
            rng=rng,
        )
    else:
        raise ValueError(f"unknown ensemble '{ensemble}', use 'nve' or 'nvt'")
    recorder = FrameRecorder(atoms)

    def record():
        recorder.record(
            dynamics.get_time() / (1000 * units.fs),
            atoms.get_positions(),
            atoms.get_momenta(),
            # the model's forces, not the ones the constraint projects
            atoms.get_forces(apply_constraint=False),
            atoms.get_potential_energy(),
        )

    dynamics.attach(record, interval=settings.save_every)
    rngs = {"dynamics": rng}
    if isinstance(getattr(calculator, "rng", None), np.random.Generator):
        rngs["calculator"] = calculator.rng
    done = 0
    if checkpoint is not None:
        done = checkpoint.restore(dynamics, recorder, rngs)
        dynamics.attach(checkpoint.save, settings.save_every, dynamics, recorder, rngs)
    if progress is not None:
        progress.update(done)
        dynamics.attach(progress.update, interval=1)
    timer = StepTimer()
    dynamics.attach(lambda: timer.mark(dynamics.nsteps), interval=1)
    dynamics.run(settings.steps - done)
    return recorder.trajectory(timer.seconds_per_step())


def relax(
    atoms: Atoms, calculator: Calculator, settings: Settings, progress=None
) -> dict:
    """Relax the positions of ``atoms`` (not modified; the cell is kept) with
    ASE's FIRE optimizer to ``settings.fmax``, in at most ``settings.steps`` steps.

    :return: ``energy_eV`` (the calculator's energy at the end), ``positions``
        (``(n_atoms, 3)``), ``converged``, ``n_steps`` and ``seconds_per_step``
    """
    atoms = Atoms(
        numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc
    )
    atoms.calc = calculator
    optimizer = FIRE(atoms, logfile=None)
    if progress is not None:
        optimizer.attach(progress.update, interval=1)
    timer = StepTimer()
    optimizer.attach(lambda: timer.mark(optimizer.nsteps), interval=1)
    converged = bool(optimizer.run(fmax=settings.fmax, steps=settings.steps))
    return {
        "energy_eV": float(atoms.get_potential_energy()),
        "positions": atoms.get_positions(),
        "converged": converged,
        "n_steps": int(optimizer.nsteps),
        "seconds_per_step": timer.seconds_per_step(),
    }
