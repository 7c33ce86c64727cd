"""The one streaming pass that training and validation share: every term's
design on rotated copies of a set of structures, handed to accumulators."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from ..grid import O3Grid
from ..models import LoadedModel
from ..systems import prepare_systems
from .data import StructureInfo, structure_infos
from .designs import DesignStream
from .forces import ForceStream
from .targets import Target


class Accumulator(Protocol):
    """What a pass feeds with the designs of one term."""

    def add(
        self,
        structure: int,
        info: StructureInfo,
        indices: torch.Tensor,
        rotations: torch.Tensor,
        design: torch.Tensor,
        offset: torch.Tensor,
    ) -> None: ...


def design_pass(
    model: LoadedModel,
    grid: O3Grid,
    targets: list[Target],
    frames: Sequence,
    accumulators: dict[str, Accumulator],
    batch_size: int | None,
    progress: bool,
) -> None:
    """One streaming pass over the unrotated structures and their copies rotated by
    ``grid``, handing every term's design to ``accumulators[term name]``.

    Designs have shape ``(n_copies, n_samples, *components, n_properties, P)``
    and offsets ``(n_copies, n_samples, *components, n_properties)``; copy index 0
    is the unrotated structure, index ``k > 0`` the grid's element ``k - 1``.
    """
    systems = prepare_systems(list(frames), model)
    infos = structure_infos(model, systems, targets)
    streams: list = [
        DesignStream(model, grid, targets, systems, infos, batch_size, progress)
    ]
    force_terms = [t.forces for t in targets if t.forces is not None]
    if len(force_terms) != 0:
        streams.append(
            ForceStream(model, grid, force_terms, systems, infos, batch_size, progress)
        )
    for stream in streams:
        for structure, indices, rotations, designs in stream:
            for name, (design, offset) in designs.items():
                accumulators[name].add(
                    structure, infos[structure], indices, rotations, design, offset
                )
