"""Closed-form retraining of a checkpoint's readout: the recipe that puts the
targets, the design passes, the solver and the checkpoint writing together."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .._utils import check_output_directory
from ..grid import O3Grid
from ..models import load_model
from ..pet import trainable_pet
from .data import read_dataset
from .evaluation import Evaluation
from .passes import design_pass
from .result import RetrainResult, checkpoint_name, write_checkpoints
from .solve import NormalEquations, solve_all
from .targets import all_terms, loss_weights, setup_targets


DEFAULT_N_ROTATIONS = 16


def retrain_last_layer(
    checkpoint: str | os.PathLike,
    train,
    validation=None,
    gammas: Sequence[float] = (0.0, 0.1, 1.0, 10.0, 100.0),
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
    model = load_model(Path(checkpoint), device=device)
    pet = trainable_pet(model.module, model.source)
    original = torch.load(Path(checkpoint), weights_only=False, map_location="cpu")
    targets = setup_targets(
        model,
        targets,
        weights,
        label_keys,
        ignore_gradients,
        *loss_weights(original),
    )
    terms = all_terms(targets)
    grid = _check_grid(grid, n_rotations, seed)
    train_frames, train_labels = read_dataset(train, terms, "training")
    if validation is not None:
        validation_frames, validation_labels = read_dataset(
            validation, terms, "validation"
        )

    # one pass over the training structures: the normal equations of every term
    equations = {t.name: NormalEquations(t, train_labels[t.name], grid) for t in terms}
    design_pass(model, grid, targets, train_frames, equations, batch_size, progress)
    result = solve_all(targets, equations, gammas, ridge, grid)

    # one pass over the validation structures, for every gamma at once
    if validation is not None:
        evaluations = {
            t.name: Evaluation(
                t, validation_labels[t.name], result.parameters[t.target_name], grid
            )
            for t in terms
        }
        design_pass(
            model, grid, targets, validation_frames, evaluations, batch_size, progress
        )
        for name, evaluation in evaluations.items():
            evaluation.record(result, name)

    if output is not None:
        # checkpoints written from CPU load on any machine, as metatrain's own do
        model.to(device="cpu")
        write_checkpoints(result, targets, pet, original, output)
    return result


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
