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

On random grids the weighted sums are replaced by unbiased Monte-Carlo estimates
over the independent pairs ``(R, -R)`` of the grid, with standard errors (see
:py:mod:`metatrain_symmetry.estimators`); exact grids take the path above
unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import ModelOutput

from ._utils import is_integer
from .engine import RotatedEvaluator
from .estimators import (
    factored_u_statistic,
    pair_u_covariance,
    paired_mean_square_deviation,
)
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
from .quantities import standard_lambda
from .systems import SystemLike, prepare_systems


_EPSILON = torch.finfo(torch.float64).eps
_TINY = torch.finfo(torch.float64).tiny
# independent pairs (R, -R) a random grid needs: two for an unbiased estimate of a
# squared mean, four for the variance of that estimate
_MIN_PAIRS = 4
# relative standard error of a random grid's estimate of <||u||^2> above which the
# linearized normalized spectrum (a ratio of estimates) is not trusted
_NORM_TOLERANCE = 0.1


@dataclass
class AnalysisResult:
    """Rotational analysis of some outputs of a model, one entry per output name.

    All TensorMaps have a ``"system"`` sample dimension indexing the input
    structures, followed by the output's own sample dimensions.

    On a random grid (``estimated`` is true), ``variance``,
    ``character_projection`` and ``spectrum`` hold unbiased Monte-Carlo estimates
    (projections and spectra can be negative where the true value is close to
    zero), and the ``*_error`` maps their standard errors.
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
    estimated: bool = False
    """whether the values are Monte-Carlo estimates (a random grid, see
    :py:meth:`O3Grid.random`) that come with standard errors, rather than
    exact quadratures"""
    variance_error: dict[str, TensorMap] = field(default_factory=dict)
    """standard error of each ``variance`` value, same metadata (random grids
    only)"""
    character_projection_error: dict[str, TensorMap] = field(default_factory=dict)
    """standard error of each ``character_projection`` value, same metadata
    (random grids only)"""
    spectrum_error: dict[str, TensorMap] = field(default_factory=dict)
    """standard error of each ``spectrum`` value, same metadata (random grids
    only)"""
    spectrum_covariance: dict[str, torch.Tensor] = field(default_factory=dict)
    """covariance of each structure's spectrum estimate, ``(n_structures,
    n_irreps, n_irreps)`` with irreps ordered as the ``spectrum`` properties
    (random grids only)"""
    mean_spectrum_covariance: dict[str, torch.Tensor] = field(default_factory=dict)
    """covariance of the mean spectrum over structures, ``(n_irreps, n_irreps)``;
    the structures share the grid's rotations, so their errors are correlated and
    this is not the average of ``spectrum_covariance`` (random grids only)"""

    def equivariance_rmse(self, name: str) -> torch.Tensor:
        """Per-structure equivariance RMSE of ``name``:
        ``sqrt(mean(A / (2 lambda + 1)))``, see :py:func:`equivariance_rmse`."""
        return equivariance_rmse(self.variance[name])

    def spectrum_sum(
        self, name: str, irreps: Sequence[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-structure sum of the normalized spectrum of ``name`` over some
        irreps, and its standard error.

        :param irreps: ``(lambda, sigma)`` pairs
        :return: ``(values, errors)``, both ``(n_structures,)``; ``errors`` is
            ``None`` on exact grids
        """
        selection = self._irrep_selection(irreps)
        values = self.spectrum[name].block().values @ selection
        if not self.estimated:
            return values, None
        covariance = self.spectrum_covariance[name]
        variance = torch.einsum("i,sij,j->s", selection, covariance, selection)
        return values, variance.clamp(min=0.0).sqrt()

    def mean_spectrum(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean of the normalized spectrum of ``name`` over structures, and its
        standard error.

        :return: ``(values, errors)``, both ``(n_irreps,)`` ordered as the
            ``spectrum`` properties; ``errors`` is ``None`` on exact grids
        """
        values = self.spectrum[name].block().values.mean(dim=0)
        if not self.estimated:
            return values, None
        covariance = self.mean_spectrum_covariance[name]
        return values, torch.diagonal(covariance).clamp(min=0.0).sqrt()

    def mean_spectrum_sum(
        self, name: str, irreps: Sequence[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean over structures of :py:meth:`spectrum_sum` and its standard error
        (``None`` on exact grids), both scalars."""
        selection = self._irrep_selection(irreps)
        values = self.spectrum[name].block().values.mean(dim=0) @ selection
        if not self.estimated:
            return values, None
        covariance = self.mean_spectrum_covariance[name]
        return values, (selection @ covariance @ selection).clamp(min=0.0).sqrt()

    def _irrep_selection(self, irreps: Sequence[tuple[int, int]]) -> torch.Tensor:
        selection = torch.zeros(2 * (self.max_lambda + 1), dtype=torch.float64)
        for o3_lambda, sigma in irreps:
            if not 0 <= o3_lambda <= self.max_lambda or sigma not in (1, -1):
                raise ValueError(
                    f"irrep ({o3_lambda}, {sigma}) is not in the spectrum "
                    f"(lambda up to {self.max_lambda}, sigma = +1 or -1)"
                )
            selection[2 * o3_lambda + (0 if sigma == 1 else 1)] = 1.0
        return selection


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
    if not is_integer(max_lambda) or max_lambda < 0:
        raise ValueError(f"max_lambda must be a non-negative integer, got {max_lambda}")
    if grid is None:
        target_lambda = max(standard_lambda(name) for name in names)
        grid = O3Grid(degree=max(2 * max_lambda, 2 * target_lambda + 1))
    if not isinstance(grid, O3Grid):
        raise TypeError(f"grid must be an O3Grid, got {type(grid).__name__}")
    grid.check_lambda(max_lambda)
    if not grid.inversion:
        raise ValueError(
            "analyze needs improper rotations to resolve sigma: use an O3Grid with "
            "inversion=True"
        )
    if grid.degree is None and len(grid) < 2 * _MIN_PAIRS:
        raise ValueError(
            f"a random grid needs at least {2 * _MIN_PAIRS} elements "
            f"({_MIN_PAIRS} rotations and their inversions) to estimate spectra "
            f"and their standard errors, got {len(grid)}"
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
        {},
        {},
        {},
        {},
        grid=grid,
        max_lambda=max_lambda,
        outputs=names,
        estimated=integrator.estimated,
    )
    for name in names:
        _assemble(name, keys[name], finished[name], result, max_lambda, integrator)
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

        # Monte-Carlo grids: the independent samples are the pairs (R_i, -R_i), and
        # the kernels of the estimates weigh every two pairs by (2 lambda + 1)
        # chi_lambda(R_i R_j^T) = (2 lambda + 1) tr(D_i^T D_j)
        self.estimated = grid.degree is None
        self.n_pairs = len(grid) // 2
        self.channel_weights: torch.Tensor | None = None
        """``(max_lambda + 1, M, M)`` on Monte-Carlo grids"""
        if self.estimated:
            half = self.n_pairs
            if not torch.equal(self.rotations[half:], -self.rotations[:half]):
                raise ValueError(
                    "a Monte-Carlo grid must list its rotations followed by their "
                    "inversions, as O3Grid.random does"
                )
            weights = []
            for o3_lambda in range(max_lambda + 1):
                flat = self.wigner[o3_lambda][:half].reshape(half, -1)
                weights.append((2 * o3_lambda + 1) * (flat @ flat.T))
            self.channel_weights = torch.stack(weights)

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
        # Monte-Carlo grids: (rotation indices, direct, centred back-transformed
        # values) of every chunk, kept until the structure is complete because the
        # estimates and their errors pair each rotation with its inversion and
        # compare every two pairs
        self.stored: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

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
        if integrator.estimated:
            self.stored.append((rotation_indices, values.clone(), centered))

    def finish(self, n_grid: int) -> dict:
        """Final per-structure values of every quantity."""
        if abs(self.total_weight - 1.0) > 1e-9:
            raise RuntimeError(
                f"internal error: weights of '{self.name}' sum to {self.total_weight}"
            )
        if self.integrator.estimated:
            return self._finish_estimated()
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

    def _finish_estimated(self) -> dict:
        """Final per-structure estimates on a Monte-Carlo grid, with their
        variances, and the pair kernels of the structure's spectrum.

        The ``M`` pairs ``(R_i, -R_i)`` are the independent samples. With ``a_i =
        u(R_i)`` and ``b_i = u(-R_i)`` for one scalar entry of the direct response,
        the character coefficient of ``(lambda, sigma)`` is the mean over pairs of
        ``Y_i = D(R_i)^T h_i`` with ``h_i = (a_i + p b_i) / 2`` and ``p = sigma
        (-1)^lambda``, so that ``B = (2 lambda + 1) ||E Y||^2`` is estimated by the
        U-statistic of the kernel ``(2 lambda + 1) chi_lambda(R_i R_j^T) h_i h_j``.
        """
        integrator = self.integrator
        half = integrator.n_pairs
        indices = torch.cat([item[0] for item in self.stored])
        order = torch.argsort(indices)
        values = torch.cat([item[1] for item in self.stored])[order]
        centered = torch.cat([item[2] for item in self.stored])[order]
        self.stored = []

        average = self.reference + self.first_moment
        centered_parts = decompose(centered, self.layout)
        direct_parts = decompose(values, self.layout)
        variances, variance_errors = [], []
        projections, projection_errors = [], []
        grams = {
            1: torch.zeros(half, half, dtype=torch.float64),
            -1: torch.zeros(half, half, dtype=torch.float64),
        }
        for centered_part, direct_part in zip(
            centered_parts, direct_parts, strict=True
        ):
            # equivariance error: entries (samples, properties), components summed
            n_copies, n_samples = centered_part.shape[:2]
            n_properties = centered_part.shape[-1]
            grouped = centered_part.reshape(n_copies, n_samples, -1, n_properties)
            n_components = grouped.shape[2]
            grouped = grouped.transpose(1, 2).reshape(n_copies, n_components, -1)
            estimate, variance = paired_mean_square_deviation(
                grouped[:half], grouped[half:]
            )
            # the estimate is a sum of squares (see paired_mean_square_deviation):
            # negative values are round-off
            variances.append(
                estimate.clamp(min=0.0).reshape(n_samples, n_properties) / n_components
            )
            variance_errors.append(
                variance.clamp(min=0.0).sqrt().reshape(n_samples, n_properties)
                / n_components
            )

            component_shape = direct_part.shape[1:]
            flat = direct_part.reshape(n_copies, -1)
            paired = {
                1: (flat[:half] + flat[half:]) / 2,
                -1: (flat[:half] - flat[half:]) / 2,
            }
            for parity, pair_values in paired.items():
                grams[parity] += pair_values @ pair_values.T
            estimates = {
                parity: factored_u_statistic(integrator.channel_weights, pair_values)
                for parity, pair_values in paired.items()
            }
            per_irrep, per_irrep_errors = [], []
            for o3_lambda, sigma, _ in integrator.row_slices:
                parity = sigma * (-1) ** o3_lambda
                estimate, variance = estimates[parity]
                estimate, variance = estimate[o3_lambda], variance[o3_lambda]
                per_irrep.append((o3_lambda, sigma, estimate.reshape(component_shape)))
                per_irrep_errors.append(
                    (
                        o3_lambda,
                        sigma,
                        variance.clamp(min=0.0).sqrt().reshape(component_shape),
                    )
                )
            projections.append(per_irrep)
            projection_errors.append(per_irrep_errors)

        flat = values.reshape(values.shape[0], -1).square().sum(dim=1)
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
            "variance_errors": variance_errors,
            "projection_errors": projection_errors,
            "grams": grams,
            # mean square of the direct response in each pair
            "pair_norms": (flat[:half] + flat[half:]) / 2,
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


def _assemble(
    name,
    keys: Labels,
    finished,
    result: AnalysisResult,
    max_lambda: int,
    integrator: _Integrator,
):
    """Join per-structure results into TensorMaps."""
    n_blocks = len(keys)
    first = finished[0][1]
    estimated = integrator.estimated

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

    variance_keys, variance_blocks, variance_error_blocks = [], [], []
    projection_keys, projection_blocks, projection_error_blocks = [], [], []
    spectrum = torch.zeros(len(finished), max_lambda + 1, 2, dtype=torch.float64)
    for index in range(n_blocks):
        info = first[index]
        samples = Labels(
            ["system"] + info["sample_names"],
            torch.cat(
                [_samples(s, [], b[index]["sample_values"]) for s, b in finished]
            ),
        )

        def block(values, components, samples=samples, info=info):
            return TensorBlock(
                values=values,
                samples=samples,
                components=components,
                properties=info["properties"],
            )

        for part, irrep in enumerate(info["layout"].irreps):
            key_names, key_values = info["irrep_keys"][part]
            if irrep.o3_lambda is not None:
                components = [mu_labels(irrep.o3_lambda)]
            else:
                components = info["components"]
            variance_keys.append((key_names, key_values))
            variance_blocks.append(
                block(torch.cat([b[index]["variances"][part] for _, b in finished]), [])
            )
            if estimated:
                variance_error_blocks.append(
                    block(
                        torch.cat(
                            [b[index]["variance_errors"][part] for _, b in finished]
                        ),
                        [],
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
                    block(
                        torch.cat(
                            [
                                b[index]["projections"][part][entry][2]
                                for _, b in finished
                            ]
                        ),
                        components,
                    )
                )
                if estimated:
                    projection_error_blocks.append(
                        block(
                            torch.cat(
                                [
                                    b[index]["projection_errors"][part][entry][2]
                                    for _, b in finished
                                ]
                            ),
                            components,
                        )
                    )
                for row, (_, blocks) in enumerate(finished):
                    value = blocks[index]["projections"][part][entry][2].sum()
                    spectrum[row, o3_lambda, 0 if sigma == 1 else 1] += value

    result.variance[name] = TensorMap(_labels(variance_keys), variance_blocks)
    result.character_projection[name] = TensorMap(
        _labels(projection_keys), projection_blocks
    )
    if estimated:
        result.variance_error[name] = TensorMap(
            _labels(variance_keys), variance_error_blocks
        )
        result.character_projection_error[name] = TensorMap(
            _labels(projection_keys), projection_error_blocks
        )

    norms = torch.stack(
        [sum(block["direct_norm"] for block in blocks) for _, blocks in finished]
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

    def spectrum_map(values: torch.Tensor) -> TensorMap:
        return TensorMap(
            Labels.single(),
            [
                TensorBlock(
                    values=values,
                    samples=Labels(["system"], structures),
                    components=[],
                    properties=properties,
                )
            ],
        )

    if not estimated:
        normalized = spectrum / torch.where(
            norms > 0, norms, torch.ones_like(norms)
        ).view(-1, 1, 1)
        result.spectrum[name] = spectrum_map(normalized.reshape(len(finished), -1))
        return

    values, covariance, mean_covariance = _estimated_spectra(
        name, [blocks for _, blocks in finished], norms, integrator
    )
    result.spectrum[name] = spectrum_map(values)
    errors = torch.diagonal(covariance, dim1=1, dim2=2).clamp(min=0.0).sqrt()
    result.spectrum_error[name] = spectrum_map(errors)
    result.spectrum_covariance[name] = covariance
    result.mean_spectrum_covariance[name] = mean_covariance


def _estimated_spectra(
    name: str,
    structures: list[list[dict]],
    norms: torch.Tensor,
    integrator: _Integrator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalized spectra estimated on a Monte-Carlo grid, and their covariances.

    Per structure, ``B`` of every ``(lambda, sigma)`` is the U-statistic of the
    pair kernel ``K_ij = (2 lambda + 1) chi_lambda(R_i R_j^T) G^p_ij`` (``G^p`` the
    Gram matrix of the parity-``p`` pair values over all entries), and the norm
    ``n = <||u||^2>`` the mean of the pair mean squares ``m_i``, i.e. the
    U-statistic of ``(m_i + m_j) / 2``. The ratio ``b = B / n`` is linearized: its
    error is the U-statistic of ``L_ij = (K_ij - b (m_i + m_j) / 2) / n``, whose
    covariance gives the covariance of the spectrum, and the covariance of ``L``
    with the norm's own kernel removes the first-order bias of the ratio. All
    structures share the grid's pairs, so the error of the dataset mean is that
    of the mean of their ``L``.

    :param structures: per structure, the finished blocks of one output
    :param name: the output, for warnings
    :param norms: ``(n_structures,)`` grid means of ``||u||^2``
    :return: spectra ``(n_structures, n_irreps)``, their covariances
        ``(n_structures, n_irreps, n_irreps)`` and the covariance of their mean
        ``(n_irreps, n_irreps)``; irreps ordered as the ``spectrum`` properties
    """
    half = integrator.n_pairs
    channels = [(o3_lambda, sigma) for o3_lambda, sigma, _ in integrator.row_slices]
    n_irreps = len(channels)
    values = torch.zeros(len(structures), n_irreps, dtype=torch.float64)
    covariance = torch.zeros(len(structures), n_irreps, n_irreps, dtype=torch.float64)
    mean_kernel = torch.zeros(n_irreps, half, half, dtype=torch.float64)
    norm_errors = []
    for row, blocks in enumerate(structures):
        grams = {
            parity: sum(block["grams"][parity] for block in blocks)
            for parity in (1, -1)
        }
        pair_norms = sum(block["pair_norms"] for block in blocks)
        norm = float(norms[row]) if float(norms[row]) > 0 else 1.0
        kernels = torch.stack(
            [
                integrator.channel_weights[o3_lambda] * grams[sigma * (-1) ** o3_lambda]
                for o3_lambda, sigma in channels
            ]
        )
        norm_kernel = (pair_norms.unsqueeze(0) + pair_norms.unsqueeze(1)) / 2
        raw, _ = pair_u_covariance(kernels)
        ratio = raw / norm
        linear = (kernels - ratio.view(-1, 1, 1) * norm_kernel) / norm
        _, joint = pair_u_covariance(
            torch.cat([linear, (norm_kernel / norm).unsqueeze(0)])
        )
        # E[B / n] = b - Cov(B - b n, n) / n^2 to first order
        values[row] = ratio + joint[:n_irreps, n_irreps]
        covariance[row] = joint[:n_irreps, :n_irreps]
        norm_errors.append(float(joint[n_irreps, n_irreps].clamp(min=0.0).sqrt()))
        mean_kernel += linear
    if max(norm_errors) > _NORM_TOLERANCE:
        warnings.warn(
            f"the mean square of '{name}' varies strongly with orientation: the grid "
            f"estimates it with a relative standard error of {max(norm_errors):.0%}, "
            "so its normalized spectrum and their standard errors hold only to "
            "first order; use more rotations or an exact grid (O3Grid(degree))",
            stacklevel=4,
        )
    mean_kernel /= len(structures)
    _, mean_covariance = pair_u_covariance(mean_kernel)
    return values, covariance, mean_covariance


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
