"""Lie derivatives of the predictions of a training step along the generators of
rotations, for ``method: generators`` of the equivariance loss
(:py:mod:`metatrain_symmetry.losses`) and its validation monitor.

An energy's Lie derivatives come from the forces or stress the step computed
(the generator derivative of Orb-v3's penalty, with no model call), or else from
reverse-mode derivatives with respect to the angles of a rotation of one copy of
the batch, which give its forces' and stress's by one more derivative; other
targets' from forward mode on three copies.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.autograd.forward_ad as forward_ad
from metatensor.torch import TensorMap

from .lie_energies import is_energy, lie_from_step_gradients, reverse_lie_derivatives
from .rotated_predictions import (
    TrainingStep,
    copy_major_systems,
    derivative,
    differentiable_attention,
    loss_label,
    predictions_in_loss_units,
    requested_targets,
    rotated_by_angles,
)


__all__ = ["LieDerivatives", "evaluate_lie_derivatives", "random_directions"]


@dataclass
class LieDerivatives:
    """The Lie derivatives ``L_k z`` of the predictions of a training step along
    the three generators of rotations, in the units of the loss (differentiable
    with respect to the model's parameters when evaluated with ``create_graph``)."""

    values: dict[str, torch.Tensor]
    """for each loss label (``target``, or ``target::gradient`` for forces and
    stress), ``(3, n_values)``: the generator, then every value of the target's
    blocks (or gradient blocks), flattened"""
    weights: dict[str, float] = field(default_factory=dict)
    """the weight of a label's penalty when it is not 1: ``1 / f`` for the
    labels that need model evaluations at a step that a fraction ``f`` of the
    steps evaluate, and 0 (with no values) at the other steps"""


def evaluate_lie_derivatives(
    step: TrainingStep,
    wanted: dict[str, set[Optional[str]]],
    create_graph: bool = True,
    predictions: Optional[dict[str, TensorMap]] = None,
    directions: Optional[torch.Tensor] = None,
    model_weight: float = 1.0,
) -> LieDerivatives:
    """The Lie derivatives of the step's predictions that ``wanted`` names.

    The values of an energy whose forces (molecules) or stress (any structure)
    the step predicted come from them, with no model call: ``L_k E`` is the
    energy's derivative along the generator, the force or virial contracted
    with ``G_k`` (Orb-v3's penalty; training steps add the strain gradient to
    energies trained without stress, see
    :py:func:`~metatrain_symmetry.lie_energies.with_strain_gradient`). Other
    energies (one invariant value per structure) are differentiated in reverse
    mode with respect to the angles of a rotation ``I + sum_k a_k G_k`` of one
    copy of the batch, ``L_k E = dE/da_k`` at ``a = 0``, and their forces and
    stress as the derivatives of ``L_k E`` with respect to positions and
    strain. Other targets come from one
    forward-mode evaluation of three copies of the batch whose rotation is the
    dual number ``I + t G_k``, and so do the values of energies when that
    evaluation is made anyway.

    :param step: the training step
    :param wanted: for each target, ``None`` for its values and the names of
        the gradients (``"positions"``, ``"strain"``) to differentiate
    :param create_graph: keep the graph to the model's parameters
    :param predictions: the step's own predictions in the units of the loss, with
        the gradients it computed
    :param directions: ``(n_systems, 3)`` unit vectors ``n``: the forward-mode
        evaluation then takes one copy of the batch, rotated along
        ``sum_k n_k G_k``, instead of three, and the reverse-mode one
        differentiates ``L_n E`` once instead of three times; each of their
        values has the single row ``sqrt(3) L_n z``, whose square is an unbiased
        estimate of ``sum_k |L_k z|^2`` for ``n`` uniform on the sphere (see
        :py:func:`random_directions`). The energies' Lie derivatives taken from
        the step's gradients keep their three rows
    :param model_weight: the weight of the labels whose Lie derivatives need
        model evaluations (``1 / f`` when a fraction ``f`` of the steps make
        them); 0 makes none, and gives these labels no values
    """
    values: dict[str, torch.Tensor] = {}
    for name, gradients in wanted.items():
        if gradients == {None} and predictions is not None and name in predictions:
            lie = lie_from_step_gradients(step, name, predictions[name])
            if lie is not None:
                values[name] = lie
    reverse = {
        name: set(gradients)
        for name, gradients in wanted.items()
        if is_energy(step.targets[name]) and name not in values
    }
    dual = sorted(set(wanted) - set(reverse) - set(values))
    if dual:
        dual += sorted(
            name for name, gradients in reverse.items() if gradients <= {None}
        )
        reverse = {name: g for name, g in reverse.items() if name not in dual}
    needing_model = [loss_label(name, None) for name in dual] + [
        loss_label(name, gradient)
        for name, gradients in reverse.items()
        for gradient in gradients
    ]
    weights = dict.fromkeys(needing_model, model_weight) if model_weight != 1 else {}
    if model_weight == 0:
        empty = step.systems[0].positions.new_zeros((0,))
        return LieDerivatives(values | dict.fromkeys(needing_model, empty), weights)
    if dual:
        values.update(_lie_derivatives_of_values(step, dual, create_graph, directions))
    if reverse:
        values.update(reverse_lie_derivatives(step, reverse, create_graph, directions))
    return LieDerivatives(values, weights)


# models found to have an operation without a forward-mode derivative
_WITHOUT_FORWARD_MODE: weakref.WeakSet = weakref.WeakSet()


def random_directions(
    n_systems: int, generator: torch.Generator, dtype: torch.dtype, device
) -> torch.Tensor:
    """``(n_systems, 3)`` unit vectors drawn uniformly on the sphere (normalized
    Gaussian vectors), for which ``E[n n^T] = I / 3``."""
    vectors = torch.randn(n_systems, 3, generator=generator, dtype=torch.float64)
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    return vectors.to(dtype=dtype, device=device)


def _lie_derivatives_of_values(
    step: TrainingStep,
    targets: list[str],
    create_graph: bool,
    directions: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """Lie derivatives of the values of ``targets``: by forward mode (along
    ``directions`` when given), or by double backward, along the three
    generators, for a model with an operation that has no forward-mode
    derivative (said once, then remembered for the model)."""
    from .generators import lacks_forward_mode

    model = step.model
    if model not in _WITHOUT_FORWARD_MODE:
        try:
            with contextlib.nullcontext() if create_graph else torch.no_grad():
                if directions is not None:
                    return _directional_lie_derivatives(step, targets, directions)
                return _forward_lie_derivatives(step, targets)
        except (RuntimeError, NotImplementedError) as error:
            if not lacks_forward_mode(error):
                raise
            _WITHOUT_FORWARD_MODE.add(model)
            first_line = str(error).strip().splitlines()[0]
            warnings.warn(
                f"the model has an operation without a forward-mode derivative "
                f"({first_line}); method: generators takes the Lie derivatives of "
                f"{', '.join(targets)} by double backward instead (the same "
                "numbers, at a higher cost)",
                stacklevel=2,
            )
    return _double_backward_lie_derivatives(step, targets, create_graph)


def _double_backward_lie_derivatives(
    step: TrainingStep, targets: list[str], create_graph: bool
) -> dict[str, torch.Tensor]:
    """``L_k z = D_k z - d rho(G_k) z`` with the tangent ``D_k z`` of one copy of
    the batch rotated by ``I + sum_k a_k G_k`` as the derivative, with respect
    to a probe ``u``, of the vector-Jacobian product ``u . dz/da``."""
    from .generators import so3_generators

    systems = step.systems
    dtype, device = systems[0].positions.dtype, systems[0].positions.device
    generators = so3_generators(dtype, device)
    with torch.enable_grad(), differentiable_attention():
        angles, copies, _, _ = rotated_by_angles(step, set())
        infos = requested_targets(step.targets, {name: set() for name in targets})
        predictions = predictions_in_loss_units(step, copies, infos)
        lie = {}
        for name in targets:
            pairs = []
            for block in predictions[name].blocks():
                values = block.values
                probe = torch.zeros_like(values, requires_grad=True)
                # probe . d values / d angles, linear in the probe
                (product,) = derivative(values, [angles], True, along=probe)
                pairs.append(
                    [
                        (
                            values,
                            derivative(product[:, k].sum(), [probe], create_graph)[0],
                        )
                        for k in range(3)
                    ]
                )
            lie[name] = _stacked_lie(name, predictions[name], pairs, generators)
    return lie


def _stacked_lie(
    name: str,
    tensor: TensorMap,
    pairs: list[list[tuple[torch.Tensor, torch.Tensor]]],
    generators: torch.Tensor,
) -> torch.Tensor:
    """``(3, n_values)`` Lie derivatives ``L_k z = D_k z - d rho(G_k) z`` of the
    blocks of ``tensor``, from each block's ``(z, D_k z)`` for ``k = 0, 1, 2``."""
    from .generators import apply_generator
    from .irreps import block_layout

    per_generator: list[list[torch.Tensor]] = [[], [], []]
    for (key, block), block_pairs in zip(tensor.items(), pairs, strict=True):
        layout = block_layout(
            name, list(tensor.keys.names), key.values, block.components
        )
        for k, (values, tangent) in enumerate(block_pairs):
            lie = tangent - apply_generator(values, layout, generators[k])
            per_generator[k].append(lie.reshape(-1))
    return torch.stack([torch.cat(parts) for parts in per_generator])


def _forward_lie_derivatives(
    step: TrainingStep, targets: list[str]
) -> dict[str, torch.Tensor]:
    """Evaluate the step's model on three copies of each system whose rotation
    is the dual number ``I + t G_k`` (forward-mode differentiation), in one
    batch, and take ``L_k z = D_k z - d rho(G_k) z`` of the values of
    ``targets``."""
    from .generators import so3_generators, split_dual

    systems = step.systems
    n_systems = len(systems)
    positions = systems[0].positions
    eye = torch.eye(3, dtype=positions.dtype, device=positions.device)
    generators = so3_generators(positions.dtype, positions.device)
    infos = requested_targets(step.targets, {name: set() for name in targets})
    with differentiable_attention(), forward_ad.dual_level():
        rotations = forward_ad.make_dual(
            eye.expand(3 * n_systems, 3, 3).clone(),
            generators.repeat_interleave(n_systems, dim=0),
        )
        rotated = copy_major_systems(systems, rotations, 3)
        predictions = predictions_in_loss_units(step, rotated, infos)
        split = {name: split_dual(tensor) for name, tensor in predictions.items()}
    return {
        name: _stacked_lie(
            name, values, _copy_pairs(values, tangents, n_systems), generators
        )
        for name, (values, tangents) in split.items()
    }


def _copy_pairs(
    values: TensorMap, tangents: TensorMap, n_systems: int
) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per block, the values and tangents of copy ``k`` (systems ``k *
    n_systems`` to ``(k + 1) * n_systems``) for ``k = 0, 1, 2``."""
    pairs = []
    for block, tangent in zip(values.blocks(), tangents.blocks(), strict=True):
        system = block.samples.column("system").to(torch.long)
        copy = torch.div(system, n_systems, rounding_mode="floor")
        pairs.append(
            [(block.values[copy == k], tangent.values[copy == k]) for k in range(3)]
        )
    return pairs


def _directional_lie_derivatives(
    step: TrainingStep, targets: list[str], directions: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``sqrt(3) L_n z`` of the values of ``targets``, ``(1, n_values)``, from one
    copy of each system ``s`` whose rotation is the dual number ``I + t sum_k
    n_sk G_k``: ``L_n z = D_n z - sum_k n_sk d rho(G_k) z``."""
    from .generators import apply_generator, so3_generators, split_dual
    from .irreps import block_layout

    systems = step.systems
    positions = systems[0].positions
    eye = torch.eye(3, dtype=positions.dtype, device=positions.device)
    generators = so3_generators(positions.dtype, positions.device)
    directions = directions.to(dtype=positions.dtype, device=positions.device)
    infos = requested_targets(step.targets, {name: set() for name in targets})
    with differentiable_attention(), forward_ad.dual_level():
        rotations = forward_ad.make_dual(
            eye.expand(len(systems), 3, 3).clone(),
            torch.einsum("sk,kij->sij", directions, generators),
        )
        rotated = copy_major_systems(systems, rotations, 1)
        predictions = predictions_in_loss_units(step, rotated, infos)
        split = {name: split_dual(tensor) for name, tensor in predictions.items()}
    lie = {}
    for name, (values, tangents) in split.items():
        parts = []
        for (key, block), tangent in zip(
            values.items(), tangents.blocks(), strict=True
        ):
            layout = block_layout(
                name, list(values.keys.names), key.values, block.components
            )
            system = block.samples.column("system").to(torch.long)
            weights = directions[system].reshape(-1, 3, *[1] * (block.values.ndim - 1))
            rotated_values = sum(
                weights[:, k] * apply_generator(block.values, layout, generators[k])
                for k in range(3)
            )
            parts.append((tangent.values - rotated_values).reshape(-1))
        lie[name] = math.sqrt(3.0) * torch.cat(parts).unsqueeze(0)
    return lie
