"""Designs of conservative forces: the position derivatives of an energy's
design, by one backward pass per readout column over batches of rotated
copies."""

from __future__ import annotations

import torch
from metatomic.torch import ModelOutput

from .._utils import progress_bar
from ..copies import prepare_rotations, rotated_copies
from ..engine import batch_segments
from ..pet import PETReadout
from .designs import CopyStream


# atoms per model call when computing force designs (one backward pass per column)
_FORCE_ATOMS_PER_BATCH = 512


class ForceStream(CopyStream):
    """Per rotated copies of one structure: the design of the conservative forces
    of every energy target trained with them, such that the forces (model units)
    are ``design @ parameters + offset``.

    The energy of a copy is ``E = offset + D theta`` with ``D`` built from the sums
    over atoms of the last-layer features and of the cutoff factors, so the forces
    are ``-(dD/dr) theta - d offset/dr``. ``dD/dr`` is taken by backward passes of
    the feature columns summed over the copies of a batch (the copies are
    independent, so each copy's positions receive its own derivative), one pass
    per column; the cutoff-factor column, which the model exposes detached,
    by differentiating the energy's gradient with respect to an edge bias.
    ``d offset/dr`` (position-dependent additive models such as ZBL, if any; the
    composition baseline does not depend on positions) is the model's own force
    minus ``-(dD/dr) theta``.
    """

    def __init__(self, model, grid, terms, systems, infos, batch_size, progress):
        super().__init__(model, grid, terms, systems, infos, batch_size, progress)
        self.rotations = self.extended.rotations.to(
            dtype=model.dtype, device=model.device
        )

    def __iter__(self):
        requests = {}
        for term in self.terms:
            name = term.target.name
            requests[PETReadout.features_name(name)] = ModelOutput(sample_kind="atom")
            requests[name] = ModelOutput(sample_kind="system")
        n_rotations = len(self.extended)
        largest = max(max(len(system), 1) for system in self.systems)
        per_batch = self.batch_size or max(1, _FORCE_ATOMS_PER_BATCH // largest)
        prepared = [prepare_rotations(system) for system in self.systems]
        batches = batch_segments(len(self.systems), n_rotations, per_batch)
        with progress_bar(
            self.systems, n_rotations, "force designs", self.progress
        ) as bar:
            for segments in batches:
                with torch.enable_grad():
                    chunks = self._designs(prepared, segments, requests)
                for (structure, first, last), designs in zip(
                    segments, chunks, strict=True
                ):
                    indices = torch.arange(first, last)
                    yield structure, indices, self.extended.rotations[indices], designs
                    bar.update(len(self.systems[structure]) * (last - first))

    def _designs(self, prepared, segments, requests) -> list[dict]:
        copies, positions = [], []
        for structure, first, last in segments:
            segment, leaves = rotated_copies(
                prepared[structure], self.rotations[first:last], differentiable=True
            )
            copies += segment
            positions += [leaf for leaf, _ in leaves]
        # the model's cutoff-factor output is detached: the position dependence of
        # the edge-bias column comes from the bias gradient of the energy
        biases = [
            t.target.readout.edge_layers[0][t.target.readout.key].bias
            for t in self.terms
        ]
        previous = [bias.requires_grad for bias in biases]
        for bias in biases:
            bias.requires_grad_(True)
        try:
            return self._designs_from(segments, copies, positions, requests, biases)
        finally:
            for bias, flag in zip(biases, previous, strict=True):
                bias.requires_grad_(flag)

    def _designs_from(self, segments, copies, positions, requests, biases):
        outputs = self.model(copies, requests, None)
        chunks: list[dict] = [{} for _ in segments]
        for term, bias in zip(self.terms, biases, strict=True):
            target = term.target
            name = target.name
            energy = outputs[name].block().values
            # dE_total/d b_edge = sum_c scale * C_c, a function of every copy's
            # positions; the copies being independent, its position gradient is
            # scale * dC_c/dr_c for each copy
            (bias_gradient,) = torch.autograd.grad(
                energy.sum(), bias, create_graph=True, retain_graph=True
            )
            features = outputs[PETReadout.features_name(name)].block().values
            # totals over copies whose position gradients are per-copy quantities:
            # the summed features, scale * C and the energy
            totals = torch.cat(
                [features.sum(dim=0), bias_gradient.sum()[None], energy.sum()[None]]
            )
            # per copy (n_atoms, 3, K + 2)
            gradients = _per_copy_gradients(totals, positions)
            n_features = features.shape[-1]
            offset_in_batch = 0
            for index, (structure, first, last) in enumerate(segments):
                n_copies = last - first
                stacked = torch.stack(
                    gradients[offset_in_batch : offset_in_batch + n_copies]
                )
                offset_in_batch += n_copies
                scales = self.infos[structure].full_scales[name][0]  # (n_outputs,)
                coordination = stacked[..., n_features] / scales.sum()
                jacobian = torch.cat(
                    [
                        stacked[..., :n_features],
                        # the constant column of the node biases has no derivative
                        torch.zeros_like(coordination)[..., None],
                        coordination[..., None],
                    ],
                    dim=-1,
                )  # (c, n_atoms, 3, n_features + 2)
                model_forces = -stacked[..., -1]
                # design[c, i, a, o, q, k] = -scale[o] map[o, q] dX[c, k]/dr[c, i, a]
                design = -torch.einsum(
                    "o,oq,ciak->ciaoqk", scales, target.output_map, jacobian
                )
                design = design.reshape(
                    n_copies, stacked.shape[1], 3, target.n_properties, -1
                )
                offset = model_forces[..., None] - design @ self.thetas[term.name]
                chunks[index][term.name] = (design.detach(), offset.detach())
        return chunks


def _per_copy_gradients(totals: torch.Tensor, positions) -> list[torch.Tensor]:
    """Gradients of every entry of ``totals`` (``(K,)``, sums over independent
    copies) with respect to each copy's positions: one ``(n_atoms, 3, K)`` float64
    tensor per copy, on CPU (where the designs are built, whatever the model's
    device).

    One backward pass per entry: on CPU this costs less than one ordinary backward
    pass per entry, while batching the entries (``is_grads_batched``) costs about
    three times more per entry and multiplies the memory by their number."""
    columns: list[list[torch.Tensor]] = [[] for _ in positions]
    for total in totals:
        gradients = torch.autograd.grad(
            total, positions, retain_graph=True, allow_unused=True
        )
        for index, gradient in enumerate(gradients):
            columns[index].append(
                torch.zeros_like(positions[index]) if gradient is None else gradient
            )
    per_copy = [torch.stack(parts, dim=-1) for parts in columns]
    # one transfer for the whole batch rather than one per copy
    batch = torch.cat(per_copy).to(device="cpu", dtype=torch.float64)
    return list(batch.split([len(gradient) for gradient in per_copy]))
