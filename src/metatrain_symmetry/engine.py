"""Evaluate a model on many rotated copies of many structures, in large batches.

The engine turns each input structure into ready-to-rotate tensors once
(positions, cell and neighbour-list vectors), then streams over
``(structure, grid element)`` pairs: every model call receives up to
``batch_size`` rotated copies, possibly of several structures, built by rotating
the stored tensors directly (neighbour lists are rotated, never recomputed). The
outputs of each call are cut back into per-structure chunks of shape
``(n_copies, n_samples, *components, n_properties)`` and handed to the consumer,
so only one batch of model outputs is alive at any time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import metatensor.torch as mts
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import ModelOutput, System

from ._utils import is_integer, progress_bar
from .copies import PreparedSystem, prepare_rotations, rotated_copies
from .grid import O3Grid
from .models import LoadedModel
from .quantities import DERIVED_OUTPUTS


__all__ = [
    "CPU_ATOMS_PER_BATCH",
    "DEFAULT_ATOMS_PER_BATCH",
    "default_atoms_per_batch",
    "BlockChunk",
    "OutputChunk",
    "RotatedEvaluator",
    "StructureChunk",
    "batch_segments",
    "check_periodic",
    "split_by_copy",
]


DEFAULT_ATOMS_PER_BATCH = 4096
"""atoms (over all evaluations) of one model call on a GPU when no batch size is
given"""

CPU_ATOMS_PER_BATCH = 1024
"""the same on a CPU, where larger calls are slower per atom: the O(3) average of
a small PET on a 192-atom water box (48 copies, 2 cores) took 3.9 s a step in
calls of 2 to 8 copies and 6.1 to 6.7 s in calls of 12 to 21"""


def default_atoms_per_batch(device: torch.device | str) -> int:
    """Atoms of one model call on ``device`` when no batch size is given."""
    if torch.device(device).type == "cpu":
        return CPU_ATOMS_PER_BATCH
    return DEFAULT_ATOMS_PER_BATCH


@dataclass
class BlockChunk:
    """The values of one output block for some rotated copies of one structure."""

    values: torch.Tensor
    """``(n_copies, n_samples, *components, n_properties)``"""
    sample_names: list[str]
    """sample names without ``"system"``"""
    sample_values: torch.Tensor
    """``(n_samples, len(sample_names))`` sample labels (same for every copy)"""
    components: list[Labels]
    properties: Labels


@dataclass
class OutputChunk:
    keys: Labels
    blocks: list[BlockChunk]


@dataclass
class StructureChunk:
    """Model outputs for some rotated copies of one structure."""

    structure: int
    """index of the structure in the input list"""
    rotations: torch.Tensor
    """``(n_copies,)`` indices into the grid of the rotations in this chunk"""
    outputs: dict[str, OutputChunk]


class RotatedEvaluator:
    """Stream a model's outputs over rotated copies of structures.

    :param model: the model to evaluate
    :param grid: the rotations (and their order) applied to every structure
    :param batch_size: number of rotated copies per model call; by default as many
        as fit in :py:func:`default_atoms_per_batch` atoms, counting every
        evaluation a symmetrized model makes of its underlying model
        (:py:attr:`~metatrain_symmetry.models.LoadedModel.evaluations_per_structure`)
    """

    def __init__(
        self,
        model: LoadedModel,
        grid: O3Grid,
        batch_size: int | None = None,
    ):
        if batch_size is not None and (not is_integer(batch_size) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        self.model = model
        self.grid = grid
        self.batch_size = batch_size
        self._rotations = grid.rotations.to(dtype=model.dtype, device=model.device)

    def copies_per_batch(self, systems: Sequence[System]) -> int:
        if self.batch_size is not None:
            return self.batch_size
        largest = max(max(len(system), 1) for system in systems)
        cost = largest * self.model.evaluations_per_structure
        return max(1, default_atoms_per_batch(self.model.device) // cost)

    def stream(
        self,
        systems: list[System],
        outputs: dict[str, ModelOutput],
        progress: bool = False,
    ) -> Iterator[StructureChunk]:
        """Yield per-structure chunks of outputs, structure by structure and, for
        each structure, in grid order.

        :param systems: prepared systems (see :py:func:`prepare_systems`)
        :param outputs: the outputs to request from the model
        :param progress: announce the workload and show a progress bar
        """
        n_rotations = len(self.grid)
        per_batch = self.copies_per_batch(systems)
        prepared = [prepare_rotations(system) for system in systems]
        derived = [name for name in outputs if name in DERIVED_OUTPUTS]
        if "stress" in derived:
            check_periodic(systems)
        requests = {n: o for n, o in outputs.items() if n not in DERIVED_OUTPUTS}
        if len(derived) != 0 and "energy" not in requests:
            requests["energy"] = ModelOutput(sample_kind="system")

        batches = batch_segments(len(systems), n_rotations, per_batch)
        with progress_bar(systems, n_rotations, "rotated copies", progress) as bar:
            for segments in batches:
                results = self._evaluate(prepared, segments, requests, derived)
                copy_counts = [last - first for _, first, last in segments]
                split = {
                    name: split_by_copy(results[name], copy_counts, name)
                    for name in outputs
                }
                for index, (structure, first, last) in enumerate(segments):
                    yield StructureChunk(
                        structure=structure,
                        rotations=torch.arange(first, last),
                        outputs={
                            name: OutputChunk(split[name][0], split[name][1][index])
                            for name in outputs
                        },
                    )
                bar.update(
                    sum(
                        len(systems[structure]) * (last - first)
                        for structure, first, last in segments
                    )
                )

    def _evaluate(
        self,
        prepared: list[PreparedSystem],
        segments: list[tuple[int, int, int]],
        requests: dict[str, ModelOutput],
        derived: list[str],
    ) -> dict[str, TensorMap]:
        """The outputs of one batch of rotated copies, without gradients.

        Derived outputs need gradients with respect to positions and strain;
        the others are evaluated in inference mode. The mode is entered here,
        not around the stream: a generator that yields inside a ``with`` block
        leaves its mode set for the caller's code until it resumes.
        """
        context = torch.enable_grad() if derived else torch.inference_mode()
        with context:
            batch_systems: list[System] = []
            leaves: list[tuple[torch.Tensor, torch.Tensor]] = []
            for structure, first, last in segments:
                copies, copy_leaves = rotated_copies(
                    prepared[structure],
                    self._rotations[first:last],
                    differentiable=len(derived) != 0,
                )
                batch_systems.extend(copies)
                leaves.extend(copy_leaves)
            results = self.model(batch_systems, requests, None)
            missing = [name for name in requests if name not in results]
            if missing:
                raise ValueError(f"the model did not return the outputs {missing}")
            if len(derived) == 0:
                return results
            results.update(_energy_derivatives(results, batch_systems, leaves, derived))
            return {name: mts.detach(results[name]) for name in results}


def batch_segments(
    n_structures: int, n_rotations: int, per_batch: int
) -> Iterator[list[tuple[int, int, int]]]:
    """Cut the ``n_structures * n_rotations`` rotated copies, structure by
    structure and in grid order, into batches of ``per_batch`` copies.

    :return: per batch, its ``(structure, first rotation, last rotation)``
        segments (``last`` excluded)
    """
    total = n_structures * n_rotations
    for start in range(0, total, per_batch):
        stop = min(start + per_batch, total)
        segments = []
        position = start
        while position < stop:
            structure, first = divmod(position, n_rotations)
            last = min(n_rotations, first + stop - position)
            segments.append((structure, first, last))
            position += last - first
        yield segments


def check_periodic(systems: Sequence[System]) -> None:
    """Refuse non-periodic structures when the stress is requested."""
    for index, system in enumerate(systems):
        if not bool(torch.all(system.pbc)) or float(torch.det(system.cell)) == 0.0:
            raise ValueError(
                f"stress needs periodic structures with a cell, but structure "
                f"{index} is not periodic in all three directions; leave 'stress' "
                "out for molecules and slabs"
            )


def _energy_derivatives(
    results: dict[str, TensorMap],
    systems: list[System],
    leaves: list[tuple[torch.Tensor, torch.Tensor]],
    derived: list[str],
) -> dict[str, TensorMap]:
    """Forces and stress of every system, from the gradient of the total energy.

    The copies are independent, so one backward pass of the summed energy gives
    the derivatives of each copy's energy with respect to its own positions and
    strain. The model sees ``positions @ (1 + strain)`` with a zero strain, so the
    gradient with respect to the leaf positions is the force.
    """
    energy = results["energy"]
    total = sum(block.values.sum() for block in energy.blocks())
    inputs: list[torch.Tensor] = []
    if "forces" in derived:
        inputs += [positions for positions, _ in leaves]
    if "stress" in derived:
        inputs += [strain for _, strain in leaves]
    gradients = torch.autograd.grad(total, inputs, allow_unused=True)
    gradients = [
        torch.zeros_like(tensor) if gradient is None else gradient
        for tensor, gradient in zip(inputs, gradients, strict=True)
    ]
    properties = energy.block(0).properties
    device = energy.block(0).values.device
    derivatives: dict[str, TensorMap] = {}
    if "forces" in derived:
        forces = torch.cat(gradients[: len(systems)]).neg()
        samples = torch.cat(
            [
                torch.stack(
                    [
                        torch.full((len(system),), index, dtype=torch.int32),
                        torch.arange(len(system), dtype=torch.int32),
                    ],
                    dim=1,
                )
                for index, system in enumerate(systems)
            ]
        )
        derivatives["forces"] = TensorMap(
            Labels.single().to(device),
            [
                TensorBlock(
                    values=forces.detach().unsqueeze(-1),
                    samples=Labels(["system", "atom"], samples.to(device)),
                    components=[Labels.range("xyz", 3).to(device)],
                    properties=properties,
                )
            ],
        )
    if "stress" in derived:
        strain_gradients = torch.stack(gradients[-len(systems) :])
        volumes = torch.stack(
            [torch.abs(torch.det(system.cell.detach())) for system in systems]
        )
        stress = strain_gradients / volumes.view(-1, 1, 1)
        derivatives["stress"] = TensorMap(
            Labels.single().to(device),
            [
                TensorBlock(
                    values=stress.detach().unsqueeze(-1),
                    samples=Labels.range("system", len(systems)).to(device),
                    components=[
                        Labels.range("xyz_1", 3).to(device),
                        Labels.range("xyz_2", 3).to(device),
                    ],
                    properties=properties,
                )
            ],
        )
    return derivatives


def split_by_copy(tensor: TensorMap, copy_counts: list[int], name: str):
    """Cut every block of a batched output (``copy_counts[i]`` copies of one
    structure in consecutive segment ``i``; ``name`` for errors) into chunks.

    :return: the output keys, and for each segment the list of its block chunks
    """
    n_segments = len(copy_counts)
    per_segment: list[list[BlockChunk]] = [[] for _ in range(n_segments)]
    n_copies = sum(copy_counts)
    for block in tensor.blocks():
        if len(block.gradients_list()) != 0:
            raise ValueError(
                f"output '{name}' carries explicit gradients, which are not supported"
            )
        samples = block.samples
        names = list(samples.names)
        if "system" not in names:
            raise ValueError(f"output '{name}' has no 'system' sample dimension")
        column = names.index("system")
        copy_index = samples.values[:, column].to(torch.long)
        values = block.values
        if bool(torch.any(copy_index[1:] < copy_index[:-1])):
            order = torch.argsort(copy_index, stable=True)
            copy_index = copy_index[order]
            values = values[order]
            sample_values = samples.values[order]
        else:
            sample_values = samples.values
        other_columns = [i for i in range(len(names)) if i != column]
        other_names = [names[i] for i in other_columns]
        rows_per_copy = torch.bincount(copy_index, minlength=n_copies)

        row = 0
        copy = 0
        for segment, count in enumerate(copy_counts):
            rows = rows_per_copy[copy : copy + count]
            n_rows = int(rows[0])
            if bool(torch.any(rows != n_rows)):
                raise ValueError(
                    f"output '{name}' has a different number of samples for "
                    "different rotations of the same structure"
                )
            chunk_values = values[row : row + count * n_rows]
            chunk_samples = sample_values[row : row + count * n_rows][:, other_columns]
            chunk_samples = chunk_samples.reshape(count, n_rows, len(other_columns))
            if not bool(torch.all(chunk_samples == chunk_samples[:1])):
                raise ValueError(
                    f"output '{name}' has different samples for different rotations "
                    "of the same structure"
                )
            per_segment[segment].append(
                BlockChunk(
                    values=chunk_values.reshape(count, n_rows, *values.shape[1:]),
                    sample_names=other_names,
                    sample_values=chunk_samples[0],
                    components=block.components,
                    properties=block.properties,
                )
            )
            row += count * n_rows
            copy += count
    return tensor.keys, per_segment
