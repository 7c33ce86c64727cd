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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.autograd.forward_ad as forward_ad
from metatensor.torch import Labels, TensorBlock, TensorMap

from .rotated_predictions import (
    TrainingStep,
    copy_major_systems,
    predictions_in_loss_units,
    raw_predictions,
    requested_targets,
    to_loss_units,
)


__all__ = ["LieDerivatives", "evaluate_lie_derivatives", "lie_label"]


@dataclass
class LieDerivatives:
    """The Lie derivatives ``L_k z`` of the predictions of a training step along
    the three generators of rotations, in the units of the loss (differentiable
    with respect to the model's parameters when evaluated with ``create_graph``)."""

    values: dict[str, torch.Tensor]
    """for each loss label (``target``, or ``target::gradient`` for forces and
    stress), ``(3, n_values)``: the generator, then every value of the target's
    blocks (or gradient blocks), flattened"""


def lie_label(target: str, gradient: Optional[str]) -> str:
    """The label of a target's values (``gradient=None``) or of one of its
    gradients, as in the training log."""
    return target if gradient is None else f"{target}::{gradient}"


def evaluate_lie_derivatives(
    step: TrainingStep,
    wanted: dict[str, set[Optional[str]]],
    create_graph: bool = True,
    predictions: Optional[dict[str, TensorMap]] = None,
) -> LieDerivatives:
    """The Lie derivatives of the step's predictions that ``wanted`` names.

    The values of an energy whose forces (molecules) or stress (any structure)
    the step predicted come from them, with no model call: ``L_k E`` is the
    energy's derivative along the generator, the force or virial contracted
    with ``G_k`` (Orb-v3's penalty). Other energies (one invariant value per
    structure) are differentiated in reverse mode with respect to the angles of
    a rotation ``I + sum_k a_k G_k`` of one copy of the batch, ``L_k E = dE/da_k``
    at ``a = 0``, and their forces and stress as the derivatives of ``L_k E``
    with respect to positions and strain. Other targets come from one
    forward-mode evaluation of three copies of the batch whose rotation is the
    dual number ``I + t G_k``, and so do the values of energies when that
    evaluation is made anyway.

    :param step: the training step
    :param wanted: for each target, ``None`` for its values and the names of
        the gradients (``"positions"``, ``"strain"``) to differentiate
    :param create_graph: keep the graph to the model's parameters
    :param predictions: the step's own predictions in the units of the loss, with
        the gradients it computed
    """
    values: dict[str, torch.Tensor] = {}
    for name, gradients in wanted.items():
        if gradients == {None} and predictions is not None and name in predictions:
            lie = _lie_from_step_gradients(step, name, predictions[name])
            if lie is not None:
                values[name] = lie
    reverse = {
        name: set(gradients)
        for name, gradients in wanted.items()
        if _is_energy(step.targets[name]) and name not in values
    }
    dual = sorted(set(wanted) - set(reverse) - set(values))
    if dual:
        dual += sorted(
            name for name, gradients in reverse.items() if gradients <= {None}
        )
        reverse = {name: g for name, g in reverse.items() if name not in dual}
    if dual:
        with contextlib.nullcontext() if create_graph else torch.no_grad():
            values.update(_forward_lie_derivatives(step, dual))
    if reverse:
        values.update(_reverse_lie_derivatives(step, reverse, create_graph))
    return LieDerivatives(values)


def _lie_from_step_gradients(
    step: TrainingStep, name: str, energy: TensorMap
) -> Optional[torch.Tensor]:
    """``(3, n_values)`` Lie derivatives of an energy from the gradients the step
    computed, in the units of the loss; ``None`` when it computed none that
    suffice (a periodic structure needs the strain gradient: its energy also
    depends on the orientation of the cell).

    In metatrain's convention (positions ``r @ (1 + e)``), a rotation
    ``1 + t G`` is the strain ``e = t G^T``: ``L_k E = sum_ab S_ab (G_k)_ba`` for
    the strain gradient ``S``, and ``sum_i g_i . G_k r_i`` for the position
    gradients ``g`` of a structure without cell.
    """
    from .generators import so3_generators

    if not _is_energy(step.targets[name]):
        return None
    block = energy.block()
    gradients = block.gradients_list()
    generators = so3_generators(block.values.dtype, block.values.device)
    if "strain" in gradients:
        strain = block.gradient("strain").values  # (n_systems, 3, 3, n_properties)
        lie = torch.einsum("sabp,kba->ksp", strain, generators)
        return lie.reshape(3, -1)
    periodic = any(bool(system.pbc.any()) for system in step.systems)
    if "positions" not in gradients or periodic:
        return None
    return _lie_from_position_gradients(step, name, block)


