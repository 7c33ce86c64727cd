"""Lie derivatives of a model's outputs on a batch of structures, from one model
call on a few copies of each structure.

For an output ``f`` and a generator ``G_k``, the Lie derivative is
``L_k f(x) = d/dt [rho(exp(-t G_k)) f(exp(t G_k) x)]`` at ``t = 0``, that is
``D_k f - d rho(G_k) f`` with ``D_k f = d/dt f(exp(t G_k) x)``. Three ways give
``D_k f``:

* forward mode (:py:func:`forward_derivatives`): the copies are rotated by a
  dual matrix, identity plus ``t G_k``, so that positions, cell and neighbour
  vectors carry their tangents through the model (three copies, one per
  generator, in one call);
* double backward (:py:func:`backward_derivatives`), for models with operations
  that have no forward-mode formula: ``D_k f = J [G_k^T]`` for the Jacobian ``J``
  of ``f`` with respect to a strain ``epsilon`` of the structure, since rotating
  by ``exp(t G)`` is straining by ``t G^T`` to first order; ``J v`` is the
  gradient with respect to ``u`` of ``<J^T u, v>``;
* the energy and its derivatives (:py:func:`energy_derivatives`):
  ``L_k E = <dE/d epsilon, G_k^T>``, a first derivative, and ``L_k F = -d(L_k
  E)/dx``, ``L_k sigma = (1/V) d(L_k E)/d epsilon + sigma G_k``, second ones.

Every copy list also holds the inverted structure, whose outputs give the parity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as forward_ad
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import ModelOutput, System
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..copies import PreparedSystem, rotated_copies
from ..engine import BlockChunk, split_by_copy
from ..generators import (
    apply_generator,
    lacks_forward_mode,
    so3_generators,
    split_dual,
)
from ..irreps import block_layout
from ..models import LoadedModel


__all__ = [
    "BlockDerivatives",
    "ForwardModeUnsupported",
    "backward_derivatives",
    "energy_derivatives",
    "forward_derivatives",
]


@dataclass
class BlockDerivatives:
    """One output block on one structure."""

    chunk: BlockChunk
    """the block's metadata; its ``values`` are ``(1, n_samples, *components,
    n_properties)``, the output on the structure"""
    inverted: torch.Tensor
    """``(n_samples, *components, n_properties)``, the output on the structure
    with every position (and the cell) negated"""
    lie: torch.Tensor
    """``(3, n_samples, *components, n_properties)``, ``L_k f`` for ``k = x, y,
    z``"""


Derivatives = dict[str, tuple[Labels, list[list[BlockDerivatives]]]]
"""per output name: its keys, and per structure the derivatives of every block"""


class ForwardModeUnsupported(RuntimeError):
    """The model has an operation without a forward-mode derivative."""


def forward_derivatives(
    model: LoadedModel, prepared: Sequence[PreparedSystem], requests: dict
) -> Derivatives:
    """Lie derivatives by forward-mode differentiation: three copies of each
    structure (one per generator) in one model call on dual inputs, and the
    inverted structures in a plain call (a dual input costs several times more).

    :raise ForwardModeUnsupported: when an operation of the model has no
        forward-mode formula
    """
    eye = torch.eye(3, dtype=model.dtype, device=model.device)
    generators = so3_generators(model.dtype, model.device)
    try:
        # PyTorch's fused attention kernels have no forward-mode formula; the
        # reference (math) kernel computes the same function with ones that do
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), forward_ad.dual_level():
            rotations = forward_ad.make_dual(torch.stack([eye] * 3), generators)
            systems = [c for p in prepared for c in rotated_copies(p, rotations)[0]]
            results = model(systems, requests, None)
            maps = {name: split_dual(results[name]) for name in requests}
    except (RuntimeError, NotImplementedError) as error:
        if lacks_forward_mode(error):
            raise ForwardModeUnsupported(str(error)) from error
        raise
    with torch.no_grad():
        inverted = [c for p in prepared for c in rotated_copies(p, -eye[None])[0]]
        inverted_results = model(inverted, requests, None)
    derivatives: Derivatives = {}
    for name, (values, tangents) in maps.items():
        keys, value_chunks = split_by_copy(values, [3] * len(prepared), name)
        _, tangent_chunks = split_by_copy(tangents, [3] * len(prepared), name)
        _, inverted_chunks = split_by_copy(
            _detached(inverted_results[name]), [1] * len(prepared), name
        )
        derivatives[name] = (
            keys,
            [
                [
                    _block_derivatives(
                        name, keys, index, chunk, inverse.values[0], tangent.values
                    )
                    for index, (chunk, inverse, tangent) in enumerate(
                        zip(*structure, strict=True)
                    )
                ]
                for structure in zip(
                    value_chunks, inverted_chunks, tangent_chunks, strict=True
                )
            ],
        )
    return derivatives


def backward_derivatives(
    model: LoadedModel, prepared: Sequence[PreparedSystem], requests: dict
) -> Derivatives:
    """Lie derivatives by double backward through a strain of each structure:
    two copies of each (the structure and the inverted one) in one model call,
    then one backward pass and three double-backward ones."""
    eye = torch.eye(3, dtype=model.dtype, device=model.device)
    generators = so3_generators(model.dtype, model.device)
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        systems, strains = _differentiable_copies(prepared, eye)
        results = model(systems, requests, None)
        blocks = [(n, b) for n in requests for b in results[n].blocks()]
        probes = [torch.zeros_like(b.values, requires_grad=True) for _, b in blocks]
        total = sum(
            (b.values * u).sum() for (_, b), u in zip(blocks, probes, strict=True)
        )
        # the first copy of each structure is the one the tangents are taken at
        gradients = _gradients(total, strains[0::2], create_graph=True)
        tangents = []
        for k in range(3):
            contraction = sum((g * generators[k].T).sum() for g in gradients)
            tangents.append(_gradients(contraction, probes, retain_graph=k < 2))
    derivatives: Derivatives = {}
    counts = [2] * len(prepared)
    for name in requests:
        values = _detached(results[name])
        keys, value_chunks = split_by_copy(values, counts, name)
        indices = [i for i, (n, _) in enumerate(blocks) if n == name]
        per_generator = [
            split_by_copy(_with_values(values, [t[i] for i in indices]), counts, name)
            for t in tangents
        ]
        per_structure = []
        for position, value_blocks in enumerate(value_chunks):
            entries = []
            for index, chunk in enumerate(value_blocks):
                derivative = torch.stack(
                    [g[1][position][index].values[0] for g in per_generator]
                )
                entries.append(
                    _block_derivatives(
                        name, keys, index, chunk, chunk.values[1], derivative
                    )
                )
            per_structure.append(entries)
        derivatives[name] = (keys, per_structure)
    return derivatives


def energy_derivatives(
    model: LoadedModel,
    prepared: Sequence[PreparedSystem],
    names: Sequence[str],
    request: ModelOutput,
) -> tuple[Derivatives, list[dict[str, torch.Tensor]]]:
    """Lie derivatives of the energy, the forces and the stress, from the energy
    of two copies of each structure (it and the inverted one).

    :param names: which of ``"energy"``, ``"forces"`` and ``"stress"`` to return;
        the last two need second derivatives
    :param request: the energy's request
    :return: the derivatives, and per structure its ``"forces"`` ``(n_atoms, 3)``
        and ``"strain_gradient"`` ``dE/d epsilon`` ``(3, 3)``, detached
    """
    eye = torch.eye(3, dtype=model.dtype, device=model.device)
    generators = so3_generators(model.dtype, model.device)
    second_order = "forces" in names or "stress" in names
    n = len(prepared)
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        systems, leaves = _differentiable_copies(prepared, eye, strains_only=False)
        energy = model(systems, {"energy": request}, None)["energy"]
        total = sum(block.values.sum() for block in energy.blocks())
        positions = [x for x, _ in leaves]
        strains = [e for _, e in leaves]
        gradients = _gradients(total, positions + strains, create_graph=second_order)
        position_gradients, strain_gradients = gradients[: 2 * n], gradients[2 * n :]
        # L_k E of each structure (its first copy), a function of x and epsilon
        lie_energy = torch.stack(
            [
                torch.stack([(strain_gradients[2 * i] * g.T).sum() for g in generators])
                for i in range(n)
            ]
        )
        second = []
        if second_order:
            identity = positions[0::2] + strains[0::2]
            for k in range(3):
                second.append(
                    _gradients(lie_energy[:, k].sum(), identity, retain_graph=k < 2)
                )
    energy = _detached(energy)
    keys, energy_chunks = split_by_copy(energy, [2] * n, "energy")
    derivatives: Derivatives = {}
    raw = [
        {
            "forces": -position_gradients[2 * i].detach(),
            "strain_gradient": strain_gradients[2 * i].detach(),
        }
        for i in range(n)
    ]
    if "energy" in names:
        derivatives["energy"] = (
            keys,
            [
                [
                    BlockDerivatives(
                        _first_copy(chunk),
                        chunk.values[1],
                        lie_energy[i].detach().view(3, *chunk.values.shape[1:]),
                    )
                ]
                for i, (chunk,) in enumerate(energy_chunks)
            ],
        )
    properties = energy.block(0).properties
    if "forces" in names:
        derivatives["forces"] = _force_derivatives(
            raw, position_gradients, second, properties
        )
    if "stress" in names:
        volumes = [torch.abs(torch.det(s.cell.detach())) for s in systems[0::2]]
        derivatives["stress"] = _stress_derivatives(
            raw, strain_gradients, second, volumes, properties, generators
        )
    return derivatives, raw


def _force_derivatives(raw, position_gradients, second, properties):
    n = len(raw)
    entries = []
    for i in range(n):
        forces = raw[i]["forces"]
        atoms = torch.arange(len(forces), dtype=torch.int32).view(-1, 1)
        chunk = BlockChunk(
            values=forces.view(1, -1, 3, 1),
            sample_names=["atom"],
            sample_values=atoms.to(forces.device),
            components=[Labels.range("xyz", 3).to(forces.device)],
            properties=properties,
        )
        inverted = -position_gradients[2 * i + 1].detach().view(-1, 3, 1)
        lie = torch.stack([-second[k][i].detach() for k in range(3)])
        entries.append([BlockDerivatives(chunk, inverted, lie.view(3, -1, 3, 1))])
    keys = Labels.single().to(properties.values.device)
    return keys, entries


def _stress_derivatives(raw, strain_gradients, second, volumes, properties, gens):
    n = len(raw)
    entries = []
    device = properties.values.device
    for i in range(n):
        stress = raw[i]["strain_gradient"] / volumes[i]
        chunk = BlockChunk(
            values=stress.view(1, 1, 3, 3, 1),
            sample_names=[],
            sample_values=torch.zeros(1, 0, dtype=torch.int32, device=device),
            components=[
                Labels.range("xyz_1", 3).to(device),
                Labels.range("xyz_2", 3).to(device),
            ],
            properties=properties,
        )
        inverted = strain_gradients[2 * i + 1].detach() / volumes[i]
        lie = torch.stack(
            [
                second[k][n + i].detach() / volumes[i] + stress @ gens[k]
                for k in range(3)
            ]
        )
        entries.append(
            [
                BlockDerivatives(
                    chunk, inverted.view(1, 3, 3, 1), lie.view(3, 1, 3, 3, 1)
                )
            ]
        )
    return Labels.single().to(device), entries


def _block_derivatives(
    name: str,
    keys: Labels,
    index: int,
    chunk: BlockChunk,
    inverted: torch.Tensor,
    derivative: torch.Tensor,
) -> BlockDerivatives:
    """``L_k f = D_k f - d rho(G_k) f`` from the derivatives ``D_k f``
    (``derivative``, ``(3, n_samples, ...)``), with the values of the inverted
    copy (``(n_samples, ...)``)."""
    layout = block_layout(name, keys.names, keys.values[index], chunk.components)
    values = chunk.values[0]
    generators = so3_generators(values.dtype, values.device)
    lie = torch.stack(
        [
            derivative[k] - apply_generator(values, layout, generators[k])
            for k in range(3)
        ]
    )
    return BlockDerivatives(_first_copy(chunk), inverted, lie)


def _first_copy(chunk: BlockChunk) -> BlockChunk:
    return BlockChunk(
        values=chunk.values[:1],
        sample_names=chunk.sample_names,
        sample_values=chunk.sample_values,
        components=chunk.components,
        properties=chunk.properties,
    )


def _differentiable_copies(
    prepared: Sequence[PreparedSystem], eye: torch.Tensor, strains_only: bool = True
) -> tuple[list[System], list]:
    """Each structure and its inversion, differentiable with respect to their
    positions and a strain.

    :return: the copies, and the strain of each copy (``strains_only``) or its
        ``(positions, strain)`` leaves
    """
    systems: list[System] = []
    leaves = []
    for system in prepared:
        copies, copy_leaves = rotated_copies(
            system, torch.stack([eye, -eye]), differentiable=True
        )
        systems.extend(copies)
        leaves.extend(copy_leaves)
    if strains_only:
        return systems, [strain for _, strain in leaves]
    return systems, leaves


def _gradients(
    output, inputs: list[torch.Tensor], create_graph=False, retain_graph=None
) -> list[torch.Tensor]:
    """``torch.autograd.grad`` with zeros for inputs the output does not depend
    on (and for an output that depends on none)."""
    if not isinstance(output, torch.Tensor) or output.grad_fn is None:
        return [torch.zeros_like(tensor) for tensor in inputs]
    gradients = torch.autograd.grad(
        output,
        inputs,
        create_graph=create_graph,
        retain_graph=retain_graph,
        allow_unused=True,
    )
    return [
        torch.zeros_like(tensor) if gradient is None else gradient
        for tensor, gradient in zip(inputs, gradients, strict=True)
    ]


def _detached(tensor: TensorMap) -> TensorMap:
    return _with_values(tensor, [block.values.detach() for block in tensor.blocks()])


def _with_values(tensor: TensorMap, values: list[torch.Tensor]) -> TensorMap:
    """A map with the metadata of ``tensor`` and the given block values."""
    return TensorMap(
        tensor.keys,
        [
            TensorBlock(
                values=value,
                samples=block.samples,
                components=block.components,
                properties=block.properties,
            )
            for block, value in zip(tensor.blocks(), values, strict=True)
        ],
    )
