"""An independent implementation of the retraining objective, by ordinary
forward passes and automatic differentiation."""

from __future__ import annotations

from collections.abc import Sequence

import ase
import torch
from metatomic.torch import (
    ModelOutput,
    System,
    systems_to_torch,
    unit_conversion_factor,
)

from ..grid import O3Grid
from ..models import LoadedModel, load_model
from ..pet import trainable_pet
from ..systems import prepare_systems
from .data import StructureInfo, read_dataset, structure_infos
from .designs import back_rotate
from .solve import unbiased_factor
from .targets import ForceTerm, Target, all_terms, setup_targets


def retraining_objective(
    model,
    train,
    gamma: float,
    grid: O3Grid,
    targets: Sequence[str] | None = None,
    ridge: float = 0.0,
    weights: dict[str, float] | None = None,
    label_keys: dict[str, str] | None = None,
    ignore_gradients: bool = False,
    batch_size: int = 64,
) -> torch.Tensor:
    """The retraining objective evaluated by ordinary forward passes of ``model``.

    This is an independent implementation of the objective that
    :py:func:`retrain_last_layer` minimizes: it rotates the structures, calls the
    model and back-transforms its outputs, with autograd enabled, so that its
    gradient with respect to the readout parameters can be taken (gradient-based
    retraining, optimality checks). The conservative forces of an energy trained
    with position gradients are computed by automatic differentiation of the
    energy through the positions (and neighbour lists), keeping the graph.

    :param model: a metatrain PET (in memory) or a path to its checkpoint
    :param train: training structures with labels (see :py:func:`retrain_last_layer`)
    :param gamma: weight of ``L_sigma``
    :param grid: the rotations on which ``L_sigma`` is estimated
    :param targets: targets in the objective (default as in
        :py:func:`retrain_last_layer`)
    :param ridge: coefficient of the ridge term
    :param weights: per-term weights (default 1), keyed by target or
        ``"<target>/forces"``
    :param label_keys: per-term label names (forces: ``forces`` by default)
    :param ignore_gradients: leave the forces of energies trained with them out
    :param batch_size: structures per model call
    :return: scalar float64 tensor
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    pet = trainable_pet(loaded.module, loaded.source)
    specs = setup_targets(loaded, targets, weights, label_keys, ignore_gradients)
    force_terms = [t.forces for t in specs if t.forces is not None]
    frames, labels = read_dataset(train, all_terms(specs), "training")
    factor = unbiased_factor(grid)
    rotations = torch.cat([torch.eye(3, dtype=torch.float64)[None], grid.rotations])

    copies, positions = _rotated_copies(frames, rotations, loaded, len(force_terms) > 0)
    systems = prepare_systems(copies, loaded)
    infos = structure_infos(loaded, prepare_systems(frames, loaded), specs)
    predictions = _term_predictions(
        pet, systems, positions, specs, force_terms, batch_size
    )

    total = torch.zeros((), dtype=torch.float64)
    for t in all_terms(specs):
        squared_error, variance, count = _term_errors(
            t, predictions[t.name], labels[t.name], infos, grid, factor
        )
        total = total + t.weight * (squared_error + gamma * variance) / count
        if ridge != 0 and isinstance(t, Target):
            total = total + ridge * t.reduce(t.readout.theta()).square().sum()
    return total


def _rotated_copies(
    frames: list[ase.Atoms],
    rotations: torch.Tensor,
    loaded: LoadedModel,
    with_positions: bool,
) -> tuple[list[ase.Atoms | System], list[torch.Tensor]]:
    """The copies of every structure rotated by each of ``rotations``, structure
    by structure.

    :param rotations: ``(n_copies, 3, 3)``
    :param with_positions: make every copy a ``System`` whose positions require
        gradients, for conservative forces
    :return: the ``ase.Atoms`` (or ``System``) copies and, with ``with_positions``,
        the ``(n_atoms, 3)`` positions of each copy, in the model's length unit
    """
    copies, positions = [], []
    for frame in frames:
        for rotation in rotations.numpy():
            rotated = frame.copy()
            rotated.calc = None
            rotated.set_cell(frame.cell.array @ rotation.T, scale_atoms=False)
            rotated.positions = frame.positions @ rotation.T
            if not with_positions:
                copies.append(rotated)
                continue
            system, leaf = _with_position_leaf(rotated, loaded)
            copies.append(system)
            positions.append(leaf)
    return copies, positions


def _with_position_leaf(
    atoms: ase.Atoms, loaded: LoadedModel
) -> tuple[System, torch.Tensor]:
    """``atoms`` as a system in the model's length unit (as prepare_systems makes
    it for ``ase.Atoms``), and its ``(n_atoms, 3)`` positions, a leaf requiring
    gradients."""
    # positions requiring gradients before the neighbour lists are computed,
    # so that the lists carry them too
    length_factor = unit_conversion_factor("angstrom", loaded.length_unit)
    system = systems_to_torch(atoms, dtype=loaded.dtype)
    leaf = (system.positions * length_factor).detach().requires_grad_(True)
    system = System(
        types=system.types,
        positions=leaf,
        cell=system.cell * length_factor,
        pbc=system.pbc,
    )
    return system, leaf


def _term_predictions(
    pet: torch.nn.Module,
    systems: list[System],
    positions: list[torch.Tensor],
    specs: list[Target],
    force_terms: list[ForceTerm],
    batch_size: int,
) -> dict[str, list[torch.Tensor]]:
    """The float64 predictions of every term on every system, in their order,
    keeping the graph: ``(n_samples, *components, n_properties)`` per system,
    conservative forces ``(n_atoms, 3, 1)``."""
    requests = {
        t.name: ModelOutput(sample_kind="system" if t.per_structure else "atom")
        for t in specs
    }
    predictions: dict[str, list[torch.Tensor]] = {t.name: [] for t in specs}
    for term in force_terms:
        predictions[term.name] = []
    for start in range(0, len(systems), batch_size):
        batch = systems[start : start + batch_size]
        outputs = pet(batch, requests, None)
        for term in force_terms:
            energy = outputs[term.target.name].block().values.sum()
            gradients = torch.autograd.grad(
                energy, positions[start : start + batch_size], create_graph=True
            )
            for gradient in gradients:
                predictions[term.name].append(-gradient.to(torch.float64)[..., None])
        for t in specs:
            block = outputs[t.name].block()
            system_index = block.samples.column("system")
            for local in range(len(batch)):
                predictions[t.name].append(
                    block.values[system_index == local].to(torch.float64)
                )
    return predictions


def _term_errors(
    term: Target | ForceTerm,
    predictions: list[torch.Tensor],
    labels: list[torch.Tensor],
    infos: list[StructureInfo],
    grid: O3Grid,
    factor: float,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The squared error of one term on the unrotated structures and its
    equivariance error on the grid's copies, in loss units, summed over entries.

    :param predictions: per structure, the unrotated copy then the ``len(grid)``
        rotated ones
    :param labels: per structure, the reference values
    :param factor: the factor that makes the grid's weighted spread unbiased
    :return: the two sums (scalar tensors) and the number of entries of the
        squared error
    """
    squared_error = torch.zeros((), dtype=torch.float64)
    variance = torch.zeros((), dtype=torch.float64)
    count = 0
    n_copies = len(grid.rotations) + 1
    for index in range(len(labels)):
        values = torch.stack(predictions[index * n_copies : (index + 1) * n_copies])
        scale = term.loss_scale(infos[index], values.shape[1:])
        residual = (values[0] - labels[index]) / scale
        squared_error = squared_error + residual.square().sum()
        count += residual.numel()
        back = back_rotate(values[1:], term.rank, grid.rotations) / scale
        mean = torch.einsum("c,c...->...", grid.weights, back)
        spread = torch.einsum("c,c...->...", grid.weights, (back - mean).square())
        variance = variance + factor * spread.sum()
    return squared_error, variance, count
