"""Closed-form retraining of a trained model's readout with an equivariance penalty.

With the backbone frozen, every prediction of a metatrain PET is an affine function
of its readout parameters (the weights and biases of the last linear layers): for
an atom ``i`` and a target block,

.. code-block:: text

    a_i = sum_l (W_node_l f_node_l,i + b_node_l)
          + sum_l (W_edge_l f_edge_l,i + b_edge_l C_i)

where ``f`` are the last-layer features the model exposes as
``mtt::aux::<target>_last_layer_features`` and ``C_i`` is the sum of the cutoff
factors of atom ``i``'s neighbours (``mtt::feature::cutoff_factors``). The model
output is ``scale * a + baseline``. The objective ``L_mu + gamma * L_sigma`` is
therefore quadratic in the readout: one streaming pass over rotated copies of the
training structures accumulates its normal equations in float64, and every value
of ``gamma`` is one small linear solve.

Conservative forces ``-dE/dr`` of an energy trained with them are linear in the
same parameters, through the position derivatives of the summed features and
cutoff factors: a second pass with positions requiring gradients builds their
design rows (the Jacobian of the energy's design row), and they enter the
objective as a second quadratic term of the energy's parameters.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from metatomic.torch import (
    ModelOutput,
    System,
    systems_to_torch,
    unit_conversion_factor,
)

from .data import read_structures, reference_value
from .engine import (
    RotatedEvaluator,
    prepare_rotations,
    prepare_systems,
    rotated_copies,
)
from .estimators import paired_mean_square_deviation
from .grid import O3Grid
from .irreps import BlockLayout, undo_rotation
from .models import LoadedModel, load_model


CUTOFF_FACTORS = "mtt::feature::cutoff_factors"
DEFAULT_N_ROTATIONS = 16
# eigenvalues below this fraction of the largest make a system singular
_SINGULAR_RCOND = 1e-12
# per-target default label names in ASE structures
DEFAULT_LABEL_KEYS = {
    "energy": "energy",
    "non_conservative_force": "forces",
    "non_conservative_forces": "forces",
    "non_conservative_stress": "stress",
}


# =============================================================================
# PET adapter: the only place that knows how PET's readout is laid out
# =============================================================================


class _PETReadout:
    """The last linear layers of one single-block target of a metatrain PET.

    The effective readout is ``Theta``, a ``(n_outputs, n_features + 2)`` matrix
    acting on the augmented per-atom features ``[f, 1, C]``: the columns of layer
    ``l`` are ``[W_node_l, W_edge_l]`` (the order of PET's last-layer features),
    followed by the summed node biases and the summed edge biases (PET adds one
    bias per layer; only their sums reach the prediction, and they are written back
    split equally between layers, which is the minimum-norm choice).
    """

    def __init__(self, pet: torch.nn.Module, target: str):
        backend = pet.backend
        if target not in backend.node_last_layers:
            raise ValueError(f"the model has no readout for target '{target}'")
        self.target = target
        self.node_layers = list(backend.node_last_layers[target])
        self.edge_layers = list(backend.edge_last_layers[target])
        keys = list(self.node_layers[0].keys())
        if len(keys) != 1:
            raise ValueError(
                f"target '{target}' has {len(keys)} blocks; closed-form retraining "
                "supports single-block targets (energies, Cartesian forces and "
                "stresses)"
            )
        self.key = keys[0]
        first = self.node_layers[0][self.key]
        self.n_layers = len(self.node_layers)
        self.d_head = first.in_features
        self.n_outputs = first.out_features
        self.n_features = 2 * self.n_layers * self.d_head

    @staticmethod
    def features_name(target: str) -> str:
        from metatrain.pet.model import get_last_layer_features_name

        return get_last_layer_features_name(target)

    def linears(self) -> list[tuple[str, torch.nn.Linear]]:
        """``(kind, module)`` for every readout layer, in feature order."""
        result = []
        for node, edge in zip(self.node_layers, self.edge_layers, strict=True):
            result.append(("node", node[self.key]))
            result.append(("edge", edge[self.key]))
        return result

    def parameters(self) -> list[torch.nn.Parameter]:
        parameters = []
        for _, linear in self.linears():
            parameters += [linear.weight, linear.bias]
        return parameters

    def parameter_names(self, pet: torch.nn.Module) -> list[str]:
        ids = {id(p) for p in self.parameters()}
        return [name for name, p in pet.named_parameters() if id(p) in ids]

    def theta(self) -> torch.Tensor:
        """Current effective readout, ``(n_outputs, n_features + 2)`` float64
        (differentiable with respect to the model's parameters)."""
        columns = []
        node_bias = torch.zeros(self.n_outputs, dtype=torch.float64)
        edge_bias = torch.zeros(self.n_outputs, dtype=torch.float64)
        for kind, linear in self.linears():
            columns.append(linear.weight.to("cpu", torch.float64))
            if kind == "node":
                node_bias = node_bias + linear.bias.to("cpu", torch.float64)
            else:
                edge_bias = edge_bias + linear.bias.to("cpu", torch.float64)
        return torch.cat(columns + [node_bias[:, None], edge_bias[:, None]], dim=1)

    @torch.no_grad()
    def assign(self, theta: torch.Tensor) -> None:
        """Write an effective readout ``(n_outputs, n_features + 2)`` into the
        model's parameters."""
        d = self.d_head
        for index, (kind, linear) in enumerate(self.linears()):
            weight = theta[:, index * d : (index + 1) * d]
            bias = theta[:, self.n_features if kind == "node" else self.n_features + 1]
            linear.weight.copy_(weight.to(linear.weight))
            linear.bias.copy_((bias / self.n_layers).to(linear.bias))


def _as_pet(model: LoadedModel) -> torch.nn.Module:
    module = model.module
    name = f"'{model.source}'" if model.source is not None else "the model"
    if isinstance(module, torch.jit.ScriptModule):
        raise ValueError(
            f"{name} is an exported model, whose weights cannot be changed: retrain "
            "the metatrain checkpoint (.ckpt) it was exported from"
        )
    if not (
        type(module).__module__.startswith("metatrain.pet")
        and hasattr(module, "backend")
        and hasattr(module.backend, "node_last_layers")
    ):
        raise ValueError(
            "closed-form retraining needs a metatrain PET checkpoint (.ckpt); "
            f"{name} is a {type(module).__name__}"
        )
    return module


# =============================================================================
# targets: how each one maps readout parameters to predictions
# =============================================================================


@dataclass
class _Target:
    name: str
    readout: _PETReadout
    per_structure: bool
    rank: int
    """0 (invariant), 1 (vector), 2 (rank-2 tensor)"""
    n_properties: int
    output_map: torch.Tensor
    """``(n_outputs, n_reduced)``: the full readout rows from the free ones
    (identity, or the symmetric parametrization of a stress)"""
    label_key: str
    weight: float = 1.0
    forces: _ForceTerm | None = None
    """the conservative forces of an energy trained with position gradients"""

    @property
    def n_parameters(self) -> int:
        return self.output_map.shape[1] * (self.readout.n_features + 2)

    def loss_scale(self, info, shape) -> torch.Tensor:
        """metatrain's per-target scale of one structure, shaped ``shape``
        (``(n_samples, *components, n_properties)``)."""
        return info.loss_scales[self.name].reshape(shape)

    @property
    def n_components(self) -> int:
        return 3**self.rank

    def reduce(self, theta: torch.Tensor) -> torch.Tensor:
        """Full ``(n_outputs, n_aug)`` readout to the free parameter vector."""
        pseudo_inverse = torch.linalg.pinv(self.output_map)
        return (pseudo_inverse @ theta).reshape(-1)

    def expand(self, parameters: torch.Tensor) -> torch.Tensor:
        reduced = parameters.reshape(self.output_map.shape[1], -1)
        return self.output_map @ reduced


@dataclass
class _ForceTerm:
    """The conservative forces ``-dE/dr`` of an energy target: a second quadratic
    term in the energy's readout parameters, with its own labels and loss weight
    (metatrain's weight of the energy's ``positions`` gradient)."""

    target: _Target
    label_key: str
    weight: float = 1.0
    rank: int = 1
    per_structure: bool = False

    @property
    def name(self) -> str:
        return f"{self.target.name}/forces"

    @property
    def n_properties(self) -> int:
        return self.target.n_properties

    @property
    def n_parameters(self) -> int:
        return self.target.n_parameters

    def loss_scale(self, info, shape) -> torch.Tensor:
        # metatrain divides gradients by the scale of the energy they derive from
        scale = info.loss_scales[self.target.name].reshape(-1)
        return scale.expand(shape)


def _make_target(
    model: LoadedModel, name: str, label_key: str | None, weight: float
) -> _Target:
    targets = model.targets
    if name not in targets:
        raise ValueError(
            f"unknown target '{name}': the checkpoint was trained on {sorted(targets)}"
        )
    info = targets[name]
    readout = _PETReadout(model.module, name)
    axes = info.components
    n_properties = info.n_properties
    if axes == ():
        rank = 0
    elif axes == ("xyz",):
        rank = 1
    elif axes == ("xyz_1", "xyz_2"):
        rank = 2
    else:
        raise ValueError(
            f"target '{name}' has components {axes}; closed-form retraining "
            "supports scalars, Cartesian vectors and rank-2 Cartesian tensors"
        )
    per_structure = info.sample_kind == "system"
    if info.sample_kind not in ("system", "atom"):
        raise ValueError(f"target '{name}' has unsupported samples {info.sample_kind}")
    if not per_structure and rank != 1:
        raise ValueError(
            f"per-atom target '{name}' of rank {rank} is not supported; per-atom "
            "targets must be Cartesian vectors (non-conservative forces)"
        )
    n_outputs = 3**rank * n_properties
    if readout.n_outputs != n_outputs:
        raise ValueError(f"internal error: readout of '{name}' has a wrong size")
    if rank == 2:
        if name != "non_conservative_stress":
            raise ValueError(
                f"rank-2 target '{name}': only 'non_conservative_stress' is supported"
            )
        # PET symmetrizes rank-2 predictions: only symmetric readout rows matter
        pairs = [(a, b) for a in range(3) for b in range(a, 3)]
        output_map = torch.zeros(n_outputs, len(pairs) * n_properties)
        for column, (a, b) in enumerate(pairs):
            for p in range(n_properties):
                for i, j in ((a, b), (b, a)):
                    output_map[
                        (3 * i + j) * n_properties + p, column * n_properties + p
                    ] = 1.0
    else:
        output_map = torch.eye(n_outputs)
    if label_key is None:
        label_key = DEFAULT_LABEL_KEYS.get(name, name)
    return _Target(
        name=name,
        readout=readout,
        per_structure=per_structure,
        rank=rank,
        n_properties=n_properties,
        output_map=output_map.to(torch.float64),
        label_key=label_key,
        weight=float(weight),
    )


# =============================================================================
# data
# =============================================================================


def _read_frames(data, what: str) -> list:
    if isinstance(data, (str, os.PathLike)):
        frames = read_structures(data, what)
    else:
        frames = list(data)
    if len(frames) == 0:
        raise ValueError(f"the {what} set contains no structures")
    for index, frame in enumerate(frames):
        if not hasattr(frame, "get_positions"):
            raise TypeError(
                f"{what} structure {index} is a {type(frame).__name__}; pass ase.Atoms "
                "with reference labels (info/arrays or a calculator)"
            )
    return frames


def _label(frame, key: str, index: int, what: str):
    value = reference_value(frame, key)
    if value is None:
        raise ValueError(
            f"{what} structure {index} has no '{key}' label (looked in info, arrays "
            "and calculator results); pass label_keys={target: key} to name it"
        )
    return torch.as_tensor(value)


def _labels(frames, target: _Target, what: str) -> list[torch.Tensor]:
    """Reference values shaped like the model output block without its system axis:
    ``(n_samples, *components, n_properties)``."""
    labels = []
    for index, frame in enumerate(frames):
        value = _label(frame, target.label_key, index, what)
        n_samples = len(frame) if not target.per_structure else 1
        if target.rank == 2 and value.numel() == 6 * target.n_properties:
            from ase.stress import voigt_6_to_full_3x3_stress

            value = torch.as_tensor(voigt_6_to_full_3x3_stress(value.numpy()))
        shape = (n_samples,) + (3,) * target.rank + (target.n_properties,)
        if value.numel() != math.prod(shape):
            raise ValueError(
                f"{what} structure {index}: label '{target.label_key}' of target "
                f"'{target.name}' has {value.numel()} values, expected "
                f"{math.prod(shape)}"
            )
        if not bool(torch.all(torch.isfinite(value))):
            raise ValueError(
                f"{what} structure {index}: label '{target.label_key}' is not finite"
            )
        labels.append(value.reshape(shape))
    return labels


# =============================================================================
# streaming pass: design matrices on rotated copies
# =============================================================================


def _with_identity(grid: O3Grid) -> O3Grid:
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


@dataclass
class _StructureInfo:
    full_scales: dict[str, torch.Tensor]
    """per target, ``(n_samples, n_outputs)`` scale applied to raw predictions"""
    loss_scales: dict[str, torch.Tensor]
    """per target, ``(n_samples, n_outputs)`` metatrain's per-target scale, which
    divides residuals in the loss"""
    volume: float


def _structure_infos(model: LoadedModel, systems: list[System], targets) -> list:
    pet = model.module
    infos = []
    for system in systems:
        requests = {
            t.name: ModelOutput(sample_kind="system" if t.per_structure else "atom")
            for t in targets
        }
        full = pet.scaler.get_scales([system], requests)
        per_target = pet.scaler.get_scales(
            [system], requests, use_per_property_scales=False
        )
        volume = abs(float(torch.det(system.cell.to(torch.float64))))
        infos.append(
            _StructureInfo(
                full_scales={
                    t.name: full[t.name]
                    .block()
                    .values.to(torch.float64)
                    .reshape(-1, t.readout.n_outputs)
                    for t in targets
                },
                loss_scales={
                    t.name: per_target[t.name]
                    .block()
                    .values.to(torch.float64)
                    .reshape(-1, t.readout.n_outputs)
                    for t in targets
                },
                volume=volume if volume > 0 else math.inf,
            )
        )
    return infos


def _requests(targets) -> dict[str, ModelOutput]:
    requests = {CUTOFF_FACTORS: ModelOutput(sample_kind="atom")}
    for target in targets:
        requests[_PETReadout.features_name(target.name)] = ModelOutput(
            sample_kind="atom"
        )
        requests[target.name] = ModelOutput(
            sample_kind="system" if target.per_structure else "atom"
        )
    return requests


# how a Cartesian target of each rank transforms, for irreps.undo_rotation
_CARTESIAN_LAYOUTS = {
    0: BlockLayout("invariant"),
    1: BlockLayout("vector", 1, 1, ("xyz",)),
    2: BlockLayout("matrix", 0, 1, ("xyz_1", "xyz_2")),
}


def _back_rotate(values: torch.Tensor, rank: int, rotations: torch.Tensor):
    """``rho(g)^-1`` on the component axes of ``(c, n_samples, *components, ...)``."""
    return undo_rotation(values, _CARTESIAN_LAYOUTS[rank], rotations, [], None)


class _Stream:
    """Per rotated copy of one structure: the design of every target, such that the
    prediction (model units) is ``design @ parameters + offset``."""

    def __init__(self, model, grid, targets, systems, infos, batch_size, progress):
        self.model = model
        self.targets = targets
        self.systems = systems
        self.infos = infos
        self.extended = _with_identity(grid)
        self.evaluator = RotatedEvaluator(model, self.extended, batch_size)
        self.progress = progress
        self.thetas = {t.name: t.reduce(t.readout.theta().detach()) for t in targets}

    def __iter__(self):
        requests = _requests(self.targets)
        for chunk in self.evaluator.stream(self.systems, requests, self.progress):
            structure = chunk.structure
            info = self.infos[structure]
            cutoff = chunk.outputs[CUTOFF_FACTORS].blocks[0]
            first_atom = cutoff.sample_values[
                :, cutoff.sample_names.index("first_atom")
            ]
            n_atoms = len(self.systems[structure])
            n_copies = len(chunk.rotations)
            coordination = torch.zeros(n_copies, n_atoms, dtype=torch.float64)
            coordination.index_add_(
                1,
                first_atom.to(torch.long),
                cutoff.values[..., 0].to(torch.float64),
            )
            rotations = self.extended.rotations[chunk.rotations]
            designs = {}
            for target in self.targets:
                features = chunk.outputs[_PETReadout.features_name(target.name)]
                features = features.blocks[0].values.to(torch.float64)
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
                prediction = prediction.to(torch.float64).reshape(
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


# atoms per model call when computing force designs (one backward pass per column)
_FORCE_ATOMS_PER_BATCH = 512


class _ForceStream:
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
        self.model = model
        self.terms = terms
        self.systems = systems
        self.infos = infos
        self.extended = _with_identity(grid)
        self.rotations = self.extended.rotations.to(
            dtype=model.dtype, device=model.device
        )
        self.batch_size = batch_size
        self.progress = progress
        self.thetas = {
            term.name: term.target.reduce(term.target.readout.theta().detach())
            for term in terms
        }

    def __iter__(self):
        requests = {}
        for term in self.terms:
            name = term.target.name
            requests[_PETReadout.features_name(name)] = ModelOutput(sample_kind="atom")
            requests[name] = ModelOutput(sample_kind="system")
        n_rotations = len(self.extended)
        total = len(self.systems) * n_rotations
        largest = max(max(len(system), 1) for system in self.systems)
        per_batch = self.batch_size or max(1, _FORCE_ATOMS_PER_BATCH // largest)
        prepared = [prepare_rotations(system) for system in self.systems]
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="copy", desc="force designs")
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
            with torch.enable_grad():
                chunks = self._designs(prepared, segments, requests)
            for (structure, first, last), designs in zip(segments, chunks, strict=True):
                indices = torch.arange(first, last)
                yield structure, indices, self.extended.rotations[indices], designs
            if bar is not None:
                bar.update(stop - start)
        if bar is not None:
            bar.close()

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
            features = outputs[_PETReadout.features_name(name)].block().values
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
    tensor per copy.

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
    return [torch.stack(parts, dim=-1).to(torch.float64) for parts in columns]


def _unbiased_factor(grid: O3Grid) -> float:
    """``R / (R - 1)`` for Monte-Carlo grids (unbiased variance), 1 for
    quadrature grids."""
    n = len(grid)
    return n / (n - 1) if grid.degree is None else 1.0


@dataclass
class _Quadratic:
    """``q(v) = v^T matrix v / count`` with ``v = [parameters, 1]``."""

    matrix: torch.Tensor
    count: int

    def value(self, parameters: torch.Tensor) -> torch.Tensor:
        """``parameters``: ``(P,)`` or ``(G, P)``."""
        v = torch.cat(
            [parameters, torch.ones(*parameters.shape[:-1], 1, dtype=torch.float64)],
            dim=-1,
        )
        return torch.einsum("...p,pq,...q->...", v, self.matrix, v) / self.count


class _NormalEquations:
    """Streaming accumulation of the quadratic forms of ``L_mu`` and ``L_sigma`` of
    one target, in float64."""

    def __init__(self, target: _Target | _ForceTerm, labels, infos, grid: O3Grid):
        size = target.n_parameters + 1
        self.target = target
        self.labels = labels
        self.infos = infos
        self.mu = torch.zeros(size, size, dtype=torch.float64)
        self.sigma = torch.zeros(size, size, dtype=torch.float64)
        self.count = 0
        self.factor = _unbiased_factor(grid)
        self._grid_weights = grid.weights
        self._structure = None
        self._reference = None

    def add(self, structure, indices, rotations, design, offset) -> None:
        target = self.target
        if structure != self._structure:
            self.finish()
            self._structure = structure
            self._reference = None
            self._first = None
            self._second = None
            self._weight = 0.0
        scale = target.loss_scale(self.infos[structure], design.shape[1:-1])
        scale = scale[None, ..., None]
        design = _back_rotate(design, target.rank, rotations)
        offset = _back_rotate(offset, target.rank, rotations)
        rows = torch.cat([design, offset[..., None]], dim=-1) / scale
        rows = rows.reshape(rows.shape[0], -1, rows.shape[-1])  # (c, m, P + 1)

        identity = indices == 0
        if bool(identity.any()):
            reference = self.labels[structure].reshape(-1).to(torch.float64)
            residual = rows[identity][0].clone()
            residual[:, -1] -= reference / scale.reshape(-1)
            self.mu += residual.T @ residual
            self.count += residual.shape[0]
        rows = rows[~identity]
        if rows.shape[0] == 0:
            return
        weights = self._grid_weights[indices[~identity] - 1]
        if self._reference is None:
            self._reference = rows[0].clone()
            self._first = torch.zeros_like(self._reference)
            self._second = torch.zeros_like(self.sigma)
        centered = rows - self._reference
        self._first += torch.einsum("c,cmp->mp", weights, centered)
        self._second += torch.einsum("c,cmp,cmq->pq", weights, centered, centered)
        self._weight += float(weights.sum())

    def finish(self) -> None:
        if self._structure is None or self._reference is None:
            return
        if abs(self._weight - 1.0) > 1e-9:
            raise RuntimeError(
                "internal error: grid weights of a structure do not sum to 1"
            )
        self.sigma += self.factor * (self._second - self._first.T @ self._first)
        self._reference = None
        self._structure = None

    def quadratics(self) -> tuple[_Quadratic, _Quadratic]:
        self.finish()
        # both parts are averaged over the same samples and components
        return _Quadratic(self.mu, self.count), _Quadratic(self.sigma, self.count)


def _solve(
    target: _Target, terms, gammas, ridge: float, trained: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimizers of ``sum_terms weight * (L_mu + gamma L_sigma) + ridge ||theta||^2``
    closest to the trained readout.

    Directions of the parameter space that the objective does not determine (a
    bias whose contribution is the same in every structure, a feature that is
    constant or a combination of others) keep their trained values: the solution
    is ``trained + delta``, with ``delta`` the minimum-norm change, which is the
    limit gradient descent from the trained readout reaches.

    :param terms: ``(weight, mu, sigma)`` of every quadratic term in the target's
        parameters (its values, and its forces when it has them)
    :param trained: ``(n_parameters,)`` the trained readout
    :return: the solutions ``(n_gamma, n_parameters)`` and the number of
        undetermined directions at each gamma, ``(n_gamma,)`` int64
    """
    size = target.n_parameters
    solutions, undetermined = [], []
    for gamma in gammas:
        matrix = sum(
            weight * (mu.matrix / mu.count + gamma * sigma.matrix / sigma.count)
            for weight, mu, sigma in terms
        )
        hessian = matrix[:size, :size] + ridge * torch.eye(size, dtype=torch.float64)
        hessian = 0.5 * (hessian + hessian.T)
        # stationarity of the objective at trained + delta: hessian @ delta = rhs
        rhs = -(matrix[:size, size] + hessian @ trained)
        delta, n_null = _minimum_norm_solution(hessian, rhs)
        solutions.append(trained + delta)
        undetermined.append(n_null)
    return torch.stack(solutions), torch.tensor(undetermined, dtype=torch.int64)


def _minimum_norm_solution(
    hessian: torch.Tensor, rhs: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """The minimum-norm ``x`` solving ``hessian @ x = rhs`` on the range of a
    symmetric positive semi-definite ``hessian`` ``(P, P)``, and the dimension of
    its numerical null space."""
    # Jacobi scaling: the rank test does not depend on the units of the individual
    # features (bias columns are much larger than the others); columns with no
    # weight at all stay unscaled and fall in the null space
    diagonal = torch.diagonal(hessian)
    active = diagonal > torch.finfo(torch.float64).eps * diagonal.max().clamp(min=0)
    inverse_scale = torch.where(active, diagonal, 1.0).rsqrt()
    scaled = hessian * inverse_scale[:, None] * inverse_scale[None, :]
    eigenvalues, eigenvectors = torch.linalg.eigh(scaled)
    tolerance = _SINGULAR_RCOND * float(eigenvalues[-1].clamp(min=0))
    determined = eigenvalues > tolerance
    if not bool(determined.any()):
        return torch.zeros_like(rhs), hessian.shape[0]
    basis = eigenvectors[:, determined]
    solution = inverse_scale * (
        basis @ ((basis.T @ (inverse_scale * rhs)) / eigenvalues[determined])
    )
    null = eigenvectors[:, ~determined]
    if null.shape[1] != 0:
        # the scaled null space, back in the model's parameters: remove the
        # solution's component along it (in the model's own metric)
        orthonormal, _ = torch.linalg.qr(inverse_scale[:, None] * null)
        solution = solution - orthonormal @ (orthonormal.T @ solution)
    return solution, int(null.shape[1])


class _Evaluation:
    """Errors of several parameter sets of one target, in model units: squared
    errors against the labels on the unrotated structures, and per-structure
    equivariance RMSEs over the grid (the same reduction and, on random grids,
    the same unbiased estimate over pairs of rotations as
    :py:func:`~metatrain_symmetry.analyze`)."""

    def __init__(self, target: _Target, labels, parameters: torch.Tensor, grid: O3Grid):
        self.target = target
        self.labels = labels
        self.parameters = parameters.T  # (P, G)
        self.grid_weights = grid.weights
        # random grids pair each rotation with its inversion: with two pairs or
        # more, the variance is the U-statistic over pairs, as in analyze
        self.n_pairs = len(grid) // 2 if grid.degree is None and grid.inversion else 0
        self._stored: list[tuple[torch.Tensor, torch.Tensor]] = []
        n = parameters.shape[0]
        self.squared_error = torch.zeros(n, dtype=torch.float64)
        self.count = 0
        self.equivariance: list[torch.Tensor] = []
        self.predictions: list[torch.Tensor] = []
        self._structure = None

    def add(self, structure, indices, rotations, design, offset) -> None:
        target = self.target
        if structure != self._structure:
            self.finish()
            self._structure = structure
            self._reference = None
        # (c, s, *components, p, G)
        prediction = design @ self.parameters + offset[..., None]
        identity = indices == 0
        if bool(identity.any()):
            value = prediction[identity][0]
            self.predictions.append(value.movedim(-1, 0).clone())
            reference = self.labels[structure].to(torch.float64)[..., None]
            error = (value - reference).reshape(-1, value.shape[-1])
            self.squared_error += error.square().sum(dim=0)
            self.count += error.shape[0]
        prediction = prediction[~identity]
        if prediction.shape[0] == 0:
            return
        weights = self.grid_weights[indices[~identity] - 1]
        back = _back_rotate(prediction, target.rank, rotations[~identity])
        back = back.reshape(back.shape[0], -1, back.shape[-1])
        if self._reference is None:
            self._reference = back[0].clone()
            self._first = torch.zeros_like(self._reference)
            self._second = torch.zeros_like(self._reference)
        centered = back - self._reference
        self._first += torch.einsum("c,cmg->mg", weights, centered)
        self._second += torch.einsum("c,cmg->mg", weights, centered.square())
        if self.n_pairs >= 2:
            self._stored.append((indices[~identity] - 1, centered))

    def finish(self) -> None:
        if self._structure is None or self._reference is None:
            return
        if self.n_pairs >= 2:
            indices = torch.cat([item[0] for item in self._stored])
            centered = torch.cat([item[1] for item in self._stored])
            centered = centered[torch.argsort(indices)]
            self._stored = []
            half = self.n_pairs
            # every scalar value on its own: (M, 1, n_values * G)
            values = centered.reshape(2, half, 1, -1)
            estimate, _ = paired_mean_square_deviation(values[0], values[1])
            variance = estimate.clamp(min=0.0).reshape(self._first.shape)
        else:
            variance = (self._second - self._first.square()).clamp(min=0.0)
        self.equivariance.append(variance.mean(dim=0).sqrt())
        self._structure = None
        self._reference = None

    def rmse(self) -> torch.Tensor:
        return (self.squared_error / self.count).sqrt()

    def equivariance_rmse(self) -> torch.Tensor:
        """``(n_structures, G)``"""
        self.finish()
        return torch.stack(self.equivariance)


# =============================================================================
# public interface
# =============================================================================


@dataclass
class RetrainResult:
    """Closed-form retraining of a readout for several values of ``gamma``.

    Training quantities are in metatrain's normalized loss units (residuals divided
    by the per-target scale), validation errors in the model's output units.
    """

    gammas: list[float]
    targets: list[str]
    objective: torch.Tensor
    """``(n_gamma,)`` training objective ``L`` at each solution"""
    training_mse: dict[str, torch.Tensor]
    """per term (see ``terms``), ``(n_gamma,)`` ``L_mu`` on the training
    structures"""
    training_equivariance: dict[str, torch.Tensor]
    """per term, ``(n_gamma,)`` ``L_sigma`` on the training structures"""
    parameters: dict[str, torch.Tensor]
    """per target, ``(n_gamma, n_parameters)`` free readout parameters"""
    undetermined: dict[str, torch.Tensor] = field(default_factory=dict)
    """per target, ``(n_gamma,)`` int64: how many directions of the readout
    parameters the objective leaves undetermined (they keep their trained
    values)"""
    validation_rmse: dict[str, torch.Tensor] = field(default_factory=dict)
    """per term, ``(n_gamma,)`` RMSE against the validation labels"""
    validation_equivariance_rmse: dict[str, torch.Tensor] = field(default_factory=dict)
    """per term, ``(n_gamma,)`` mean over validation structures of the
    per-structure equivariance RMSE (as :py:func:`equivariance_rmse`)"""
    validation_predictions: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    """per term, one ``(n_gamma, n_samples, *components, n_properties)`` tensor per
    validation structure: the solver's predictions on the unrotated structures"""
    checkpoints: list[Path] = field(default_factory=list)
    """the written checkpoints, one per gamma (empty without an output directory)"""
    grid: O3Grid | None = None
    ridge: float = 0.0
    terms: list[str] = field(default_factory=list)
    """the terms of the objective: every target and, for an energy trained with
    forces, ``"<target>/forces"`` (the keys of the per-term dictionaries above;
    ``parameters`` is keyed by target)"""

    def table(self) -> list[dict[str, float]]:
        """One row per gamma: the objective, per target the number of undetermined
        readout directions and, per term, the training ``L_mu`` and ``L_sigma``
        and the validation errors when available."""
        rows = []
        for index, gamma in enumerate(self.gammas):
            row = {"gamma": gamma, "objective": float(self.objective[index])}
            for name, counts in self.undetermined.items():
                row[f"{name} undetermined directions"] = int(counts[index])
            for name in self.terms or self.targets:
                row[f"{name} train L_mu"] = float(self.training_mse[name][index])
                row[f"{name} train L_sigma"] = float(
                    self.training_equivariance[name][index]
                )
                if name in self.validation_rmse:
                    row[f"{name} val RMSE"] = float(self.validation_rmse[name][index])
                    row[f"{name} val equivariance RMSE"] = float(
                        self.validation_equivariance_rmse[name][index]
                    )
            rows.append(row)
        return rows


def retrain_last_layer(
    checkpoint: str | os.PathLike,
    train,
    validation=None,
    gammas: Sequence[float] = (0.0, 0.1, 1.0, 10.0, 100.0),
    targets: Sequence[str] | None = None,
    grid: O3Grid | None = None,
    n_rotations: int = DEFAULT_N_ROTATIONS,
    seed: int = 0,
    ridge: float = 0.0,
    weights: dict[str, float] | None = None,
    label_keys: dict[str, str] | None = None,
    ignore_gradients: bool = False,
    output: str | os.PathLike | None = None,
    force: bool = False,
    batch_size: int | None = None,
    progress: bool = False,
) -> RetrainResult:
    """Retrain the readout of a metatrain PET checkpoint in closed form.

    For each ``gamma``, the readout parameters (last-layer weights and biases) of
    each target minimize

    ``L = sum_t w_t (L_mu,t + gamma L_sigma,t) + ridge ||theta||^2``

    exactly, the backbone staying frozen; see :doc:`/retraining` for the precise
    definitions.

    :param checkpoint: metatrain PET checkpoint (``.ckpt``)
    :param train: training structures: a file ASE can read, or ``ase.Atoms`` with
        reference labels in ``info``/``arrays`` or in a calculator
    :param validation: validation structures (same formats), optional
    :param gammas: values of the equivariance weight ``gamma >= 0``
    :param targets: targets to retrain (default: every energy, non-conservative force
        and non-conservative stress target of the model); an energy trained with
        conservative forces brings its forces along
    :param grid: rotations on which ``L_sigma`` is estimated (default:
        ``O3Grid.random(n_rotations, seed)``)
    :param n_rotations: number of random rotations when ``grid`` is not given
    :param seed: seed of the random rotations
    :param ridge: coefficient of the ridge term (in loss units)
    :param weights: per-term loss weights ``w_t`` keyed by target, or by
        ``"<target>/forces"`` for the conservative forces of an energy (default:
        the ``weight`` of each target, and of its ``gradients: positions``, in the
        checkpoint's ``loss`` training options, or 1)
    :param label_keys: per-term name of the label in the ASE structures
        (defaults: ``energy``, ``forces`` for non-conservative and conservative
        forces, ``stress``)
    :param ignore_gradients: retrain an energy target that was trained with its
        gradients on energies alone. Without it, an energy trained with forces
        (position gradients) is retrained on energies and forces, and one trained
        with stress (strain gradients) is refused
    :param output: directory for ``gamma-<value>.ckpt``, ``pareto.csv``,
        ``pareto.md`` and ``pareto.png``; written atomically
    :param force: replace a non-empty ``output`` directory
    :param batch_size: rotated copies per model call
    :param progress: show progress bars
    :return: the solutions and their errors
    """
    from ._utils import atomic_directory, check_output_directory

    gammas = _check_gammas(gammas)
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)):
        raise TypeError(f"ridge must be a number, got {ridge!r}")
    ridge = float(ridge)
    if not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
    if output is not None:
        output = check_output_directory(output, force)
    checkpoint_path = Path(checkpoint)
    model = load_model(checkpoint_path)
    pet = _as_pet(model)
    original = torch.load(checkpoint_path, weights_only=False, map_location="cpu")

    names = _select_targets(model, targets)
    with_forces = _check_gradients(model, names, ignore_gradients)
    default_weights, default_force_weights = _loss_weights(original)
    weights = dict(weights or {})
    label_keys = dict(label_keys or {})
    known_terms = names + [f"{name}/forces" for name in with_forces]
    for name in list(weights) + list(label_keys):
        if name not in known_terms:
            raise ValueError(
                f"weights or label_keys name '{name}', which is not retrained "
                f"(terms: {known_terms})"
            )
    specs = [
        _make_target(
            model,
            name,
            label_keys.get(name),
            weights.get(name, default_weights.get(name, 1.0)),
        )
        for name in names
    ]
    for target in specs:
        if target.name in with_forces:
            _add_forces(
                target,
                label_keys.get(f"{target.name}/forces"),
                weights.get(
                    f"{target.name}/forces",
                    default_force_weights.get(target.name, 1.0),
                ),
            )
    force_terms = [t.forces for t in specs if t.forces is not None]
    if grid is None:
        grid = O3Grid.random(n_rotations, seed=seed)
    if not isinstance(grid, O3Grid):
        raise TypeError(f"grid must be an O3Grid, got {type(grid).__name__}")
    if len(grid) < 2:
        raise ValueError("the grid needs at least two rotations to estimate L_sigma")

    train_frames = _read_frames(train, "training")
    train_labels = {
        t.name: _labels(train_frames, t, "training") for t in specs + force_terms
    }
    validation_frames = None
    if validation is not None:
        validation_frames = _read_frames(validation, "validation")
        validation_labels = {
            t.name: _labels(validation_frames, t, "validation")
            for t in specs + force_terms
        }

    # ---- one pass over the training structures: normal equations
    systems = prepare_systems(train_frames, model)
    infos = _structure_infos(model, systems, specs)
    equations = {
        t.name: _NormalEquations(t, train_labels[t.name], infos, grid)
        for t in specs + force_terms
    }
    streams = [_Stream(model, grid, specs, systems, infos, batch_size, progress)]
    if len(force_terms) != 0:
        streams.append(
            _ForceStream(model, grid, force_terms, systems, infos, batch_size, progress)
        )
    for stream in streams:
        for structure, indices, rotations, designs in stream:
            for name, (design, offset) in designs.items():
                equations[name].add(structure, indices, rotations, design, offset)

    # ---- every gamma: one solve per target
    parameters = {}
    objective = torch.zeros(len(gammas), dtype=torch.float64)
    training_mse, training_equivariance, undetermined = {}, {}, {}
    gamma_values = torch.tensor(gammas, dtype=torch.float64)
    for target in specs:
        terms = [target] if target.forces is None else [target, target.forces]
        quadratics = [(t, *equations[t.name].quadratics()) for t in terms]
        solutions, undetermined[target.name] = _solve(
            target,
            [(t.weight, mu, sigma) for t, mu, sigma in quadratics],
            gammas,
            ridge,
            target.reduce(target.readout.theta().detach()),
        )
        parameters[target.name] = solutions
        for term, mu, sigma in quadratics:
            training_mse[term.name] = mu.value(solutions)
            training_equivariance[term.name] = sigma.value(solutions)
            objective += term.weight * (
                training_mse[term.name]
                + gamma_values * training_equivariance[term.name]
            )
        objective += ridge * solutions.square().sum(dim=1)

    result = RetrainResult(
        gammas=gammas,
        targets=names,
        terms=[name for t in specs for name in _term_names(t)],
        objective=objective,
        training_mse=training_mse,
        training_equivariance=training_equivariance,
        parameters=parameters,
        undetermined=undetermined,
        grid=grid,
        ridge=ridge,
    )

    # ---- one pass over the validation structures for all gammas at once
    if validation_frames is not None:
        systems = prepare_systems(validation_frames, model)
        infos = _structure_infos(model, systems, specs)
        evaluations = {
            t.name: _Evaluation(t, validation_labels[t.name], parameters[t.name], grid)
            for t in specs
        }
        for term in force_terms:
            evaluations[term.name] = _Evaluation(
                term,
                validation_labels[term.name],
                parameters[term.target.name],
                grid,
            )
        streams = [_Stream(model, grid, specs, systems, infos, batch_size, progress)]
        if len(force_terms) != 0:
            streams.append(
                _ForceStream(
                    model, grid, force_terms, systems, infos, batch_size, progress
                )
            )
        for stream in streams:
            for structure, indices, rotations, designs in stream:
                for name, (design, offset) in designs.items():
                    evaluations[name].add(structure, indices, rotations, design, offset)
        for name, evaluation in evaluations.items():
            result.validation_rmse[name] = evaluation.rmse()
            result.validation_equivariance_rmse[name] = (
                evaluation.equivariance_rmse().mean(dim=0)
            )
            result.validation_predictions[name] = evaluation.predictions

    if output is not None:
        from .report import plot_pareto, write_pareto_tables

        with atomic_directory(output) as staging:
            for index, gamma in enumerate(gammas):
                for target in specs:
                    target.readout.assign(target.expand(parameters[target.name][index]))
                path = staging / checkpoint_name(gamma)
                torch.save(_checkpoint(pet, original), path)
                result.checkpoints.append(output / path.name)
            write_pareto_tables(result, staging / "pareto.csv", staging / "pareto.md")
            plot_pareto(result, staging / "pareto.png")
    return result


def checkpoint_name(gamma: float) -> str:
    """File name of the checkpoint retrained with ``gamma``: ``gamma-<value>.ckpt``."""
    return f"gamma-{gamma:g}.ckpt"


def _checkpoint(pet, original: dict) -> dict:
    """A metatrain checkpoint of ``pet`` keeping the training state of ``original``,
    so that ``mtt export``, ``mtt train --restart`` and fine-tuning accept it."""
    checkpoint = pet.get_checkpoint()
    for key in (
        "trainer_ckpt_version",
        "train_hypers",
        "epoch",
        "best_epoch",
        "best_metric",
        "optimizer_state_dict",
        "scheduler_state_dict",
        "best_optimizer_state_dict",
    ):
        if key in original:
            checkpoint[key] = original[key]
    return checkpoint


def _check_gammas(gammas) -> list[float]:
    if isinstance(gammas, (int, float)):
        gammas = [gammas]
    values = []
    for gamma in gammas:
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
            raise TypeError(f"gamma must be a number, got {gamma!r}")
        if not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
        values.append(float(gamma))
    if len(values) == 0:
        raise ValueError("no gamma given: pass at least one value")
    if len({checkpoint_name(g) for g in values}) != len(values):
        raise ValueError(f"gamma values are repeated: {values}")
    return values


_SUPPORTED = ("energy", "non_conservative_force", "non_conservative_stress")


def _select_targets(model: LoadedModel, targets) -> list[str]:
    known = list(model.targets)
    if targets is None:
        names = [name for name in known if name in _SUPPORTED]
        if len(names) == 0:
            raise ValueError(
                f"the model has no target closed-form retraining supports ({known}); "
                "name the targets explicitly"
            )
        return names
    if isinstance(targets, str):
        targets = [targets]
    names = list(targets)
    if len(names) == 0:
        raise ValueError("no targets given: name at least one target")
    if len(set(names)) != len(names):
        raise ValueError(f"targets are repeated: {names}")
    for name in names:
        if name not in known:
            raise ValueError(
                f"unknown target '{name}': the checkpoint was trained on {known}"
            )
    return names


def _check_gradients(model: LoadedModel, names, ignore_gradients: bool) -> list[str]:
    """The targets whose conservative forces enter the objective (those trained
    with position gradients, unless ``ignore_gradients``)."""
    with_forces = []
    for name in names:
        gradients = list(model.targets[name].gradients)
        if len(gradients) == 0 or ignore_gradients:
            continue
        unsupported = [g for g in gradients if g != "positions"]
        if len(unsupported) != 0:
            raise ValueError(
                f"target '{name}' was trained with its gradients {unsupported} "
                "(conservative stress), which closed-form retraining does not fit; "
                "pass ignore_gradients=True (--ignore-gradients) to retrain on its "
                "values alone"
            )
        with_forces.append(name)
    return with_forces


def _add_forces(target: _Target, label_key: str | None, weight: float) -> None:
    if target.rank != 0 or not target.per_structure or target.n_properties != 1:
        raise ValueError(
            f"target '{target.name}' has position gradients but is not a "
            "single-property per-structure energy; pass ignore_gradients=True "
            "(--ignore-gradients) to retrain on its values alone"
        )
    target.forces = _ForceTerm(
        target=target,
        label_key=DEFAULT_LABEL_KEYS["non_conservative_force"]
        if label_key is None
        else label_key,
        weight=float(weight),
    )


def _term_names(target: _Target) -> list[str]:
    return [target.name] + ([] if target.forces is None else [target.forces.name])


def _loss_weights(original: dict) -> tuple[dict[str, float], dict[str, float]]:
    """Per-target loss weights of the checkpoint's training options, and the
    weights of their ``positions`` gradients."""
    loss = (original.get("train_hypers") or {}).get("loss")
    weights, force_weights = {}, {}
    if isinstance(loss, dict):
        for name, options in loss.items():
            if not isinstance(options, dict):
                continue
            if "weight" in options:
                weights[name] = float(options["weight"])
            positions = (options.get("gradients") or {}).get("positions")
            if isinstance(positions, dict) and "weight" in positions:
                force_weights[name] = float(positions["weight"])
    return weights, force_weights


def retraining_objective(
    model,
    train,
    gamma: float,
    grid: O3Grid,
    targets: Sequence[str] | None = None,
    ridge: float = 0.0,
    weights: dict[str, float] | None = None,
    label_keys: dict[str, str] | None = None,
    ignore_gradients: bool = False,
    batch_size: int = 64,
) -> torch.Tensor:
    """The retraining objective evaluated by ordinary forward passes of ``model``.

    This is an independent implementation of the objective that
    :py:func:`retrain_last_layer` minimizes: it rotates the structures, calls the
    model and back-transforms its outputs, with autograd enabled, so that its
    gradient with respect to the readout parameters can be taken (gradient-based
    retraining, optimality checks). The conservative forces of an energy trained
    with position gradients are computed by automatic differentiation of the
    energy through the positions (and neighbour lists), keeping the graph.

    :param model: a metatrain PET (in memory) or a path to its checkpoint
    :param train: training structures with labels (see :py:func:`retrain_last_layer`)
    :param gamma: weight of ``L_sigma``
    :param grid: the rotations on which ``L_sigma`` is estimated
    :param targets: targets in the objective (default as in
        :py:func:`retrain_last_layer`)
    :param ridge: coefficient of the ridge term
    :param weights: per-term weights (default 1), keyed by target or
        ``"<target>/forces"``
    :param label_keys: per-term label names (forces: ``forces`` by default)
    :param ignore_gradients: leave the forces of energies trained with them out
    :param batch_size: structures per model call
    :return: scalar float64 tensor
    """
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    loaded = load_model(model) if not isinstance(model, LoadedModel) else model
    pet = _as_pet(loaded)
    names = _select_targets(loaded, targets)
    with_forces = _check_gradients(loaded, names, ignore_gradients)
    weights = dict(weights or {})
    label_keys = dict(label_keys or {})
    specs = [
        _make_target(loaded, n, label_keys.get(n), weights.get(n, 1.0)) for n in names
    ]
    for t in specs:
        if t.name in with_forces:
            key = f"{t.name}/forces"
            _add_forces(t, label_keys.get(key), weights.get(key, 1.0))
    force_terms = [t.forces for t in specs if t.forces is not None]
    frames = _read_frames(train, "training")
    labels = {t.name: _labels(frames, t, "training") for t in specs + force_terms}
    unbiased_factor = _unbiased_factor(grid)
    rotations = torch.cat([torch.eye(3, dtype=torch.float64)[None], grid.rotations])

    copies, positions = [], []
    for frame in frames:
        for rotation in rotations.numpy():
            rotated = frame.copy()
            rotated.calc = None
            rotated.set_cell(frame.cell.array @ rotation.T, scale_atoms=False)
            rotated.positions = frame.positions @ rotation.T
            if len(force_terms) == 0:
                copies.append(rotated)
                continue
            # positions requiring gradients before the neighbour lists are computed,
            # so that the lists carry them too
            # in the model's length unit, as prepare_systems does for ase.Atoms
            length_factor = unit_conversion_factor("angstrom", loaded.length_unit)
            system = systems_to_torch(rotated, dtype=loaded.dtype)
            leaf = (system.positions * length_factor).detach().requires_grad_(True)
            copies.append(
                System(
                    types=system.types,
                    positions=leaf,
                    cell=system.cell * length_factor,
                    pbc=system.pbc,
                )
            )
            positions.append(leaf)
    systems = prepare_systems(copies, loaded)
    infos = _structure_infos(loaded, prepare_systems(frames, loaded), specs)
    requests = {
        t.name: ModelOutput(sample_kind="system" if t.per_structure else "atom")
        for t in specs
    }
    predictions: dict[str, list[torch.Tensor]] = {t.name: [] for t in specs}
    for term in force_terms:
        predictions[term.name] = []
    for start in range(0, len(systems), batch_size):
        batch = systems[start : start + batch_size]
        outputs = pet(batch, requests, None)
        for term in force_terms:
            energy = outputs[term.target.name].block().values.sum()
            gradients = torch.autograd.grad(
                energy, positions[start : start + batch_size], create_graph=True
            )
            for gradient in gradients:
                predictions[term.name].append(-gradient.to(torch.float64)[..., None])
        for t in specs:
            block = outputs[t.name].block()
            system_index = block.samples.column("system")
            for local in range(len(batch)):
                predictions[t.name].append(
                    block.values[system_index == local].to(torch.float64)
                )

    total = torch.zeros((), dtype=torch.float64)
    n_copies = len(rotations)
    for t in specs + force_terms:
        squared_error = torch.zeros((), dtype=torch.float64)
        variance = torch.zeros((), dtype=torch.float64)
        count = 0
        for index in range(len(frames)):
            values = torch.stack(
                predictions[t.name][index * n_copies : (index + 1) * n_copies]
            )
            scale = t.loss_scale(infos[index], values.shape[1:])
            residual = (values[0] - labels[t.name][index]) / scale
            squared_error = squared_error + residual.square().sum()
            count += residual.numel()
            back = _back_rotate(values[1:], t.rank, grid.rotations) / scale
            mean = torch.einsum("c,c...->...", grid.weights, back)
            spread = torch.einsum("c,c...->...", grid.weights, (back - mean).square())
            variance = variance + unbiased_factor * spread.sum()
        total = total + t.weight * (squared_error + gamma * variance) / count
        if ridge != 0 and isinstance(t, _Target):
            total = total + ridge * t.reduce(t.readout.theta()).square().sum()
    return total
