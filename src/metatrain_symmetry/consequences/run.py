"""Run every experiment with every variant on the same initial conditions, task by
task, spread over processes and resumable."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from ase import Atoms

from .._utils import name_list
from ..calculators import (
    DEFAULT_AVERAGE_DEGREE,
    AveragedCalculator,
    RandomRotationCalculator,
    energy_model,
    model_calculator,
)
from ..data import check_close_atoms, read_structures
from ..diagnostics import run_context
from ..distributed import run_resumable
from ..grid import O3Grid
from ..identity import dataset_identity, model_identity
from .ipi import check_ipi, run_dynamics_ipi
from .molecules import molecule_nve_summary, orientations_summary
from .observables import observables_summary
from .result import ConsequencesResult, assemble
from .simulation import (
    Settings,
    Trajectory,
    TrajectoryCheckpoint,
    relax,
    run_dynamics,
)


__all__ = ["ENGINES", "EXPERIMENTS", "VARIANTS", "consequences"]


EXPERIMENTS = ("molecule-nve", "orientations", "observables", "relax")
"""the experiments, in the order they run and are reported"""
VARIANTS = ("plain", "average", "random_rotation")
"""the model as it is, its O(3) average, and a random O(3) frame at every call"""
# what integrates the molecular dynamics, by engine (relaxations use ASE's FIRE)
_DYNAMICS = {"ase": run_dynamics, "ipi": run_dynamics_ipi}
ENGINES = tuple(_DYNAMICS)
"""simulation engines of the molecular dynamics (relaxations use ASE's FIRE)"""

_MOLECULAR = ("molecule-nve", "orientations")


@dataclass(frozen=True)
class Task:
    """One trajectory or relaxation: an experiment, a variant, a structure."""

    experiment: str
    variant: str
    structure: int


def consequences(
    model,
    structures: Sequence[Atoms] | str | os.PathLike,
    experiments: Sequence[str] | None = None,
    settings: Settings | None = None,
    grid: O3Grid | None = None,
    observables_structure: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    progress: bool = False,
    distributed: bool = False,
    work_dir: str | os.PathLike | None = None,
    allow_close_atoms: bool = False,
    engine: str = "ase",
) -> ConsequencesResult | None:
    """What a model's symmetry breaking does to simulations, and what removing it
    costs: every experiment run with the model (``plain``), its O(3) average on
    ``grid`` (``average``) and a random O(3) frame at every call
    (``random_rotation``), on the same initial conditions and random seeds.

    :param model: anything :py:func:`~metatrain_symmetry.load_model` accepts, with
        an ``energy`` output
    :param structures: ``ase.Atoms``, or a file ASE reads
    :param experiments: among :py:data:`EXPERIMENTS`; by default every one that
        applies to the structures (``molecule-nve`` and ``orientations`` to the
        non-periodic ones, ``observables`` to one periodic structure, ``relax`` to
        all)
    :param settings: steps, time step, temperature, seed, ... (default:
        :py:class:`Settings`)
    :param grid: quadrature of the ``average`` variant (default:
        ``O3Grid(DEFAULT_AVERAGE_DEGREE)``)
    :param observables_structure: index of the periodic structure of
        ``observables`` (default: the first periodic one)
    :param batch_size: rotated copies per model call of the ``average`` variant
    :param device: device the model runs on
    :param progress: progress bars counting steps (on rank 0 only)
    :param distributed: spread the tasks over the processes of torch's default
        process group; every rank calls this function with the same arguments
    :param work_dir: keep every completed task there, and reuse those a previous,
        interrupted run with the same model, structures and settings saved
    :param allow_close_atoms: warn, instead of raising, on overlapping atoms
    :param engine: what integrates the molecular dynamics, among
        :py:data:`ENGINES`: ASE, or i-PI (the ``ipi`` package) from the same
        initial state
    :return: the result; ``None`` on ranks other than 0 when ``distributed``
    """
    settings = Settings() if settings is None else settings
    settings.check()
    _check_engine(engine)
    context = run_context(distributed)
    loaded = energy_model(model, device)
    frames, path = _read(structures, allow_close_atoms)
    selected = select_structures(frames, experiments, observables_structure)
    grid = O3Grid(DEFAULT_AVERAGE_DEGREE) if grid is None else grid
    tasks, costs = _tasks_and_costs(selected, frames, grid)
    identity = {
        "engine": engine,
        "model": model_identity(loaded, loaded.source),
        "structures": dataset_identity(frames, path),
        "settings": settings.as_dict(),
        "grid": {"size": len(grid), "description": repr(grid)},
        "selected": {key: list(value) for key, value in selected.items()},
    }
    runner = _TaskRunner(
        loaded, frames, grid, batch_size, settings, device, engine, work_dir
    )
    parts = run_resumable(
        costs,
        partial(runner.run, tasks=tasks, progress=progress and context.is_main),
        context,
        work_dir,
        None if work_dir is None else {"command": "consequences", **identity},
        result_types=(Task, Trajectory),
    )
    if parts is None:
        return None
    records = {task: record for part in parts for task, record in part}
    return assemble(records, selected, identity, frames, grid)


def _tasks_and_costs(
    selected: dict[str, list[int]], frames: Sequence[Atoms], grid: O3Grid
) -> tuple[list[Task], list[int]]:
    """Every variant of every selected experiment and structure, and its cost in
    atom evaluations per step (the average's grid copies)."""
    tasks = [
        Task(experiment, variant, index)
        for experiment, indices in selected.items()
        for index in indices
        for variant in VARIANTS
    ]
    costs = [
        len(frames[task.structure]) * (len(grid) if task.variant == "average" else 1)
        for task in tasks
    ]
    return tasks, costs


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(
            f"unknown engine '{engine}': choose among {', '.join(ENGINES)}"
        )
    if engine == "ipi":
        check_ipi()


def _read(structures, allow_close_atoms: bool) -> tuple[list[Atoms], str | None]:
    if isinstance(structures, (str, os.PathLike)):
        frames = read_structures(structures, allow_close_atoms=allow_close_atoms)
        return frames, str(structures)
    frames = list(structures)
    if len(frames) == 0:
        raise ValueError("no structures given: pass at least one structure")
    check_close_atoms(frames, allow_close_atoms)
    return frames, None


def _is_periodic(atoms: Atoms) -> bool:
    return bool(np.all(atoms.pbc))


def select_structures(
    frames: Sequence[Atoms],
    experiments: Sequence[str] | None,
    observables_structure: int | None = None,
) -> dict[str, list[int]]:
    """The structures each experiment runs on, checked before any work.

    :raise ValueError: an unknown experiment, a periodic structure given to a
        molecular experiment, no periodic structure for ``observables``, ...
    """
    requested = experiments is not None
    if requested:
        experiments = name_list(
            experiments, "give at least one experiment", "an experiment is repeated"
        )
        unknown = [name for name in experiments if name not in EXPERIMENTS]
        if unknown:
            raise ValueError(
                f"unknown experiment '{unknown[0]}': choose among "
                f"{', '.join(EXPERIMENTS)}"
            )
    periodic = [i for i, atoms in enumerate(frames) if _is_periodic(atoms)]
    partial_pbc = [
        i for i, atoms in enumerate(frames) if np.any(atoms.pbc) and i not in periodic
    ]
    isolated = [i for i in range(len(frames)) if i not in periodic + partial_pbc]
    molecules = [i for i in isolated if len(frames[i]) > 1]
    selected: dict[str, list[int]] = {}
    for experiment in EXPERIMENTS if not requested else experiments:
        if experiment in _MOLECULAR:
            if requested:
                _check_molecules(frames, experiment, periodic + partial_pbc)
            indices = molecules
        elif experiment == "observables":
            indices = _observables_structure(frames, periodic, observables_structure)
            if requested and not indices:
                raise ValueError(
                    "observables needs a periodic structure (pbc in all three "
                    "directions), and none was given"
                )
        else:
            indices = list(range(len(frames)))
        if indices:
            selected[experiment] = indices
    if requested and len(selected) != len(experiments):
        missing = [name for name in experiments if name not in selected][0]
        raise ValueError(f"no structure applies to experiment '{missing}'")
    return {name: selected[name] for name in EXPERIMENTS if name in selected}


def _check_molecules(frames, experiment: str, periodic: list[int]) -> None:
    if periodic:
        raise ValueError(
            f"structure {periodic[0]} is periodic, but {experiment} simulates "
            "isolated molecules: give non-periodic structures, or leave "
            f"{experiment} out"
        )
    for index, atoms in enumerate(frames):
        if len(atoms) < 2:
            raise ValueError(
                f"structure {index} is a single atom, which has no orientation "
                f"or rotation: leave it out of {experiment}"
            )


def _observables_structure(frames, periodic: list[int], index: int | None) -> list:
    if index is None:
        return periodic[:1]
    if not 0 <= index < len(frames):
        raise ValueError(
            f"observables structure {index} does not exist: the file has "
            f"{len(frames)} structures"
        )
    if index not in periodic:
        raise ValueError(
            f"structure {index} is not periodic, but observables simulates bulk: "
            "choose a periodic structure"
        )
    return [index]


class _TaskRunner:
    """Runs tasks with calculators made once per process."""

    def __init__(
        self,
        model,
        frames,
        grid,
        batch_size,
        settings: Settings,
        device,
        engine,
        work_dir,
    ):
        self.frames = frames
        self.settings = settings
        self.dynamics = _DYNAMICS[engine]
        self.checkpoints = None
        """where running trajectories save their state (none: nowhere)"""
        if work_dir is not None:
            self.checkpoints = Path(work_dir) / "trajectories"
        self.plain = model_calculator(model, device)
        self.average = AveragedCalculator(model, grid, batch_size, device)
        self._warm: set[tuple[bool, int]] = set()

    def calculator(self, task: Task):
        if task.variant == "plain":
            calculator = self.plain
        elif task.variant == "average":
            calculator = self.average
        else:
            calculator = RandomRotationCalculator(self.plain, self._seed(task, 1))
        calculator.reset()
        return calculator

    def _seed(self, task: Task, stream: int) -> int:
        """The same seed for every variant of a task (velocities, thermostat),
        or one stream of random frames per task."""
        key = [self.settings.seed, EXPERIMENTS.index(task.experiment), task.structure]
        return int(np.random.SeedSequence(key + [stream]).generate_state(1)[0])

    def run(
        self, mine: dict[int, list[int]], tasks: list[Task], progress: bool
    ) -> Iterator[tuple[int, list]]:
        """``(shard, [(task, record), ...])`` as each shard completes."""
        for shard, indices in mine.items():
            yield (
                shard,
                [(tasks[i], self.run_task(tasks[i], progress)) for i in indices],
            )

    def run_task(self, task: Task, progress: bool) -> dict:
        atoms = self.frames[task.structure]
        self._warm_up(task, atoms)
        calculator = self.calculator(task)
        settings = self.settings
        with _progress(task, settings.steps, progress) as bar:
            if task.experiment == "relax":
                return relax(atoms, calculator, settings, bar)
            ensemble = "nve" if task.experiment == "molecule-nve" else "nvt"
            checkpoint = self._checkpoint(task)
            trajectory = self.dynamics(
                atoms,
                calculator,
                settings,
                ensemble,
                self._seed(task, 0),
                bar,
                checkpoint,
            )
            if checkpoint is not None:
                checkpoint.remove()
        if task.experiment == "molecule-nve":
            summary = molecule_nve_summary(trajectory, settings.temperature_K)
            if task.variant == "plain":
                summary["energy_plain_minus_average_eV"] = self._breaking(trajectory)
        elif task.experiment == "orientations":
            summary = orientations_summary(trajectory, settings.temperature_K)
        else:
            summary = observables_summary(trajectory, settings.blocks)
        return {
            "summary": summary,
            "trajectory": trajectory,
            "seconds_per_step": trajectory.seconds_per_step,
        }

    def _checkpoint(self, task: Task) -> TrajectoryCheckpoint | None:
        """Where the trajectory of ``task`` saves its running state, if anywhere."""
        if self.checkpoints is None:
            return None
        name = f"{task.experiment}-{task.variant}-{task.structure}.npz"
        checkpoint = TrajectoryCheckpoint(self.checkpoints / name)
        if checkpoint.path.exists():
            print(
                f"continuing {task.experiment} {task.variant} #{task.structure} "
                f"from its state saved in {checkpoint.path}",
                file=sys.stderr,
            )
        return checkpoint

    def _warm_up(self, task: Task, atoms: Atoms) -> None:
        """One untimed call per calculator and structure, so that the cost per
        step leaves out TorchScript's first compilations."""
        key = (task.variant == "average", task.structure)
        if key in self._warm:
            return
        self._warm.add(key)
        warm = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        warm.calc = self.average if task.variant == "average" else self.plain
        warm.get_forces()

    def _breaking(self, trajectory) -> list[float]:
        """``E_plain - E_average`` on the kept frames of a plain trajectory."""
        differences = []
        for frame in range(len(trajectory.time_ps)):
            atoms = trajectory.atoms(frame)
            atoms.calc = self.average
            average = atoms.get_potential_energy()
            differences.append(float(trajectory.potential_energy[frame] - average))
        return differences


class _progress:
    """A tqdm bar over the steps of a task (ETA included), or nothing."""

    def __init__(self, task: Task, steps: int, enabled: bool):
        self.enabled = enabled
        self.description = f"{task.experiment} {task.variant} #{task.structure}"
        self.steps = steps

    def __enter__(self):
        if not self.enabled:
            return None
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.steps, unit="step", desc=self.description)
        return self.bar

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.close()
