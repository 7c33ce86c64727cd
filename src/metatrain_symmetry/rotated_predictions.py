"""Predictions on rotated copies of the structures of a training step, for the
equivariance penalty of :py:mod:`metatrain_symmetry.losses`, and the evaluation
of a step's model on any copies the way metatrain evaluated the step.

The copies are evaluated the way metatrain evaluated the step itself, and their
predictions brought to the units the loss sees (division by the number of atoms,
per-property scales).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

import torch
from metatensor.torch import TensorMap
from metatomic.torch import System


__all__ = [
    "RotatedPredictions",
    "TrainingStep",
    "copy_major_systems",
    "derivative",
    "differentiable_attention",
    "loss_label",
    "rotated_by_angles",
    "evaluate_rotated_copies",
    "predictions_in_loss_units",
    "raw_predictions",
    "requested_targets",
    "to_loss_units",
]


@dataclass
class TrainingStep:
    """What one training step evaluated: enough to evaluate rotated copies the same
    way and bring them to the units the loss sees.

    :param model: the model being trained (in training mode)
    :param systems: the systems of the batch, with neighbour lists attached
    :param targets: the ``TargetInfo`` of each target evaluated in the step
    :param per_structure_targets: targets metatrain does not divide by the number
        of atoms before the loss
    """

    model: torch.nn.Module
    systems: list
    targets: dict
    per_structure_targets: list[str] = field(default_factory=list)


@dataclass
class RotatedPredictions:
    """Predictions on ``n_copies`` rotated copies of every system of a step,
    ordered copy-major: system ``c * n_systems + i`` is copy ``c`` of system ``i``."""

    n_copies: int
    n_systems: int
    rotations: torch.Tensor
    """``(n_copies * n_systems, 3, 3)`` the element applied to each copy"""
    predictions: dict[str, TensorMap]
    gradients: dict[str, set]
    """for each target, the gradients that were computed"""


def evaluate_rotated_copies(
    step: TrainingStep,
    gradients: dict[str, set],
    n_copies: int,
    generator: torch.Generator,
) -> RotatedPredictions:
    """Evaluate the step's model on ``n_copies`` random O(3) copies of each system,
    in one batch, and bring the predictions to the units of the loss.

    :param step: the training step
    :param gradients: targets to evaluate, with the energy gradients needed
    :param n_copies: number of copies per system
    :param generator: random number generator of the rotations
    """
    from metatrain.utils.data import TargetInfo

    systems = step.systems
    n_systems = len(systems)
    rotations = _random_elements(n_copies * n_systems, systems[0].positions, generator)
    rotated = copy_major_systems(systems, rotations, n_copies)
    targets = requested_targets(step.targets, gradients)
    computed = {
        name: set(targets[name].gradients)
        if isinstance(targets[name], TargetInfo)
        else set()
        for name in targets
    }
    predictions = predictions_in_loss_units(step, rotated, targets)
    return RotatedPredictions(n_copies, n_systems, rotations, predictions, computed)


def _random_elements(
    n_elements: int, positions: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """``(n_elements, 3, 3)`` Haar-random elements of O(3), in the dtype and on the
    device of ``positions``."""
    # looked up at call time, so that tests can replace the rotations
    from metatomic.torch.o3 import random_transformations

    # drawn in float64 on CPU: the same elements whatever the model's dtype and
    # device, from a generator independent of the device's
    return random_transformations(
        n_elements,
        device=torch.device("cpu"),
        dtype=torch.float64,
        add_inversions=True,
        generator=generator,
    ).matrices.to(dtype=positions.dtype, device=positions.device)


def copy_major_systems(systems: list, rotations: torch.Tensor, n_copies: int) -> list:
    """The ``n_copies * n_systems`` rotated systems, copy ``c`` of system ``i`` at
    ``c * n_systems + i``.

    :param rotations: ``(n_copies * n_systems, 3, 3)``, in the same order
    """
    from .copies import rotated_systems

    n_systems = len(systems)
    by_system = rotations.reshape(n_copies, n_systems, 3, 3)
    per_system = [
        rotated_systems(system, by_system[:, index])
        for index, system in enumerate(systems)
    ]
    return [per_system[i][c] for c in range(n_copies) for i in range(n_systems)]


def requested_targets(infos: dict, gradients: dict[str, set]) -> dict:
    """The ``TargetInfo`` to evaluate for each target of ``gradients``: that of the
    step, without its gradients when none of them is penalised."""
    from metatrain.utils.data import TargetInfo

    targets = {}
    for name, wanted in gradients.items():
        info = infos[name]
        if isinstance(info, TargetInfo) and len(info.gradients) > 0 and not wanted:
            # no gradient penalised: skip the double backward of forces and stress
            info = TargetInfo(
                layout=_without_gradients(info.layout),
                quantity=info.quantity,
                unit=info.unit,
                description=info.description,
            )
        targets[name] = info
    return targets


def predictions_in_loss_units(
    step: TrainingStep, rotated: list[System], targets: dict
) -> dict[str, TensorMap]:
    """Predictions of the step's model on the ``rotated`` systems, averaged by the
    number of atoms and scaled as metatrain does before the loss."""
    predictions = raw_predictions(step, rotated, targets)
    return to_loss_units(step, rotated, predictions)


def _trained_module(step: TrainingStep) -> torch.nn.Module:
    """The step's model, without its ``DistributedDataParallel`` wrapper.

    Copies are evaluated through the wrapped module: DDP expects one forward per
    backward; a second wrapper forward would add to every step a broadcast of the
    buffers (a collective all ranks must reach) and a second
    reducer.prepare_for_backward. The copies' gradients need no wrapper: autograd
    sums all contributions to a parameter before its AccumulateGrad node runs,
    and DDP's allreduce hook runs after that node, so the allreduce averages the
    total gradient, penalty included.
    """
    model = step.model
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.module
    return model


def raw_predictions(
    step: TrainingStep, systems: list[System], targets: dict
) -> dict[str, TensorMap]:
    """The step's model's predictions of ``targets`` on ``systems``, as metatrain
    evaluates them in training."""
    from metatrain.utils import evaluate_model as evaluate_module

    # the hooks wrap this function to observe training steps; call the original
    evaluate = _unwrapped(evaluate_module.evaluate_model)
    return evaluate(_trained_module(step), systems, targets, is_training=True)


def to_loss_units(
    step: TrainingStep, systems: list[System], predictions: dict[str, TensorMap]
) -> dict[str, TensorMap]:
    """``predictions`` on ``systems`` averaged by the number of atoms and scaled
    as metatrain does before the loss (both linear in the values, so that they
    apply to derivatives too)."""
    from metatrain.utils import per_atom

    average = _unwrapped(per_atom.average_by_num_atoms)
    predictions = average(predictions, systems, step.per_structure_targets)
    scaler = getattr(_trained_module(step), "scaler", None)
    if scaler is not None and hasattr(scaler, "apply_scales"):
        predictions = scaler.apply_scales(
            systems,
            predictions,
            remove=False,
            use_per_target_scales=False,
            use_per_property_scales=True,
        )
    return predictions


def _unwrapped(function):
    return getattr(function, "__wrapped__", function)


def _without_gradients(layout: TensorMap) -> TensorMap:
    """``layout`` with the gradients of its blocks left out."""
    from metatensor.torch import TensorBlock

    blocks = [
        TensorBlock(
            values=block.values,
            samples=block.samples,
            components=block.components,
            properties=block.properties,
        )
        for block in layout.blocks()
    ]
    return TensorMap(layout.keys, blocks)


def loss_label(target: str, gradient: Optional[str]) -> str:
    """The label of a target's values (``gradient=None``) or of one of its
    gradients, as in the training log."""
    return target if gradient is None else f"{target}::{gradient}"


def _reference_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None
):
    """``scaled_dot_product_attention`` written out, with a softmax free of
    in-place operations."""
    if dropout_p != 0.0 or is_causal:
        raise ValueError(
            "method: generators supports attention without dropout or causal masks"
        )
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    weights = (query @ key.transpose(-2, -1)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            weights = weights.masked_fill(~attn_mask, float("-inf"))
        else:
            weights = weights + attn_mask
    weights = torch.exp(weights - weights.amax(dim=-1, keepdim=True).detach())
    return (weights / weights.sum(dim=-1, keepdim=True)) @ value


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """Replace ``torch.nn.functional.scaled_dot_product_attention`` by the same
    function written out, for the duration.

    Back-propagating through forward-mode tangents fails in every kernel of
    PyTorch's own (the fused ones have no forward-mode formula, the math one
    modifies its softmax in place); the written-out attention computes the same
    function with operations that support both.
    """
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention
    functional.scaled_dot_product_attention = _reference_attention
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


def rotated_by_angles(step: TrainingStep, gradients: set[str]) -> tuple:
    """One copy of the step's systems, rotated by ``R = I + sum_k a_k G_k`` at
    ``a = 0`` after a zero strain ``e`` (metatrain's ``r @ (1 + e)``).

    :param gradients: ``"positions"`` and ``"strain"``: which of the leaf
        positions and strains require gradients
    :return: the angles (``(n_systems, 3)``, requiring gradients), the copies,
        the strains (``(n_systems, 3, 3)``) and the leaf positions of each system
    """
    from .copies import prepare_rotations, transformed_copies
    from .generators import so3_generators

    systems = step.systems
    dtype, device = systems[0].positions.dtype, systems[0].positions.device
    angles = torch.zeros(len(systems), 3, dtype=dtype, device=device)
    angles.requires_grad_(True)
    strains = torch.zeros(len(systems), 3, 3, dtype=dtype, device=device)
    strains.requires_grad_("strain" in gradients)
    eye = torch.eye(3, dtype=dtype, device=device)
    generators = so3_generators(dtype, device)
    rotations = eye + torch.einsum("sk,kij->sij", angles, generators)
    matrices = rotations @ (eye + strains).transpose(1, 2)
    prepared = [prepare_rotations(system) for system in systems]
    leaves = [
        system.positions.requires_grad_("positions" in gradients) for system in prepared
    ]
    copies = [
        transformed_copies(system, matrices[index : index + 1])[0]
        for index, system in enumerate(prepared)
    ]
    return angles, copies, strains, leaves


def derivative(
    output: torch.Tensor,
    inputs: list[torch.Tensor],
    create_graph: bool,
    along: Optional[torch.Tensor] = None,
) -> list[torch.Tensor]:
    """``d output / d inputs`` (contracted with ``along``, shaped as ``output``,
    for a non-scalar output), zero where ``output`` does not depend on an input
    (an energy made of composition terms only)."""
    if not output.requires_grad or not inputs:
        return [torch.zeros_like(tensor) for tensor in inputs]
    return list(
        torch.autograd.grad(
            output,
            inputs,
            along,
            retain_graph=True,
            create_graph=create_graph,
            materialize_grads=True,
        )
    )
