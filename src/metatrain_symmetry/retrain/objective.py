"""An independent implementation of the retraining objective, by ordinary
forward passes and automatic differentiation."""

from __future__ import annotations

from collections.abc import Sequence

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
from .data import read_dataset, structure_infos
from .designs import back_rotate
from .solve import unbiased_factor
from .targets import Target, all_terms, setup_targets


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

    copies, positions = [], []
    for frame in frames:
        for rotation in rotations.numpy():
            rotated = frame.copy()
            rotated.calc = None
            rotated.set_cell(frame.cell.array @ rotation.T, scale_atoms=False)
            rotated.positions = frame.positions @ rotation.T
            if len(force_terms) == 0:
                copies.append(rotated)
                continue
            # positions requiring gradients before the neighbour lists are computed,
            # so that the lists carry them too
            # in the model's length unit, as prepare_systems does for ase.Atoms
            length_factor = unit_conversion_factor("angstrom", loaded.length_unit)
            system = systems_to_torch(rotated, dtype=loaded.dtype)
            leaf = (system.positions * length_factor).detach().requires_grad_(True)
            copies.append(
                System(
                    types=system.types,
                    positions=leaf,
                    cell=system.cell * length_factor,
                    pbc=system.pbc,
                )
            )
            positions.append(leaf)
    systems = prepare_systems(copies, loaded)
    infos = structure_infos(loaded, prepare_systems(frames, loaded), specs)
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

    total = torch.zeros((), dtype=torch.float64)
    n_copies = len(rotations)
    for t in all_terms(specs):
        squared_error = torch.zeros((), dtype=torch.float64)
        variance = torch.zeros((), dtype=torch.float64)
        count = 0
        for index in range(len(frames)):
            values = torch.stack(
                predictions[t.name][index * n_copies : (index + 1) * n_copies]
            )
            scale = t.loss_scale(infos[index], values.shape[1:])
            residual = (values[0] - labels[t.name][index]) / scale
            squared_error = squared_error + residual.square().sum()
            count += residual.numel()
            back = back_rotate(values[1:], t.rank, grid.rotations) / scale
            mean = torch.einsum("c,c...->...", grid.weights, back)
            spread = torch.einsum("c,c...->...", grid.weights, (back - mean).square())
            variance = variance + factor * spread.sum()
        total = total + t.weight * (squared_error + gamma * variance) / count
        if ridge != 0 and isinstance(t, Target):
            total = total + ridge * t.reduce(t.readout.theta()).square().sum()
    return total
