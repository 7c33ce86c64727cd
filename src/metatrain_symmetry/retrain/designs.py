"""Streaming passes over rotated copies of structures that give, for every term
of the objective, its design: the affine map from readout parameters to
predictions (``prediction = design @ parameters + offset``)."""

from __future__ import annotations

import torch
from metatomic.torch import ModelOutput

from ..engine import RotatedEvaluator
from ..grid import O3Grid
from ..irreps import BlockLayout, undo_rotation
from ..pet import PETReadout


CUTOFF_FACTORS = "mtt::feature::cutoff_factors"


def with_identity(grid: O3Grid) -> O3Grid:
    """The grid's elements preceded by the identity (the unrotated structure)."""
    extended = O3Grid.__new__(O3Grid)
    extended._init(
        torch.cat([torch.eye(3, dtype=torch.float64)[None], grid.rotations]),
        torch.cat([torch.zeros(1, dtype=torch.float64), grid.weights]),
        degree=grid.degree,
        inversion=grid.inversion,
        lebedev_order=grid.lebedev_order,
    )
    return extended


def requests_of(targets) -> dict[str, ModelOutput]:
    requests = {CUTOFF_FACTORS: ModelOutput(sample_kind="atom")}
    for target in targets:
        requests[PETReadout.features_name(target.name)] = ModelOutput(
            sample_kind="atom"
        )
        requests[target.name] = ModelOutput(
            sample_kind="system" if target.per_structure else "atom"
        )
    return requests


# how a Cartesian target of each rank transforms, for irreps.undo_rotation
CARTESIAN_LAYOUTS = {
    0: BlockLayout("invariant"),
    1: BlockLayout("vector", 1, 1, ("xyz",)),
    2: BlockLayout("matrix", 0, 1, ("xyz_1", "xyz_2")),
}


def back_rotate(values: torch.Tensor, rank: int, rotations: torch.Tensor):
    """``rho(g)^-1`` on the component axes of ``(c, n_samples, *components, ...)``."""
    return undo_rotation(values, CARTESIAN_LAYOUTS[rank], rotations, [], None)


class CopyStream:
    """What the design streams share: the terms, the structures with their
    scales, the grid preceded by the identity and the trained parameters."""

    def __init__(self, model, grid, terms, systems, infos, batch_size, progress):
        self.model = model
        self.terms = terms
        self.systems = systems
        self.infos = infos
        self.extended = with_identity(grid)
        self.batch_size = batch_size
        self.progress = progress
        # designs are built around the trained readout: offsets are exact there
        self.thetas = {term.name: term.trained_parameters() for term in terms}


class DesignStream(CopyStream):
    """Per rotated copy of one structure: the design of every target, such that the
    prediction (model units) is ``design @ parameters + offset``."""

    def __init__(self, model, grid, targets, systems, infos, batch_size, progress):
        super().__init__(model, grid, targets, systems, infos, batch_size, progress)
        self.targets = targets
        self.evaluator = RotatedEvaluator(model, self.extended, batch_size)

    def __iter__(self):
        requests = requests_of(self.targets)
        for chunk in self.evaluator.stream(self.systems, requests, self.progress):
            structure = chunk.structure
            info = self.infos[structure]
            # the model's outputs come to CPU once per chunk: the designs, their
            # normal equations and the solve are float64 on CPU on every device
            cutoff = chunk.outputs[CUTOFF_FACTORS].blocks[0]
            first_atom = cutoff.sample_values[
                :, cutoff.sample_names.index("first_atom")
            ].to(device="cpu", dtype=torch.long)
            n_atoms = len(self.systems[structure])
            n_copies = len(chunk.rotations)
            coordination = torch.zeros(n_copies, n_atoms, dtype=torch.float64)
            coordination.index_add_(
                1,
                first_atom,
                cutoff.values[..., 0].to(device="cpu", dtype=torch.float64),
            )
            rotations = self.extended.rotations[chunk.rotations]
            designs = {}
            for target in self.targets:
                features = chunk.outputs[PETReadout.features_name(target.name)]
                features = features.blocks[0].values.to(
                    device="cpu", dtype=torch.float64
                )
                augmented = torch.cat(
                    [
                        features,
                        torch.ones(n_copies, n_atoms, 1, dtype=torch.float64),
                        coordination[..., None],
                    ],
                    dim=-1,
                )
                if target.per_structure:
                    augmented = augmented.sum(dim=1, keepdim=True)
                    if target.rank == 2:
                        augmented = augmented / info.volume
                scales = info.full_scales[target.name]  # (n_samples, n_outputs)
                # design[c, s, o, q, k] = scale[s, o] * map[o, q] * x[c, s, k]
                design = torch.einsum(
                    "so,oq,csk->csoqk", scales, target.output_map, augmented
                )
                n_samples = design.shape[1]
                design = design.reshape(
                    n_copies, n_samples, target.readout.n_outputs, -1
                )
                prediction = chunk.outputs[target.name].blocks[0].values
                prediction = prediction.to(device="cpu", dtype=torch.float64).reshape(
                    n_copies, n_samples, target.readout.n_outputs
                )
                offset = prediction - design @ self.thetas[target.name]
                shape = (
                    (n_copies, n_samples) + (3,) * target.rank + (target.n_properties,)
                )
                designs[target.name] = (
                    design.reshape(*shape, -1),
                    offset.reshape(shape),
                )
            yield structure, chunk.rotations, rotations, designs
