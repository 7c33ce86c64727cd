"""Closed-form retraining of a checkpoint's readout: the recipe that puts the
targets, the design passes, the solver and the checkpoint writing together."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .._utils import check_output_directory
from ..grid import O3Grid
from ..models import LoadedModel, load_model
from ..pet import trainable_pet
from .data import read_dataset
from .evaluation import Evaluation
from .passes import design_pass
from .result import RetrainResult, checkpoint_name, write_checkpoints
from .solve import NormalEquations, solve_all
from .targets import ForceTerm, Target, all_terms, loss_weights, setup_targets


DEFAULT_N_ROTATIONS = 16
"""random rotated copies of each structure (with their inversions) by default"""

DEFAULT_GAMMAS = (0.0, 0.1, 1.0, 10.0, 100.0)
"""penalty weights of a retraining sweep by default"""


def retrain_last_layer(
    checkpoint: str | os.PathLike,
    train,
    validation=None,
    gammas: Sequence[float] = DEFAULT_GAMMAS,
    targets: Sequence[str] | None = None,
    grid: O3Grid | None = None,
    n_rotations: int = DEFAULT_N_ROTATIONS,
    seed: int = 0,
    ridge: float = 0.0,
    weights: dict[str, float] | None = None,
    label_keys: dict[str, str] | None = None,
    ignore_gradients: bool = False,
    output: str | os.PathLike | None = None,
    force: bool = False,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> RetrainResult:
    """Retrain the readout of a metatrain PET checkpoint in closed form.

    For each ``gamma``, the readout parameters (last-layer weights and biases) of
    each target minimize

    ``L = sum_t w_t (L_mu,t + gamma L_sigma,t) + ridge ||theta||^2``

    exactly, the backbone staying frozen; see :doc:`/retraining` for the precise
    definitions.

    :param checkpoint: metatrain PET checkpoint (``.ckpt``)
    :param train: training structures: a file ASE can read, or ``ase.Atoms`` with
        reference labels in ``info``/``arrays`` or in a calculator
    :param validation: validation structures (same formats), optional
    :param gammas: values of the equivariance weight ``gamma >= 0``
    :param targets: targets to retrain (default: every energy, non-conservative force
        and non-conservative stress target of the model); an energy trained with
        conservative forces brings its forces along
    :param grid: rotations on which ``L_sigma`` is estimated (default:
        ``O3Grid.random(n_rotations, seed)``)
    :param n_rotations: number of random rotations when ``grid`` is not given
    :param seed: seed of the random rotations
    :param ridge: coefficient of the ridge term (in loss units)
    :param weights: per-term loss weights ``w_t`` keyed by target, or by
        ``"<target>/forces"`` for the conservative forces of an energy (default:
        the ``weight`` of each target, and of its ``gradients: positions``, in the
        checkpoint's ``loss`` training options, or 1)
    :param label_keys: per-term name of the label in the ASE structures
        (defaults: ``energy``, ``forces`` for non-conservative and conservative
        forces, ``stress``)
    :param ignore_gradients: retrain an energy target that was trained with its
        gradients on energies alone. Without it, an energy trained with forces
        (position gradients) is retrained on energies and forces, and one trained
        with stress (strain gradients) is refused
    :param output: directory for ``gamma-<value>.ckpt``, ``pareto.csv``,
        ``pareto.md`` and ``pareto.png``; written atomically
    :param force: replace a non-empty ``output`` directory
    :param batch_size: rotated copies per model call
    :param device: run the model on this device (default: CPU). Whatever the
        device, the normal equations are accumulated and solved in float64 on CPU,
        the solutions are CPU tensors and the checkpoints are written from CPU
    :param progress: show progress bars
    :return: the solutions and their errors
    """
    gammas = _check_gammas(gammas)
    ridge = _check_ridge(ridge)
    if output is not None:
        output = check_output_directory(output, force)
    model, pet, original = _load_checkpoint(Path(checkpoint), device)
    targets = setup_targets(
        model, targets, weights, label_keys, ignore_gradients, *loss_weights(original)
    )
    grid = _check_grid(grid, n_rotations, seed)
    train_data, validation_data = _read_datasets(train, validation, all_terms(targets))
    passes = _DesignPasses(model, grid, targets, batch_size, progress)
    result = passes.solve(*train_data, gammas, ridge)
    if validation_data is not None:
        passes.record_validation(result, *validation_data)
    if output is not None:
        _write_cpu_checkpoints(result, targets, model, pet, original, output)
    return result


def _load_checkpoint(
    path: Path, device: str | torch.device | None
) -> tuple[LoadedModel, torch.nn.Module, dict]:
    """The checkpoint at ``path`` as a model on ``device``, its trainable PET, and
    the checkpoint itself as saved (on CPU)."""
    model = load_model(path, device=device)
    pet = trainable_pet(model.module, model.source)
    original = torch.load(path, weights_only=False, map_location="cpu")
    return model, pet, original


def _read_datasets(
    train, validation, terms: list[Target | ForceTerm]
) -> tuple[tuple[list, dict], tuple[list, dict] | None]:
    """The training structures with the labels of every term, and the validation
    ones (``None`` without ``validation``), each as ``(frames, labels by term)``."""
    train_data = read_dataset(train, terms, "training")
    if validation is None:
        return train_data, None
    return train_data, read_dataset(validation, terms, "validation")


@dataclass
class _DesignPasses:
    """Streaming passes of ``model`` over structures and their copies rotated by
    ``grid``, handing the designs of every term of ``targets`` to accumulators."""

    model: LoadedModel
    grid: O3Grid
    targets: list[Target]
    batch_size: int | None
    progress: bool

    def solve(
        self, frames: list, labels: dict, gammas: list[float], ridge: float
    ) -> RetrainResult:
        """One pass over the training structures: the normal equations of every
        term, solved at every gamma."""
        equations = {
            t.name: NormalEquations(t, labels[t.name], self.grid)
            for t in all_terms(self.targets)
        }
        self._run(frames, equations)
        return solve_all(self.targets, equations, gammas, ridge, self.grid)

    def record_validation(
        self, result: RetrainResult, frames: list, labels: dict
    ) -> None:
        """One pass over the validation structures, for every gamma at once: the
        errors of every term at the solutions of ``result``, recorded in it."""
        evaluations = {
            t.name: Evaluation(
                t, labels[t.name], result.parameters[t.target_name], self.grid
            )
            for t in all_terms(self.targets)
        }
        self._run(frames, evaluations)
        for name, evaluation in evaluations.items():
            evaluation.record(result, name)

    def _run(self, frames: list, accumulators: dict) -> None:
        design_pass(
            self.model,
            self.grid,
            self.targets,
            frames,
            accumulators,
            self.batch_size,
            self.progress,
        )


def _write_cpu_checkpoints(
    result: RetrainResult,
    targets: list[Target],
    model: LoadedModel,
    pet: torch.nn.Module,
    original: dict,
    output: Path,
) -> None:
    """Write the checkpoints and Pareto files of ``result`` into ``output``, with
    the model moved to CPU."""
    # checkpoints written from CPU load on any machine, as metatrain's own do
    model.to(device="cpu")
    write_checkpoints(result, targets, pet, original, output)


def _check_ridge(ridge) -> float:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)):
        raise TypeError(f"ridge must be a number, got {ridge!r}")
    ridge = float(ridge)
    if not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
    return ridge


def _check_grid(grid: O3Grid | None, n_rotations: int, seed: int) -> O3Grid:
    if grid is None:
        grid = O3Grid.random(n_rotations, seed=seed)
    if not isinstance(grid, O3Grid):
        raise TypeError(f"grid must be an O3Grid, got {type(grid).__name__}")
    if len(grid) < 2:
        raise ValueError("the grid needs at least two rotations to estimate L_sigma")
    return grid


def _check_gammas(gammas) -> list[float]:
    if isinstance(gammas, (int, float)):
        gammas = [gammas]
    values = []
    for gamma in gammas:
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
            raise TypeError(f"gamma must be a number, got {gamma!r}")
        if not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
        values.append(float(gamma))
    if len(values) == 0:
        raise ValueError("no gamma given: pass at least one value")
    if len({checkpoint_name(g) for g in values}) != len(values):
        raise ValueError(f"gamma values are repeated: {values}")
    return values
