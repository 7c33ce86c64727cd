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
from typing import Union

import torch
from metatensor.torch import Labels, TensorBlock
from metatomic.torch import (
    ModelOutput,
    System,
    systems_to_torch,
    unit_conversion_factor,
)
from metatomic.torch.o3 import O3Transformations

from .grid import O3Grid
from .models import LoadedModel


# default number of atoms evaluated in one model call, over all rotated copies
DEFAULT_ATOMS_PER_BATCH = 4096

SystemLike = Union[System, "ase.Atoms"]  # noqa: F821


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


@dataclass
class _PreparedSystem:
    positions: torch.Tensor
    cell: torch.Tensor
    types: torch.Tensor
    pbc: torch.Tensor
    neighbors: list[tuple[object, TensorBlock]]
    data: dict[str, object]


def prepare_systems(systems: Sequence[SystemLike], model: LoadedModel) -> list[System]:
    """Convert ``ase.Atoms`` or ``System`` inputs to the model's dtype, device and
    length unit, with the neighbour lists the model requests attached."""
    if is_system(systems) or not isinstance(systems, (list, tuple)):
        systems = [systems]
    dtype, device = model.dtype, model.device
    prepared: list[System] = []
    for index, system in enumerate(systems):
        if is_system(system):
            system = system.to(dtype=dtype, device=device)
        else:
            try:
                system = systems_to_torch(system, dtype=dtype, device=device)
            except Exception as error:
                raise TypeError(
                    f"structure {index} is a {type(system).__name__}; pass ase.Atoms "
                    "or metatomic System objects"
                ) from error
            factor = unit_conversion_factor("angstrom", model.length_unit)
            if factor != 1.0:
                system = System(
                    types=system.types,
                    positions=system.positions * factor,
                    cell=system.cell * factor,
                    pbc=system.pbc,
                )
        prepared.append(system)
    model.check_systems(prepared)
    attach_neighbor_lists(model, prepared)
    return prepared


def is_system(value) -> bool:
    """Whether ``value`` is a metatomic ``System`` (a TorchScript class)."""
    return isinstance(value, torch.ScriptObject) and hasattr(
        value, "known_neighbor_lists"
    )


def attach_neighbor_lists(model: LoadedModel, systems: list[System]) -> None:
    """Compute the neighbour lists ``model`` requests that ``systems`` lack."""
    from vesin.metatomic import NeighborList

    for options in model.requested_neighbor_lists():
        calculator = None
        for system in systems:
            if any(options == known for known in system.known_neighbor_lists()):
                continue
            if calculator is None:
                calculator = NeighborList(options, model.length_unit, skin=0.0)
            system.add_neighbor_list(options, calculator.compute(system))


class RotatedEvaluator:
    """Stream a model's outputs over rotated copies of structures.

    :param model: the model to evaluate
    :param grid: the rotations (and their order) applied to every structure
    :param batch_size: number of rotated copies per model call; by default as many
        as fit in about 4096 atoms
    """

    def __init__(
        self,
        model: LoadedModel,
        grid: O3Grid,
        batch_size: int | None = None,
    ):
        if batch_size is not None and (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, int)
            or batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        self.model = model
        self.grid = grid
        self.batch_size = batch_size
        self._rotations = grid.rotations.to(dtype=model.dtype, device=model.device)

    def copies_per_batch(self, systems: Sequence[System]) -> int:
        if self.batch_size is not None:
            return self.batch_size
        largest = max(max(len(system), 1) for system in systems)
        return max(1, DEFAULT_ATOMS_PER_BATCH // largest)

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
        :param progress: show a progress bar over model calls
        """
        n_rotations = len(self.grid)
        per_batch = self.copies_per_batch(systems)
        total = len(systems) * n_rotations
        prepared = [_prepare(system) for system in systems]

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="copy", desc="rotated copies")

        with torch.inference_mode():
            for start in range(0, total, per_batch):
                stop = min(start + per_batch, total)
                # (structure, first rotation, last rotation) segments of this batch
                segments = []
                position = start
                while position < stop:
                    structure, first = divmod(position, n_rotations)
                    last = min(n_rotations, first + stop - position)
                    segments.append((structure, first, last))
                    position += last - first

                batch_systems: list[System] = []
                for structure, first, last in segments:
                    batch_systems.extend(
                        _rotated_copies(
                            prepared[structure], self._rotations[first:last]
                        )
                    )
                results = self.model(batch_systems, outputs, None)
                missing = [name for name in outputs if name not in results]
                if missing:
                    raise ValueError(f"the model did not return the outputs {missing}")

                copy_counts = [last - first for _, first, last in segments]
                split = {
                    name: _split_by_copy(results[name], copy_counts, name)
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
                if bar is not None:
                    bar.update(stop - start)
        if bar is not None:
            bar.close()


def _prepare(system: System) -> _PreparedSystem:
    neighbors = []
    for options in system.known_neighbor_lists():
        neighbors.append((options, system.get_neighbor_list(options)))
    data = {name: system.get_data(name) for name in system.known_data()}
    return _PreparedSystem(
        positions=system.positions.detach(),
        cell=system.cell.detach(),
        types=system.types,
        pbc=system.pbc,
        neighbors=neighbors,
        data=data,
    )


def _rotated_copies(system: _PreparedSystem, rotations: torch.Tensor) -> list[System]:
    """One rotated ``System`` per matrix in ``rotations`` (``(n, 3, 3)``)."""
    transposed = rotations.transpose(1, 2)
    positions = system.positions.unsqueeze(0) @ transposed
    cells = system.cell.unsqueeze(0) @ transposed
    vectors = [
        neighbors.values.squeeze(-1).unsqueeze(0) @ transposed
        for _, neighbors in system.neighbors
    ]
    copies = []
    for index in range(rotations.shape[0]):
        rotated = System(
            types=system.types,
            positions=positions[index],
            cell=cells[index],
            pbc=system.pbc,
        )
        for (options, neighbors), rotated_vectors in zip(
            system.neighbors, vectors, strict=True
        ):
            rotated.add_neighbor_list(
                options,
                TensorBlock(
                    values=rotated_vectors[index].unsqueeze(-1),
                    samples=neighbors.samples,
                    components=neighbors.components,
                    properties=neighbors.properties,
                ),
            )
        for name, data in system.data.items():
            rotated.add_data(name, _rotate_data(data, rotations[index : index + 1]))
        copies.append(rotated)
    return copies


def _rotate_data(data, rotation: torch.Tensor):
    if all(len(block.components) == 0 for block in data.blocks()):
        return data
    return O3Transformations(rotation, 8).transform_tensormap(data)


def _split_by_copy(tensor, copy_counts: list[int], name: str):
    """Cut every block of a batched output into per-structure chunks.

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
            chunk_samples = chunk_samples.reshape(count, n_rows, -1)
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
