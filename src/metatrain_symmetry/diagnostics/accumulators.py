"""Per-structure accumulation of the moments of rotated copies, block by block."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from metatensor.torch import Labels

from ..estimators import (
    factored_u_statistic,
    paired_mean_square_deviation,
)
from ..grid import O3Grid
from ..irreps import (
    BlockLayout,
    block_layout,
    decompose,
    irrep_keys,
    undo_rotation,
)


_EPSILON = torch.finfo(torch.float64).eps
_TINY = torch.finfo(torch.float64).tiny


class Integrator:
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


class BlockAccumulator:
    """Running moments of one output block for one structure."""

    def __init__(self, name, keys: Labels, index: int, block, integrator: Integrator):
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
        # the moments are accumulated on CPU (see ``add``): so is their metadata
        self.sample_names = block.sample_names
        self.sample_values = block.sample_values.cpu()
        self.components = [labels.to("cpu") for labels in block.components]
        self.properties = block.properties.to("cpu")
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
            squared = sum_components(centered_part.square())
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
            mean_norm = sum_components(mean_parts[index].square())[0]
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
        return self._finished(average, variances, projections)

    def _finished(self, average, variances, projections, **estimates) -> dict:
        """The finished values of this block with its metadata."""
        return {
            "sample_names": self.sample_names,
            "sample_values": self.sample_values,
            # metadata as (names, values): plain data, which saved shards need
            "components": [(c.names, c.values) for c in self.components],
            "properties": (self.properties.names, self.properties.values),
            "layout": self.layout,
            "irrep_keys": self.irrep_keys,
            "average": average,
            "variances": variances,
            "projections": projections,
            "direct_norm": self.direct_norm,
            **estimates,
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
        In the non-trivial channels of parity ``p = +1``, which a constant
        response ``h_i = c`` pairs into, ``h_i`` is replaced by ``h_i - h_0`` and
        the U-statistic runs over the pairs ``i, j >= 1``: the expectation is the
        same (the character of a non-trivial irrep averages to zero over ``R_j``
        whatever ``R_i`` and ``h_0``), and the noise no longer scales with ``c``.
        """
        half = self.integrator.n_pairs
        values, centered = self._stored_copies()
        average = self.reference + self.first_moment
        centered_parts = decompose(centered, self.layout)
        direct_parts = decompose(values, self.layout)
        variances, variance_errors = [], []
        projections, projection_errors = [], []
        grams = _PairGrams.zeros(half)
        for centered_part, direct_part in zip(
            centered_parts, direct_parts, strict=True
        ):
            variance, variance_error = _estimated_variance(centered_part, half, grams)
            variances.append(variance)
            variance_errors.append(variance_error)
            per_irrep, per_irrep_errors = _estimated_projections(
                direct_part, self.integrator, grams
            )
            projections.append(per_irrep)
            projection_errors.append(per_irrep_errors)

        flat = values.reshape(values.shape[0], -1).square().sum(dim=1)
        return self._finished(
            average,
            variances,
            projections,
            variance_errors=variance_errors,
            projection_errors=projection_errors,
            grams=grams.parities,
            centred_gram=grams.centred,
            # mean square of the direct response in each pair
            pair_norms=(flat[:half] + flat[half:]) / 2,
            deviation_gram=grams.deviation,
            deviation_squares=grams.deviation_squares,
            n_scalars=grams.n_scalars,
        )

    def _stored_copies(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The direct and centred back-transformed values of every copy, in the
        order of the grid, ``(n_grid, n_samples, *components, n_properties)``
        each; the stored chunks are released."""
        indices = torch.cat([item[0] for item in self.stored])
        order = torch.argsort(indices)
        values = torch.cat([item[1] for item in self.stored])[order]
        centered = torch.cat([item[2] for item in self.stored])[order]
        self.stored = []
        return values, centered


@dataclass
class _PairGrams:
    """Gram matrices over the ``M`` pairs ``(R_i, -R_i)`` of a Monte-Carlo grid,
    summed over the irreps of a block."""

    parities: dict[int, torch.Tensor]
    """``(M, M)`` of the pair values of parity ``+1`` and ``-1``"""
    centred: torch.Tensor
    """``(M - 1, M - 1)`` of the parity +1 pair values minus the first pair's, over
    the other pairs: formed from the differences, since the difference of Gram
    entries would lose the digits of a small varying part to a constant"""
    deviation: torch.Tensor
    """``(M, M)`` of the pair means of the centred back-transformed values"""
    deviation_squares: torch.Tensor
    """``(M,)`` pair mean squares of the centred back-transformed values"""
    n_scalars: int
    """number of scalar entries summed in ``deviation`` and ``deviation_squares``"""

    @classmethod
    def zeros(cls, half: int) -> _PairGrams:
        return cls(
            parities={
                1: torch.zeros(half, half, dtype=torch.float64),
                -1: torch.zeros(half, half, dtype=torch.float64),
            },
            centred=torch.zeros(half - 1, half - 1, dtype=torch.float64),
            # the kernel of the equivariance error summed over every scalar entry,
            # (q_i + q_j) / 2 - P_i . P_j, from the Gram matrix of the pair means
            # and the pair mean squares (see paired_mean_square_deviation)
            deviation=torch.zeros(half, half, dtype=torch.float64),
            deviation_squares=torch.zeros(half, dtype=torch.float64),
            n_scalars=0,
        )


def _estimated_variance(
    centered_part: torch.Tensor, half: int, grams: _PairGrams
) -> tuple[torch.Tensor, torch.Tensor]:
    """The equivariance error of one irrep of a block on a Monte-Carlo grid, and
    its standard error, entries (samples, properties) with components summed;
    adds the irrep's pair values to the deviation Gram matrices of ``grams``.

    :param centered_part: ``(n_grid, n_samples, *components, n_properties)``
        centred back-transformed values, the ``half`` rotations then their
        inversions
    :return: ``(n_samples, n_properties)`` estimate and standard error
    """
    n_copies, n_samples = centered_part.shape[:2]
    n_properties = centered_part.shape[-1]
    grouped = centered_part.reshape(n_copies, n_samples, -1, n_properties)
    n_components = grouped.shape[2]
    grouped = grouped.transpose(1, 2).reshape(n_copies, n_components, -1)
    estimate, variance = paired_mean_square_deviation(grouped[:half], grouped[half:])
    flat_part = grouped.reshape(n_copies, -1)
    pair_means = (flat_part[:half] + flat_part[half:]) / 2
    grams.deviation += pair_means @ pair_means.T
    grams.deviation_squares += (
        flat_part[:half].square() + flat_part[half:].square()
    ).sum(dim=1) / 2
    grams.n_scalars += flat_part.shape[1]
    # the estimate is a sum of squares (see paired_mean_square_deviation):
    # negative values are round-off
    return (
        estimate.clamp(min=0.0).reshape(n_samples, n_properties) / n_components,
        variance.clamp(min=0.0).sqrt().reshape(n_samples, n_properties) / n_components,
    )


def _estimated_projections(
    direct_part: torch.Tensor, integrator: Integrator, grams: _PairGrams
) -> tuple[list, list]:
    """The character projections of one irrep of a block on a Monte-Carlo grid and
    their standard errors; adds the irrep's pair values to the parity Gram matrices
    of ``grams``.

    :param direct_part: ``(n_grid, n_samples, *components, n_properties)`` direct
        values, the rotations then their inversions
    :return: ``(lambda, sigma, values)`` of every channel of
        ``integrator.row_slices``, values shaped as one copy of ``direct_part``,
        for the estimates and for their standard errors
    """
    half = integrator.n_pairs
    n_copies = direct_part.shape[0]
    component_shape = direct_part.shape[1:]
    flat = direct_part.reshape(n_copies, -1)
    paired = {
        1: (flat[:half] + flat[half:]) / 2,
        -1: (flat[:half] - flat[half:]) / 2,
    }
    for parity, pair_values in paired.items():
        grams.parities[parity] += pair_values @ pair_values.T
    estimates = {
        parity: factored_u_statistic(integrator.channel_weights, pair_values)
        for parity, pair_values in paired.items()
    }
    # a constant part of the response (an absolute energy) has no weight in the
    # non-trivial channels of parity +1 but adds to their estimates a noise of its
    # own size: there they are estimated on the differences to the first pair,
    # over the other pairs
    differences = paired[1][1:] - paired[1][:1]
    grams.centred += differences @ differences.T
    centred = factored_u_statistic(integrator.channel_weights[:, 1:, 1:], differences)
    per_irrep, per_irrep_errors = [], []
    for o3_lambda, sigma, _ in integrator.row_slices:
        parity = sigma * (-1) ** o3_lambda
        estimate, variance = (
            centred if is_centred(o3_lambda, sigma) else estimates[parity]
        )
        estimate, variance = estimate[o3_lambda], variance[o3_lambda]
        per_irrep.append((o3_lambda, sigma, estimate.reshape(component_shape)))
        per_irrep_errors.append(
            (
                o3_lambda,
                sigma,
                variance.clamp(min=0.0).sqrt().reshape(component_shape),
            )
        )
    return per_irrep, per_irrep_errors


def is_centred(o3_lambda: int, sigma: int) -> bool:
    """Whether the random-grid estimate of the character channel ``(lambda,
    sigma)`` is made on differences to the first pair of rotations: the
    non-trivial channels that a constant response pairs into (parity ``sigma
    (-1)^lambda = +1``, ``lambda > 0``)."""
    return o3_lambda > 0 and sigma * (-1) ** o3_lambda == 1


def sum_components(values: torch.Tensor) -> torch.Tensor:
    """``(c, s, *components, p) -> (c, s, p)``"""
    if values.ndim == 3:
        return values
    return values.flatten(2, -2).sum(dim=2)


def finish_structure(structure, accumulators, finished, integrator) -> None:
    if structure is None:
        return
    for name, per_structure in accumulators.items():
        blocks = per_structure.pop(structure)
        finished[name].append(
            (structure, [block.finish(len(integrator.grid)) for block in blocks])
        )
