"""Lie derivatives of energies and of their forces and stress, for ``method:
generators`` of the equivariance loss (see
:py:func:`metatrain_symmetry.lie_predictions.evaluate_lie_derivatives`).

An energy's Lie derivative along a generator is its derivative along the
rotation: from the forces or stress the training step computed (the generator
derivative of Orb-v3's penalty, with no model call), or from reverse-mode
derivatives with respect to the angles of a rotation of one copy of the batch,
whose derivatives with respect to positions and strain are the Lie derivatives
of the back-rotated forces and stress.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

from .rotated_predictions import (
    TrainingStep,
    derivative,
    differentiable_attention,
    loss_label,
    raw_predictions,
    requested_targets,
    rotated_by_angles,
    to_loss_units,
)


__all__ = [
    "is_energy",
    "lie_from_step_gradients",
    "reverse_lie_derivatives",
    "with_strain_gradient",
]


def is_energy(info) -> bool:
    """Whether a target is an energy with one invariant value per structure, the
    case differentiated in reverse mode."""
    from metatrain.utils.data import TargetInfo

    if not isinstance(info, TargetInfo) or info.quantity != "energy":
        return False
    blocks = info.layout.blocks()
    return len(blocks) == 1 and list(blocks[0].samples.names) == ["system"]


def with_strain_gradient(info):
    """The ``TargetInfo`` of an energy trained with its forces but not its
    stress, with the strain gradient added; ``None`` for any other target.

    A training step evaluated with it computes the strain gradient in the same
    backward pass as the forces, from which :py:func:`lie_from_step_gradients`
    takes the energy's Lie derivatives of periodic structures (whose energies
    also depend on the orientation of their cells) at almost no cost.
    """
    from metatrain.utils.data import TargetInfo

    if not is_energy(info) or info.gradients != ["positions"]:
        return None
    block = info.layout.block().copy()
    device = block.values.device
    strain = TensorBlock(
        values=torch.empty(0, 3, 3, len(block.properties), dtype=block.values.dtype),
        samples=Labels(["sample"], torch.empty((0, 1), dtype=torch.int32)),
        components=[Labels.range("xyz_1", 3), Labels.range("xyz_2", 3)],
        properties=block.properties.to("cpu"),
    )
    block.add_gradient("strain", strain.to(device))
    return TargetInfo(
        layout=TensorMap(info.layout.keys, [block]),
        quantity=info.quantity,
        unit=info.unit,
        description=info.description,
    )


def lie_from_step_gradients(
    step: TrainingStep, name: str, energy: TensorMap
) -> Optional[torch.Tensor]:
    """``(3, n_values)`` Lie derivatives of an energy from the gradients the step
    computed, in the units of the loss; ``None`` when it computed none that
    suffice (a periodic structure needs the strain gradient: its energy also
    depends on the orientation of the cell; see :py:func:`with_strain_gradient`).

    In metatrain's convention (positions ``r @ (1 + e)``), a rotation
    ``1 + t G`` is the strain ``e = t G^T``: ``L_k E = sum_ab S_ab (G_k)_ba`` for
    the strain gradient ``S``, and ``sum_i g_i . G_k r_i`` for the position
    gradients ``g`` of a structure without cell.
    """
    from .generators import so3_generators

    if not is_energy(step.targets[name]):
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


def reverse_lie_derivatives(
    step: TrainingStep,
    energies: dict[str, set[Optional[str]]],
    create_graph: bool,
    directions: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """Lie derivatives of energies and their gradients, from derivatives with
    respect to the angles ``a`` of a rotation ``R = I + sum_k a_k G_k`` of one
    copy of the batch, at ``a = 0``; along ``directions`` (``(n_systems, 3)``
    unit vectors) when given, as the single row ``sqrt(3) L_n``, whose gradients
    take one backward pass instead of three.

    The copy's positions are ``R (1 + e)^T r`` for leaf positions ``r`` and a
    zero strain ``e`` (metatrain's convention, ``r @ (1 + e)``), so that the
    derivatives with respect to ``r`` and ``e`` are the back-rotated forces and
    stress of the rotated copy; their derivatives with respect to ``a_k`` are
    those of ``L_k E = dE/da_k`` with respect to ``r`` and ``e``.
    """
    gradients = set().union(*energies.values()) - {None}
    with torch.enable_grad(), differentiable_attention():
        angles, copies, strains, leaves = rotated_by_angles(step, gradients)
        infos = requested_targets(step.targets, {name: set() for name in energies})
        raw = raw_predictions(step, copies, infos)
        inputs = {"positions": leaves, "strain": [strains]}
        lie = {}
        for name, wanted in energies.items():
            maps = _energy_lie_maps(
                raw[name], angles, inputs, wanted - {None}, create_graph, directions
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
    directions: Optional[torch.Tensor] = None,
) -> list[TensorMap]:
    """For each generator ``k`` (or the one row ``sqrt(3) L_n E`` along
    ``directions``), a map with the metadata of ``energy`` (one block, one row
    per system, in order) whose values are ``L_k E`` and whose ``gradients`` are
    the derivatives of ``L_k E`` with respect to ``inputs``."""
    block = energy.block()
    values = block.values
    order = torch.arange(len(values), device=values.device)
    if not bool(torch.equal(block.samples.column("system").to(order), order)):
        raise ValueError("an energy must have one row per system, in order")
    per_property = []
    for index in range(values.shape[-1]):
        # L_k E is differentiated again for the gradients: keep its graph then
        lie = derivative(
            values[:, index].sum(), [angles], create_graph or bool(gradients)
        )[0]
        if directions is not None:
            along = (lie * directions.to(lie)).sum(dim=1, keepdim=True)
            lie = math.sqrt(3.0) * along
        derivatives = [
            _lie_gradients(lie[:, k], inputs, gradients, create_graph)
            for k in range(lie.shape[1])
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
        for k in range(per_property[0][0].shape[1])
    ]


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
    derivatives = iter(derivative(lie.sum(), tensors, create_graph))
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
    """``(n_rows, n_values)`` per label of ``wanted``, from the maps of
    :py:func:`_energy_lie_maps` in the units of the loss."""
    flattened = {}
    for gradient in wanted:
        parts = [
            (m.block() if gradient is None else m.block().gradient(gradient)).values
            for m in maps
        ]
        flattened[loss_label(name, gradient)] = torch.stack(
            [part.reshape(-1) for part in parts]
        )
    return flattened