def _lie_from_position_gradients(
    step: TrainingStep, name: str, block: TensorBlock
) -> torch.Tensor:
    """``sum_i g_i . G_k r_i`` per structure and property, divided by the number
    of atoms as metatrain divides the energy (not its position gradients)."""
    from .generators import so3_generators

    gradient = block.gradient("positions")
    values = gradient.values  # (n_atoms, 3, n_properties)
    positions = torch.cat([system.positions for system in step.systems])
    sizes = torch.tensor([len(system) for system in step.systems])
    offsets = torch.cumsum(sizes, dim=0) - sizes
    sample = gradient.samples.column("sample").to(torch.long).cpu()
    atom = offsets[sample] + gradient.samples.column("atom").to(torch.long).cpu()
    generators = so3_generators(values.dtype, values.device)
    # (G_k r_i)_a for every atom i
    moved = torch.einsum("kab,ib->kia", generators, positions[atom.to(values.device)])
    per_atom = torch.einsum("kia,iap->kip", moved, values)
    n_systems = len(block.values)
    lie = torch.zeros(3, n_systems, values.shape[-1], dtype=values.dtype)
    lie = lie.to(values.device).index_add_(1, sample.to(values.device), per_atom)
    if name not in step.per_structure_targets:
        lie = lie / sizes.to(lie).reshape(1, -1, 1)
    return lie.reshape(3, -1)


def _is_energy(info) -> bool:
    """Whether a target is an energy with one invariant value per structure, the
    case differentiated in reverse mode."""
    from metatrain.utils.data import TargetInfo

    if not isinstance(info, TargetInfo) or info.quantity != "energy":
        return False
    blocks = info.layout.blocks()
    return len(blocks) == 1 and list(blocks[0].samples.names) == ["system"]


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
    with _differentiable_attention(), forward_ad.dual_level():
        rotations = forward_ad.make_dual(
            eye.expand(3 * n_systems, 3, 3).clone(),
            generators.repeat_interleave(n_systems, dim=0),
        )
        rotated = copy_major_systems(systems, rotations, 3)
        predictions = predictions_in_loss_units(step, rotated, infos)
        split = {name: split_dual(tensor) for name, tensor in predictions.items()}
    return {
        name: _lie_from_tangents(name, values, tangents, n_systems, generators)
        for name, (values, tangents) in split.items()
    }


def _lie_from_tangents(
    name: str,
    values: TensorMap,
    tangents: TensorMap,
    n_systems: int,
    generators: torch.Tensor,
) -> torch.Tensor:
    """``(3, n_values)`` Lie derivatives from the predictions on the three
    copies (copy ``k`` of system ``i`` at ``k * n_systems + i``) and their
    tangents along ``G_k``."""
    from .generators import apply_generator
    from .irreps import block_layout

    per_generator: list[list[torch.Tensor]] = [[], [], []]
    for (key, block), tangent in zip(values.items(), tangents.blocks(), strict=True):
        layout = block_layout(
            name, list(values.keys.names), key.values, block.components
        )
        copy = torch.div(
            block.samples.column("system").to(torch.long),
            n_systems,
            rounding_mode="floor",
        )
        for k in range(3):
            lie = tangent.values[copy == k] - apply_generator(
                block.values[copy == k], layout, generators[k]
            )
            per_generator[k].append(lie.reshape(-1))
    return torch.stack([torch.cat(parts) for parts in per_generator])


def _reverse_lie_derivatives(
    step: TrainingStep, energies: dict[str, set[Optional[str]]], create_graph: bool
) -> dict[str, torch.Tensor]:
    """Lie derivatives of energies and their gradients, from derivatives with
    respect to the angles ``a`` of a rotation ``R = I + sum_k a_k G_k`` of one
    copy of the batch, at ``a = 0``.

    The copy's positions are ``R (1 + e)^T r`` for leaf positions ``r`` and a
    zero strain ``e`` (metatrain's convention, ``r @ (1 + e)``), so that the
    derivatives with respect to ``r`` and ``e`` are the back-rotated forces and
    stress of the rotated copy; their derivatives with respect to ``a_k`` are
    those of ``L_k E = dE/da_k`` with respect to ``r`` and ``e``.
    """
    from .copies import prepare_rotations, transformed_copies
    from .generators import so3_generators

    systems = step.systems
    dtype, device = systems[0].positions.dtype, systems[0].positions.device
    gradients = set().union(*energies.values()) - {None}
    with torch.enable_grad(), _differentiable_attention():
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
            system.positions.requires_grad_("positions" in gradients)
            for system in prepared
        ]
        copies = [
            transformed_copies(system, matrices[index : index + 1])[0]
            for index, system in enumerate(prepared)
        ]
        infos = requested_targets(step.targets, {name: set() for name in energies})
        raw = raw_predictions(step, copies, infos)
        inputs = {"positions": leaves, "strain": [strains]}
        lie = {}
        for name, wanted in energies.items():
            maps = _energy_lie_maps(
                raw[name], angles, inputs, wanted - {None}, create_graph
            )
            in_loss_units = [
                to_loss_units(step, copies, {name: tensor})[name] for tensor in maps
            ]
            lie.update(_flattened_by_label(name, wanted, in_loss_units))
    return lie


