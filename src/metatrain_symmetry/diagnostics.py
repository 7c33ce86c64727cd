"""Equivariance errors, character projections, spectra and symmetrized predictions,
all computed in one pass over the rotated copies streamed by the engine.

For an output ``t`` and a grid of elements ``g`` with weights ``w_g``:

* the back-transformed response ``z(g) = rho(g)^-1 t(g x)`` gives the symmetrized
  prediction ``t_bar = sum_g w_g z(g)`` (``average``) and the equivariance error
  ``A = sum_g w_g ||z(g) - t_bar||^2`` (``variance``, averaged over components as
  in metatomic's ``o3::variance::<name>``);
* the direct response ``u(g) = t(g x)`` gives the character projections
  ``B_{lambda,sigma} = (2 lambda + 1) ||sum_g w_g D_{lambda,sigma}(g^-1) u(g)||^2``
  (``character_projection``) and the normalized per-structure spectrum
  ``b = B / sum_g w_g ||u(g)||^2`` (``spectrum``).

Every moment is accumulated in float64, centred on the first rotated copy so that
``E[x^2] - E[x]^2`` does not lose digits when the mean is large.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import ModelOutput

from .engine import RotatedEvaluator, SystemLike, prepare_systems
from .grid import O3Grid
from .irreps import (
    BlockLayout,
    block_layout,
    decompose,
    irrep_keys,
    mu_labels,
    undo_rotation,
)
from .models import LoadedModel, ModelLike, load_model


_EPSILON = torch.finfo(torch.float64).eps
_TINY = torch.finfo(torch.float64).tiny

# largest angular momentum of metatomic's standard Cartesian quantities
_STANDARD_LAMBDA = {
    "non_conservative_force": 1,
    "non_conservative_forces": 1,
    "position": 1,
    "positions": 1,
    "velocity": 1,
    "momentum": 1,
    "heat_flux": 1,
    "non_conservative_stress": 2,
    "forces": 1,
    "stress": 2,
}


@dataclass
class AnalysisResult:
    """Rotational analysis of some outputs of a model, one entry per output name.

    All TensorMaps have a ``"system"`` sample dimension indexing the input
    structures, followed by the output's own sample dimensions.
    """

    variance: dict[str, TensorMap]
    """equivariance error ``A``, averaged over components, one block per irrep
    (metadata as metatomic's ``o3::variance::<name>``)"""
    character_projection: dict[str, TensorMap]
    """``B_{lambda,sigma}`` of the direct response, with ``chi_lambda`` and
    ``chi_sigma`` key dimensions (as ``o3::character_projection::<name>``)"""
    average: dict[str, TensorMap]
    """symmetrized prediction ``t_bar``, with the output's own metadata"""
    spectrum: dict[str, TensorMap]
    """normalized per-structure spectrum ``b``: one block, samples ``["system"]``,
    properties ``["chi_lambda", "chi_sigma"]``"""
    grid: O3Grid
    max_lambda: int
    outputs: list[str] = field(default_factory=list)

    def equivariance_rmse(self, name: str) -> torch.Tensor:
        """Per-structure equivariance RMSE of ``name``:
        ``sqrt(mean(A / (2 lambda + 1)))``, see :py:func:`equivariance_rmse`."""
        return equivariance_rmse(self.variance[name])


def equivariance_rmse(variance: TensorMap) -> torch.Tensor:
    """Reduce a ``variance`` TensorMap to one equivariance RMSE per structure.

    The RMSE is the root mean square deviation of every scalar component (over
    samples, components and properties, all irreps together) from the symmetrized
    prediction: ``sqrt(sum (2 lambda + 1) V / sum (2 lambda + 1))`` where ``V`` is
    the component-averaged variance. It has the units of the output and compares
    directly with a per-component error such as a force RMSE.

    :param variance: ``AnalysisResult.variance[name]``
    :return: ``(n_structures,)`` float64 tensor, indexed by the ``"system"`` label
    """
    n_structures = 0
    for block in variance.blocks():
        if len(block.samples) > 0:
            n_structures = max(
                n_structures, int(block.samples.column("system").max()) + 1
            )
    total = torch.zeros(n_structures, dtype=torch.float64)
    count = torch.zeros(n_structures, dtype=torch.float64)
    names = list(variance.keys.names)
    for key, block in variance.items():
        dimension = 1
        if "o3_lambda" in names:
            dimension = 2 * int(key["o3_lambda"]) + 1
        system = block.samples.column("system").to(torch.long)
        values = block.values.to(torch.float64).reshape(len(system), -1)
        total.index_add_(0, system, dimension * values.sum(dim=1))
        count.index_add_(
            0,
            system,
            torch.full_like(system, dimension * values.shape[1], dtype=torch.float64),
        )
    return torch.sqrt(total / count.clamp(min=1))


def analyze(
    model: ModelLike,
    systems: Sequence[SystemLike],
    outputs: Sequence[str],
    max_lambda: int = 4,
    grid: O3Grid | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    per_atom: bool = False,
) -> AnalysisResult:
    """Rotational analysis of a model's outputs and internal features.

    Evaluates the model once on every rotated copy (every element of ``grid``) of
    every structure and computes, for each requested name, the equivariance error,
    the character projections, the symmetrized prediction and the normalized
    spectrum.

    :param model: anything :py:func:`load_model` accepts
    :param systems: ``ase.Atoms`` or metatomic ``System`` objects, periodic or not
    :param outputs: output names (``"energy"``, ``"non_conservative_force"``, ...),
        internal features (``"mtt::feature::<module path>"``), and the derivatives
        of the energy ``"forces"`` (``-dE/dr``, per atom) and ``"stress"``
        (``(1/V) dE/d(strain)``, per structure, periodic structures only),
        computed by automatic differentiation on every rotated copy
    :param max_lambda: largest ``lambda`` of the character projections
    :param grid: integration grid; by default ``O3Grid(degree)`` with
        ``degree = max(2 max_lambda, 2 L + 1)``, ``L`` the largest angular momentum
        of the requested outputs
    :param batch_size: rotated copies per model call (default: about 4096 atoms)
    :param progress: show a progress bar
    :param per_atom: analyse per-atom contributions of per-structure outputs such as
        the energy
    :return: the analysis, see :py:class:`AnalysisResult`
    """
    model = load_model(model)
    names = _check_names(outputs)
    if (
        isinstance(max_lambda, bool)
        or not isinstance(max_lambda, int)
        or max_lambda < 0
    ):
        raise ValueError(f"max_lambda must be a non-negative integer, got {max_lambda}")
    if grid is None:
        target_lambda = max(_STANDARD_LAMBDA.get(name, 0) for name in names)
        grid = O3Grid(degree=max(2 * max_lambda, 2 * target_lambda + 1))
    if not isinstance(grid, O3Grid):
        raise TypeError(f"grid must be an O3Grid, got {type(grid).__name__}")
    grid.check_lambda(max_lambda)
    if not grid.inversion:
        raise ValueError(
            "analyze needs improper rotations to resolve sigma: use an O3Grid with "
            "inversion=True"
        )
    model.check_names(names)
    systems = prepare_systems(systems, model)
    model.warn_if_single_precision()

    requests = {name: _request(model, name, per_atom) for name in names}
    evaluator = RotatedEvaluator(model, grid, batch_size)
    integrator = _Integrator(grid, max_lambda)
    accumulators: dict[str, dict[int, list[_BlockAccumulator]]] = {n: {} for n in names}
    keys: dict[str, Labels] = {}
    finished: dict[str, list] = {name: [] for name in names}

    current = None
    for chunk in evaluator.stream(systems, requests, progress=progress):
        if current is not None and chunk.structure != current:
            _finish_structure(current, accumulators, finished, integrator)
        current = chunk.structure
        for name, output in chunk.outputs.items():
            keys.setdefault(name, output.keys)
            per_structure = accumulators[name]
            if chunk.structure not in per_structure:
                per_structure[chunk.structure] = [
                    _BlockAccumulator(name, output.keys, index, block, integrator)
                    for index, block in enumerate(output.blocks)
                ]
            for accumulator, block in zip(
                per_structure[chunk.structure], output.blocks, strict=True
            ):
                accumulator.add(block, chunk.rotations)
    _finish_structure(current, accumulators, finished, integrator)

    result = AnalysisResult(
        {}, {}, {}, {}, grid=grid, max_lambda=max_lambda, outputs=names
    )
    for name in names:
        _assemble(name, keys[name], finished[name], result, max_lambda)
    return result


def _check_names(outputs) -> list[str]:
    if isinstance(outputs, str):
        outputs = [outputs]
    names = list(outputs)
    if len(names) == 0:
        raise ValueError("no outputs requested: name at least one output or feature")
    if len(set(names)) != len(names):
        raise ValueError(f"outputs are requested more than once: {names}")
    return names


def _request(model: LoadedModel, name: str, per_atom: bool) -> ModelOutput:
    kind = model.natural_sample_kind(name)
    if per_atom and kind == "system" and name != "stress":
        kind = "atom"
    declared = model.outputs.get(name)
    unit = "" if declared is None else declared.unit
    return ModelOutput(unit=unit, sample_kind=kind)


class _Integrator:
    """Grid quantities shared by every accumulator: matrices, Wigner matrices and
    the projector onto ``(lambda, sigma, m, n)`` character coefficients."""

    def __init__(self, grid: O3Grid, max_lambda: int):
        self.grid = grid
        self.max_lambda = max_lambda
        self.weights = grid.weights
        self.rotations = grid.rotations
        self.improper = grid.improper
        self._wigner_lambda = max_lambda
        self.wigner = grid.wigner_matrices(max_lambda)
        # rows: for each lambda, sigma = +1 then -1, (2 lambda + 1)^2 entries (m, n)
        # of w_g * s(g) * D(g)^T, with s = sigma (-1)^lambda on improper elements
        rows = []
        self.row_slices = []
        start = 0
        for o3_lambda in range(max_lambda + 1):
            transposed = self.wigner[o3_lambda].transpose(1, 2).reshape(len(grid), -1)
            for sigma in (1, -1):
                parity = sigma * (-1) ** o3_lambda
                sign = torch.where(
                    self.improper, torch.tensor(float(parity)), torch.tensor(1.0)
                ).to(torch.float64)
                rows.append((self.weights * sign).unsqueeze(1) * transposed)
                size = (2 * o3_lambda + 1) ** 2
                self.row_slices.append((o3_lambda, sigma, slice(start, start + size)))
                start += size
        self.projector = torch.cat(rows, dim=1)  # (N, n_rows)

    def wigner_for(self, needed_lambda: int) -> list[torch.Tensor]:
        if needed_lambda > self._wigner_lambda:
            self.wigner = self.grid.wigner_matrices(needed_lambda)
            self._wigner_lambda = needed_lambda
        return self.wigner


class _BlockAccumulator:
    """Running moments of one output block for one structure."""

    def __init__(self, name, keys: Labels, index: int, block, integrator: _Integrator):
        self.name = name
        self.integrator = integrator
        key_names = list(keys.names)
        key_values = keys.values[index]
        self.layout: BlockLayout = block_layout(
            name, key_names, key_values, block.components
        )
        self.irreps = self.layout.irreps
        self.irrep_keys = [
            irrep_keys(key_names, key_values, irrep) for irrep in self.irreps
        ]
        self.sample_names = block.sample_names
        self.sample_values = block.sample_values
        self.components = block.components
        self.properties = block.properties
        self.reference: torch.Tensor | None = None
        self.first_moment: torch.Tensor | None = None
        self.second_moments: list[torch.Tensor] = []
        self.absolute_second_moments: list[torch.Tensor] = []
        self.coefficients: list[torch.Tensor] = []
        self.direct_norm = torch.zeros((), dtype=torch.float64)
        self.total_weight = 0.0

    def add(self, chunk, rotation_indices: torch.Tensor) -> None:
        integrator = self.integrator
        values = chunk.values.to(dtype=torch.float64, device="cpu")
        weights = integrator.weights[rotation_indices]
        rotations = integrator.rotations[rotation_indices]
        improper = integrator.improper[rotation_indices]
        wigner = []
        if self.layout.kind == "spherical":
            needed = self.layout.max_lambda
            wigner = [
                w[rotation_indices] for w in integrator.wigner_for(needed)[: needed + 1]
            ]

        backrotated = undo_rotation(values, self.layout, rotations, wigner, improper)
        if self.reference is None:
            self.reference = backrotated[0].clone()
            self.first_moment = torch.zeros_like(self.reference)
        centered = backrotated - self.reference.unsqueeze(0)
        self.first_moment += torch.einsum("c,c...->...", weights, centered)

        centered_parts = decompose(centered, self.layout)
        direct_parts = decompose(values, self.layout)
        projector = integrator.projector[rotation_indices].T  # (n_rows, n_copies)
        first_chunk = len(self.second_moments) == 0
        for index, (centered_part, direct_part) in enumerate(
            zip(centered_parts, direct_parts, strict=True)
        ):
            squared = _sum_components(centered_part.square())
            second = torch.einsum("c,csp->sp", weights, squared)
            coefficients = projector @ direct_part.reshape(direct_part.shape[0], -1)
            if first_chunk:
                self.second_moments.append(second)
                self.coefficients.append(coefficients)
            else:
                self.second_moments[index] += second
                self.coefficients[index] += coefficients
        self.direct_norm += torch.einsum(
            "c,c->", weights, values.reshape(values.shape[0], -1).square().sum(dim=1)
        )
        self.total_weight += float(weights.sum())

    def finish(self, n_grid: int) -> dict:
        """Final per-structure values of every quantity."""
        if abs(self.total_weight - 1.0) > 1e-9:
            raise RuntimeError(
                f"internal error: weights of '{self.name}' sum to {self.total_weight}"
            )
        average = self.reference + self.first_moment
        mean_parts = decompose(self.first_moment.unsqueeze(0), self.layout)
        direct_parts_shapes = decompose(self.reference.unsqueeze(0), self.layout)
        variances = []
        projections = []
        for index, _irrep in enumerate(self.irreps):
            mean_norm = _sum_components(mean_parts[index].square())[0]
            variance = self.second_moments[index] - mean_norm
            # the variance is a difference of accumulated sums: values within the
            # round-off bound of the sums are zero, larger negative values mean
            # the grid does not resolve the response
            n_epsilon = n_grid * _EPSILON
            tolerance = (
                64
                * n_epsilon
                / (1 - n_epsilon)
                * torch.clamp(self.second_moments[index] + mean_norm, min=_TINY)
            )
            if bool(torch.any(variance < -tolerance)):
                raise ValueError(
                    f"the equivariance error of '{self.name}' is materially negative: "
                    "the grid does not resolve this output; use a grid of higher "
                    "degree"
                )
            n_components = 1
            for size in direct_parts_shapes[index].shape[2:-1]:
                n_components *= size
            variances.append(variance.clamp(min=0.0) / n_components)

            component_shape = direct_parts_shapes[index].shape[1:]
            per_irrep = []
            for o3_lambda, sigma, rows in self.integrator.row_slices:
                coefficients = self.coefficients[index][rows]
                size = 2 * o3_lambda + 1
                squared = coefficients.square().sum(dim=0).reshape(component_shape)
                per_irrep.append((o3_lambda, sigma, size * squared))
            projections.append(per_irrep)
        return {
            "sample_names": self.sample_names,
            "sample_values": self.sample_values,
            "components": self.components,
            "properties": self.properties,
            "layout": self.layout,
            "irrep_keys": self.irrep_keys,
            "average": average,
            "variances": variances,
            "projections": projections,
            "direct_norm": self.direct_norm,
        }


def _sum_components(values: torch.Tensor) -> torch.Tensor:
    """``(c, s, *components, p) -> (c, s, p)``"""
    if values.ndim == 3:
        return values
    return values.flatten(2, -2).sum(dim=2)


def _finish_structure(structure, accumulators, finished, integrator) -> None:
    if structure is None:
        return
    for name, per_structure in accumulators.items():
        blocks = per_structure.pop(structure)
        finished[name].append(
            (structure, [block.finish(len(integrator.grid)) for block in blocks])
        )


def _samples(structure: int, names: list[str], values: torch.Tensor) -> torch.Tensor:
    system = torch.full((values.shape[0], 1), structure, dtype=torch.int32)
    return torch.cat([system, values.to(torch.int32)], dim=1)


def _assemble(name, keys: Labels, finished, result: AnalysisResult, max_lambda: int):
    """Join per-structure results into TensorMaps."""
    n_blocks = len(keys)
    first = finished[0][1]

    # average: the output's own metadata
    average_blocks = []
    for index in range(n_blocks):
        samples = Labels(
            ["system"] + first[index]["sample_names"],
            torch.cat(
                [_samples(s, [], b[index]["sample_values"]) for s, b in finished]
            ),
        )
        average_blocks.append(
            TensorBlock(
                values=torch.cat([b[index]["average"] for _, b in finished]),
                samples=samples,
                components=first[index]["components"],
                properties=first[index]["properties"],
            )
        )
    result.average[name] = TensorMap(keys, average_blocks)

    variance_keys, variance_blocks = [], []
    projection_keys, projection_blocks = [], []
    spectrum = torch.zeros(len(finished), max_lambda + 1, 2, dtype=torch.float64)
    for index in range(n_blocks):
        info = first[index]
        samples = Labels(
            ["system"] + info["sample_names"],
            torch.cat(
                [_samples(s, [], b[index]["sample_values"]) for s, b in finished]
            ),
        )
        for part, irrep in enumerate(info["layout"].irreps):
            key_names, key_values = info["irrep_keys"][part]
            if irrep.o3_lambda is not None:
                components = [mu_labels(irrep.o3_lambda)]
            else:
                components = info["components"]
            variance_keys.append((key_names, key_values))
            variance_blocks.append(
                TensorBlock(
                    values=torch.cat(
                        [b[index]["variances"][part] for _, b in finished]
                    ),
                    samples=samples,
                    components=[],
                    properties=info["properties"],
                )
            )
            projection_names = [n for n in key_names if n != "_"]
            projection_prefix = [
                v for n, v in zip(key_names, key_values, strict=True) if n != "_"
            ]
            for entry, (o3_lambda, sigma, _) in enumerate(info["projections"][part]):
                projection_keys.append(
                    (
                        projection_names + ["chi_lambda", "chi_sigma"],
                        projection_prefix + [o3_lambda, sigma],
                    )
                )
                projection_blocks.append(
                    TensorBlock(
                        values=torch.cat(
                            [
                                b[index]["projections"][part][entry][2]
                                for _, b in finished
                            ]
                        ),
                        samples=samples,
                        components=components,
                        properties=info["properties"],
                    )
                )
                for row, (_, blocks) in enumerate(finished):
                    value = blocks[index]["projections"][part][entry][2].sum()
                    spectrum[row, o3_lambda, 0 if sigma == 1 else 1] += value

    result.variance[name] = TensorMap(_labels(variance_keys), variance_blocks)
    result.character_projection[name] = TensorMap(
        _labels(projection_keys), projection_blocks
    )

    norms = torch.stack(
        [sum(block["direct_norm"] for block in blocks) for _, blocks in finished]
    )
    normalized = spectrum / torch.where(norms > 0, norms, torch.ones_like(norms)).view(
        -1, 1, 1
    )
    properties = Labels(
        ["chi_lambda", "chi_sigma"],
        torch.tensor(
            [
                [o3_lambda, sigma]
                for o3_lambda in range(max_lambda + 1)
                for sigma in (1, -1)
            ],
            dtype=torch.int32,
        ),
    )
    structures = torch.tensor([[s] for s, _ in finished], dtype=torch.int32)
    result.spectrum[name] = TensorMap(
        Labels.single(),
        [
            TensorBlock(
                values=normalized.reshape(len(finished), -1),
                samples=Labels(["system"], structures),
                components=[],
                properties=properties,
            )
        ],
    )


def _labels(entries) -> Labels:
    names = entries[0][0]
    for entry_names, _ in entries:
        if entry_names != names:
            raise ValueError(
                f"output blocks have inconsistent key names {names} and {entry_names}"
            )
    return Labels(
        names, torch.tensor([values for _, values in entries], dtype=torch.int32)
    )
