"""Predictions on rotated copies of the structures of a training step, for the
equivariance penalty of :py:mod:`metatrain_symmetry.losses`.

The copies are evaluated the way metatrain evaluated the step itself, and their
predictions brought to the units the loss sees (division by the number of atoms,
per-property scales).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as forward_ad
from metatensor.torch import TensorMap
from metatomic.torch import System


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


@dataclass
class GeneratorDerivatives:
    """Predictions on three copies of every system of a step, ordered copy-major
    (system ``k * n_systems + i`` is copy ``k`` of system ``i``), and their
    derivatives along the generator ``G_k`` of copy ``k``: the tangents of a
    rotation ``exp(t G_k)`` at ``t = 0``, in the units of the loss and
    differentiable with respect to the model's parameters."""

    n_systems: int
    predictions: dict[str, TensorMap]
    """the predictions of every copy (the same for the three copies of a system)"""
    tangents: dict[str, TensorMap]
    """``d/dt z(exp(t G_k) x)`` at ``t = 0``, with the metadata of ``predictions``"""


def evaluate_generator_derivatives(
    step: TrainingStep, targets: Iterable[str]
) -> GeneratorDerivatives:
    """Evaluate the step's model on three copies of each system whose rotation
    is the dual number ``I + t G_k`` (forward-mode differentiation), in one
    batch, and split the predictions of ``targets`` into values and tangents.

    :param step: the training step
    :param targets: the targets to evaluate (their values; no gradients)
    """
    from .generators import so3_generators, split_dual

    systems = step.systems
    n_systems = len(systems)
    positions = systems[0].positions
    eye = torch.eye(3, dtype=positions.dtype, device=positions.device)
    tangent = so3_generators(positions.dtype, positions.device)
    infos = _requested_targets(step.targets, {name: set() for name in targets})
    with _differentiable_attention(), forward_ad.dual_level():
        rotations = forward_ad.make_dual(
            eye.expand(3 * n_systems, 3, 3).clone(),
            tangent.repeat_interleave(n_systems, dim=0),
        )
        rotated = _copy_major_systems(systems, rotations, 3)
        predictions = _predictions_in_loss_units(step, rotated, infos)
        split = {name: split_dual(tensor) for name, tensor in predictions.items()}
    return GeneratorDerivatives(
        n_systems,
        {name: values for name, (values, _) in split.items()},
        {name: tangents for name, (_, tangents) in split.items()},
    )


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
def _differentiable_attention() -> Iterator[None]:
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
    rotated = _copy_major_systems(systems, rotations, n_copies)
    targets = _requested_targets(step.targets, gradients)
    computed = {
        name: set(targets[name].gradients)
        if isinstance(targets[name], TargetInfo)
        else set()
        for name in targets
    }
    predictions = _predictions_in_loss_units(step, rotated, targets)
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


def _copy_major_systems(systems: list, rotations: torch.Tensor, n_copies: int) -> list:
    """The ``n_copies * n_systems`` rotated systems, copy ``c`` of system ``i`` at
    ``c * n_systems + i``.

    :param rotations: ``(n_copies * n_systems, 3, 3)``, in the same order
    """
    from .engine import rotated_systems

    n_systems = len(systems)
    by_system = rotations.reshape(n_copies, n_systems, 3, 3)
    per_system = [
        rotated_systems(system, by_system[:, index])
        for index, system in enumerate(systems)
    ]
    return [per_system[i][c] for c in range(n_copies) for i in range(n_systems)]


def _requested_targets(infos: dict, gradients: dict[str, set]) -> dict:
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


def _predictions_in_loss_units(
    step: TrainingStep, rotated: list[System], targets: dict
) -> dict[str, TensorMap]:
    """Predictions of the step's model on the ``rotated`` systems, averaged by the
    number of atoms and scaled as metatrain does before the loss."""
    from metatrain.utils import evaluate_model as evaluate_module
    from metatrain.utils import per_atom

    # the hooks wrap these functions to observe training steps; call the originals
    evaluate = _unwrapped(evaluate_module.evaluate_model)
    average = _unwrapped(per_atom.average_by_num_atoms)

    model = step.model
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        # Evaluate the copies through the wrapped module: DDP expects one forward
        # per backward; a second wrapper forward would add to every step a
        # broadcast of the buffers (a collective all ranks must reach) and a
        # second reducer.prepare_for_backward. The copies' gradients need
        # no wrapper: autograd sums all contributions to a parameter before its
        # AccumulateGrad node runs, and DDP's allreduce hook runs after that node,
        # so the allreduce averages the total gradient, penalty included.
        model = model.module
    predictions = evaluate(model, rotated, targets, is_training=True)
    predictions = average(predictions, rotated, step.per_structure_targets)
    scaler = getattr(model, "scaler", None)
    if scaler is not None and hasattr(scaler, "apply_scales"):
        predictions = scaler.apply_scales(
            rotated,
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