def _energy_lie_maps(
    energy: TensorMap,
    angles: torch.Tensor,
    inputs: dict[str, list[torch.Tensor]],
    gradients: set[str],
    create_graph: bool,
) -> list[TensorMap]:
    """For each generator ``k``, a map with the metadata of ``energy`` (one
    block, one row per system, in order) whose values are ``L_k E`` and whose
    ``gradients`` are the derivatives of ``L_k E`` with respect to ``inputs``."""
    block = energy.block()
    values = block.values
    order = torch.arange(len(values), device=values.device)
    if not bool(torch.equal(block.samples.column("system").to(order), order)):
        raise ValueError("an energy must have one row per system, in order")
    per_property = []
    for index in range(values.shape[-1]):
        # L_k E is differentiated again for the gradients: keep its graph then
        lie = _derivative(
            values[:, index].sum(), [angles], create_graph or bool(gradients)
        )[0]
        derivatives = [
            _lie_gradients(lie[:, k], inputs, gradients, create_graph) for k in range(3)
        ]
        per_property.append((lie, derivatives))
    n_atoms = [len(leaf) for leaf in inputs["positions"]]
    return [
        _energy_map(
            block,
            torch.stack([lie[:, k] for lie, _ in per_property], dim=-1),
            {
                name: torch.stack([d[k][name] for _, d in per_property], dim=-1)
                for name in gradients
            },
            n_atoms,
        )
        for k in range(3)
    ]


def _derivative(
    output: torch.Tensor, inputs: list[torch.Tensor], create_graph: bool
) -> list[torch.Tensor]:
    """``d output / d inputs``, zero where ``output`` does not depend on an input
    (an energy made of composition terms only)."""
    if not output.requires_grad or not inputs:
        return [torch.zeros_like(tensor) for tensor in inputs]
    return list(
        torch.autograd.grad(
            output,
            inputs,
            retain_graph=True,
            create_graph=create_graph,
            materialize_grads=True,
        )
    )


def _lie_gradients(
    lie: torch.Tensor,
    inputs: dict[str, list[torch.Tensor]],
    gradients: set[str],
    create_graph: bool,
) -> dict[str, torch.Tensor]:
    """The derivatives of ``L_k E`` (``(n_systems,)``) with respect to the
    positions (``(n_atoms, 3)``, all systems) and strains (``(n_systems, 3,
    3)``) that ``gradients`` names."""
    names = sorted(gradients)
    tensors = [tensor for name in names for tensor in inputs[name]]
    derivatives = iter(_derivative(lie.sum(), tensors, create_graph))
    result = {}
    for name in names:
        parts = [next(derivatives) for _ in inputs[name]]
        result[name] = torch.cat(parts) if name == "positions" else parts[0]
    return result


def _energy_map(
    block: TensorBlock,
    values: torch.Tensor,
    gradients: dict[str, torch.Tensor],
    n_atoms: list[int],
) -> TensorMap:
    """A one-block map with the metadata of an energy ``block`` and ``values``
    (``(n_systems, n_properties)``), with ``positions`` (``(n_atoms, 3,
    n_properties)``) and ``strain`` (``(n_systems, 3, 3, n_properties)``) gradient
    blocks laid out as metatrain lays out forces and stress."""
    device = values.device
    result = TensorBlock(values, block.samples, block.components, block.properties)

    def xyz(name: str) -> Labels:
        return Labels([name], torch.arange(3, device=device).reshape(-1, 1))

    if "positions" in gradients:
        counts = torch.tensor(n_atoms, device=device)
        samples = torch.stack(
            [
                torch.repeat_interleave(
                    torch.arange(len(n_atoms), device=device), counts
                ),
                torch.cat([torch.arange(n, device=device) for n in n_atoms]),
            ],
            dim=1,
        )
        result.add_gradient(
            "positions",
            TensorBlock(
                gradients["positions"],
                Labels(["sample", "atom"], samples),
                [xyz("xyz")],
                block.properties,
            ),
        )
    if "strain" in gradients:
        result.add_gradient(
            "strain",
            TensorBlock(
                gradients["strain"],
                Labels(
                    ["sample"], torch.arange(len(values), device=device).reshape(-1, 1)
                ),
                [xyz("xyz_1"), xyz("xyz_2")],
                block.properties,
            ),
        )
    return TensorMap(Labels.single().to(device), [result])


def _flattened_by_label(
    name: str, wanted: set[Optional[str]], maps: list[TensorMap]
) -> dict[str, torch.Tensor]:
    """``(3, n_values)`` per label of ``wanted``, from the three maps of
    :py:func:`_energy_lie_maps` in the units of the loss."""
    flattened = {}
    for gradient in wanted:
        parts = [
            (m.block() if gradient is None else m.block().gradient(gradient)).values
            for m in maps
        ]
        flattened[lie_label(name, gradient)] = torch.stack(
            [part.reshape(-1) for part in parts]
        )
    return flattened


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
