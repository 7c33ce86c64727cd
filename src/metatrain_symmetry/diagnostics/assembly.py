"""Assembly of the accumulated moments into the TensorMaps of an analysis."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

from ..estimators import pair_u_covariance, pair_u_statistic
from ..irreps import (
    mu_labels,
    sigma_index,
    spectrum_irreps,
)
from .accumulators import Integrator, is_centred
from .result import AnalysisResult


ZERO_OUTPUT_TOLERANCE = 1e-6
"""root mean square of an output on a structure, relative to the largest over
the structures analysed together, at or below which the output is zero there: it
then has no spectrum (NaN) and no leakage"""

SPECTRUM_NORM_TOLERANCE = 0.2
"""relative standard error of a random grid's estimate of an output's mean square
above which its normalized spectrum (a ratio of two estimates) is not given
(NaN): the standard errors of the ratio then fall short of its spread"""


def _samples(structure: int, names: list[str], values: torch.Tensor) -> torch.Tensor:
    system = torch.full((values.shape[0], 1), structure, dtype=torch.int32)
    return torch.cat([system, values.to(torch.int32)], dim=1)


def _joined(finished, index: int, field: str, *path: int) -> torch.Tensor:
    """One finished quantity of block ``index``, concatenated over structures
    (``path`` indexes into nested per-irrep lists)."""
    values = []
    for _, blocks in finished:
        value = blocks[index][field]
        for position in path:
            value = value[position]
        values.append(value)
    return torch.cat(values)


@dataclass
class _KeyedBlocks:
    """The blocks of one TensorMap being assembled, with their keys as ``(names,
    values)``, and on random grids the blocks of their standard errors."""

    keys: list[tuple[list[str], list[int]]] = field(default_factory=list)
    blocks: list[TensorBlock] = field(default_factory=list)
    errors: list[TensorBlock] = field(default_factory=list)


def assemble(
    name,
    keys: Labels,
    finished,
    result: AnalysisResult,
    max_lambda: int,
    integrator: Integrator,
):
    """Join per-structure results into TensorMaps."""
    estimated = integrator.estimated
    result.average[name] = _average_map(keys, finished)

    variances, projections = _KeyedBlocks(), _KeyedBlocks()
    spectrum = torch.zeros(len(finished), max_lambda + 1, 2, dtype=torch.float64)
    for index in range(len(keys)):
        _add_irrep_blocks(finished, index, estimated, variances, projections, spectrum)
    result.variance[name] = TensorMap(_labels(variances.keys), variances.blocks)
    result.character_projection[name] = TensorMap(
        _labels(projections.keys), projections.blocks
    )
    if estimated:
        result.variance_error[name] = TensorMap(
            _labels(variances.keys), variances.errors
        )
        result.character_projection_error[name] = TensorMap(
            _labels(projections.keys), projections.errors
        )

    properties = Labels(
        ["chi_lambda", "chi_sigma"],
        torch.tensor(spectrum_irreps(max_lambda), dtype=torch.int32),
    )
    structures = torch.tensor([[s] for s, _ in finished], dtype=torch.int32)
    norms = torch.stack(
        [sum(block["direct_norm"] for block in blocks) for _, blocks in finished]
    )
    sizes = [
        sum(block["average"].numel() for block in blocks) for _, blocks in finished
    ]
    zero = zero_structures(norms, sizes)
    result.zero_structures[name] = zero

    if not estimated:
        normalized = spectrum.reshape(len(finished), -1) / torch.where(
            zero, 1.0, norms
        ).view(-1, 1)
        normalized[zero] = torch.nan
        result.spectrum[name] = _spectrum_map(normalized, structures, properties)
        return

    rmse_errors, mean_rmse_error = _equivariance_rmse_errors(
        [blocks for _, blocks in finished]
    )
    result.equivariance_rmse_error[name] = rmse_errors
    result.mean_equivariance_rmse_error[name] = mean_rmse_error
    values, covariance, mean_covariance = _estimated_spectra(
        name, [blocks for _, blocks in finished], integrator, zero
    )
    result.spectrum[name] = _spectrum_map(values, structures, properties)
    errors = torch.diagonal(covariance, dim1=1, dim2=2).clamp(min=0.0).sqrt()
    result.spectrum_error[name] = _spectrum_map(errors, structures, properties)
    result.spectrum_covariance[name] = covariance
    result.mean_spectrum_covariance[name] = mean_covariance


def zero_structures(norms: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Which structures have an output that is zero to round-off: a root mean
    square at most :py:data:`ZERO_OUTPUT_TOLERANCE` of the largest over the
    structures (and every structure when the output vanishes everywhere).

    :param norms: ``(n_structures,)`` grid means of the squared norm of the output
    :param sizes: number of scalar entries of the output on each structure
    :return: ``(n_structures,)`` booleans
    """
    mean_squares = norms / torch.tensor(sizes, dtype=norms.dtype).clamp(min=1)
    largest = float(mean_squares.max())
    return mean_squares <= ZERO_OUTPUT_TOLERANCE**2 * largest


def _block_samples(finished: list[tuple[int, list[dict]]], index: int) -> Labels:
    """The samples of block ``index`` over every structure, with a leading
    ``system`` column."""
    return Labels(
        ["system"] + finished[0][1][index]["sample_names"],
        torch.cat([_samples(s, [], b[index]["sample_values"]) for s, b in finished]),
    )


def _average_map(keys: Labels, finished: list[tuple[int, list[dict]]]) -> TensorMap:
    """The average over the grid of every block, with the output's own metadata."""
    first = finished[0][1]
    average_blocks = []
    for index in range(len(keys)):
        average_blocks.append(
            TensorBlock(
                values=torch.cat([b[index]["average"] for _, b in finished]),
                samples=_block_samples(finished, index),
                components=[Labels(*c) for c in first[index]["components"]],
                properties=Labels(*first[index]["properties"]),
            )
        )
    return TensorMap(keys, average_blocks)


def _add_irrep_blocks(
    finished: list[tuple[int, list[dict]]],
    index: int,
    estimated: bool,
    variances: _KeyedBlocks,
    projections: _KeyedBlocks,
    spectrum: torch.Tensor,
) -> None:
    """Add the variance and character-projection blocks of every irrep of block
    ``index`` to ``variances`` and ``projections``, and its projections summed over
    entries to ``spectrum``.

    :param finished: per structure, its index and its finished blocks
    :param spectrum: ``(n_structures, max_lambda + 1, 2)``, columns ordered by
        :py:func:`~metatrain_symmetry.irreps.sigma_index`
    """
    info = finished[0][1][index]
    samples = _block_samples(finished, index)

    def block(values: torch.Tensor, components: list[Labels]) -> TensorBlock:
        return TensorBlock(
            values=values,
            samples=samples,
            components=components,
            properties=Labels(*info["properties"]),
        )

    for part, irrep in enumerate(info["layout"].irreps):
        key_names, key_values = info["irrep_keys"][part]
        if irrep.o3_lambda is not None:
            components = [mu_labels(irrep.o3_lambda)]
        else:
            components = [Labels(*c) for c in info["components"]]
        variances.keys.append((key_names, key_values))
        variances.blocks.append(block(_joined(finished, index, "variances", part), []))
        if estimated:
            variances.errors.append(
                block(_joined(finished, index, "variance_errors", part), [])
            )
        projection_names = [n for n in key_names if n != "_"]
        projection_prefix = [
            v for n, v in zip(key_names, key_values, strict=True) if n != "_"
        ]
        for entry, (o3_lambda, sigma, _) in enumerate(info["projections"][part]):
            projections.keys.append(
                (
                    projection_names + ["chi_lambda", "chi_sigma"],
                    projection_prefix + [o3_lambda, sigma],
                )
            )
            values = _joined(finished, index, "projections", part, entry, 2)
            projections.blocks.append(block(values, components))
            if estimated:
                errors = _joined(finished, index, "projection_errors", part, entry, 2)
                projections.errors.append(block(errors, components))
            for row, (_, blocks) in enumerate(finished):
                value = blocks[index]["projections"][part][entry][2].sum()
                spectrum[row, o3_lambda, sigma_index(sigma)] += value


def _spectrum_map(
    values: torch.Tensor, structures: torch.Tensor, properties: Labels
) -> TensorMap:
    """A single-block TensorMap of per-structure spectra.

    :param values: ``(n_structures, n_irreps)``
    :param structures: ``(n_structures, 1)`` structure indices
    :param properties: the ``(chi_lambda, chi_sigma)`` of the ``n_irreps`` columns
    """
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


def _equivariance_rmse_errors(
    structures: list[list[dict]],
) -> tuple[torch.Tensor, float]:
    """Standard errors of the per-structure equivariance RMSE and of its mean
    over structures, on a random grid.

    Per structure, the sum ``S`` of the equivariance error over every scalar
    entry is the U-statistic of the kernel ``K_ij = (q_i + q_j) / 2 - P_i . P_j``
    summed over entries, and the RMSE is ``sqrt(S / n)`` for ``n`` scalar entries;
    its error is linearized, ``dRMSE = dS / (2 n RMSE)``. The structures share the
    grid's pairs: the error of the mean RMSE is that of the mean of their
    linearized kernels.

    :return: ``(n_structures,)`` standard errors and the mean's standard error
    """
    half = structures[0][0]["deviation_gram"].shape[0]
    errors = torch.zeros(len(structures), dtype=torch.float64)
    mean_kernel = torch.zeros(half, half, dtype=torch.float64)
    for row, blocks in enumerate(structures):
        gram = sum(block["deviation_gram"] for block in blocks)
        squares = sum(block["deviation_squares"] for block in blocks)
        n_scalars = sum(block["n_scalars"] for block in blocks)
        kernel = (squares.unsqueeze(0) + squares.unsqueeze(1)) / 2 - gram
        total, variance = pair_u_statistic(kernel)
        rmse = float(total.clamp(min=0.0) / max(n_scalars, 1)) ** 0.5
        if rmse == 0.0:
            # an exactly equivariant structure: nothing to linearize around
            continue
        scale = 2 * n_scalars * rmse
        errors[row] = variance.clamp(min=0.0).sqrt() / scale
        mean_kernel += kernel / scale
    mean_kernel /= len(structures)
    _, mean_variance = pair_u_statistic(mean_kernel)
    return errors, float(mean_variance.clamp(min=0.0).sqrt())


def _estimated_spectra(
    name: str,
    structures: list[list[dict]],
    integrator: Integrator,
    zero: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalized spectra estimated on a Monte-Carlo grid, and their covariances.

    Per structure, ``B`` of every ``(lambda, sigma)`` is the U-statistic of the
    pair kernel ``K_ij = (2 lambda + 1) chi_lambda(R_i R_j^T) G^p_ij``, with
    ``G^p`` the Gram matrix of the parity-``p`` pair values over all entries. In
    the non-trivial channels of parity +1, ``G`` is that of the differences to
    the first pair's values: a constant part of the response then adds nothing
    to their noise, and their mean is unchanged because the character of a
    non-trivial irrep averages to zero over the rotation of either pair. The
    norm ``n = <||u||^2>`` is the mean of the pair mean squares ``m_i``, i.e.
    the U-statistic of ``(m_i + m_j) / 2``. All run over the pairs after the
    first. The ratio ``b = B / n`` is linearized: its error is the U-statistic
    of ``L_ij = (K_ij - b (m_i + m_j) / 2) / n``, whose covariance gives the
    covariance of the spectrum, and the covariance of ``L`` with the norm's own
    kernel removes the first-order bias of the ratio. All structures share the
    grid's pairs, so the error of the dataset mean is that of the mean of their
    ``L``.

    The linearization holds when ``n`` is well estimated. Structures whose
    ``n`` has a relative standard error above :py:data:`SPECTRUM_NORM_TOLERANCE`
    get no spectrum (NaN), nor do those where the output is zero; the dataset
    mean runs over the others.

    :param name: the output, for warnings
    :param structures: per structure, the finished blocks of one output
    :param zero: ``(n_structures,)``, the structures where the output is zero
    :return: spectra ``(n_structures, n_irreps)``, their covariances
        ``(n_structures, n_irreps, n_irreps)`` and the covariance of their mean
        ``(n_irreps, n_irreps)``; irreps ordered as the ``spectrum`` properties
    """
    # every estimate uses the pairs after the first, on which the centred
    # channels are estimated (see BlockAccumulator._finish_estimated), so that
    # their covariances are those of U-statistics on the same samples
    samples = integrator.n_pairs - 1
    weights = integrator.channel_weights[:, 1:, 1:]
    channels = [(o3_lambda, sigma) for o3_lambda, sigma, _ in integrator.row_slices]
    n_irreps = len(channels)
    values = torch.zeros(len(structures), n_irreps, dtype=torch.float64)
    covariance = torch.zeros(len(structures), n_irreps, n_irreps, dtype=torch.float64)
    mean_kernel = torch.zeros(n_irreps, samples, samples, dtype=torch.float64)
    norm_errors = torch.zeros(len(structures), dtype=torch.float64)
    for row, blocks in enumerate(structures):
        ratio, linear, joint = _linearized_spectrum(blocks, weights, channels)
        # E[B / n] = b - Cov(B - b n, n) / n^2 to first order
        values[row] = ratio + joint[:n_irreps, n_irreps]
        covariance[row] = joint[:n_irreps, :n_irreps]
        norm_errors[row] = joint[n_irreps, n_irreps].clamp(min=0.0).sqrt()
        if not zero[row] and norm_errors[row] <= SPECTRUM_NORM_TOLERANCE:
            mean_kernel += linear
    unresolved = (norm_errors > SPECTRUM_NORM_TOLERANCE) & ~zero
    if bool(unresolved.any()):
        warnings.warn(
            _unresolved_message(name, unresolved, norm_errors, samples), stacklevel=5
        )
    kept = ~(unresolved | zero)
    values[~kept] = torch.nan
    covariance[~kept] = torch.nan
    mean_kernel /= max(1, int(kept.sum()))
    _, mean_covariance = pair_u_covariance(mean_kernel)
    if not bool(kept.any()):
        mean_covariance[:] = torch.nan
    return values, covariance, mean_covariance


def _unresolved_message(
    name: str, unresolved: torch.Tensor, norm_errors: torch.Tensor, samples: int
) -> str:
    """The warning for spectra left out because the norm is too noisy, with the
    number of random elements that would resolve them."""
    worst = float(norm_errors[unresolved].max())
    # the relative error of the norm falls as one over the root of the pairs
    pairs = math.ceil(samples * (worst / SPECTRUM_NORM_TOLERANCE) ** 2) + 1
    return (
        f"the mean square of '{name}' varies so strongly with orientation that the "
        f"grid estimates it with a relative standard error up to {worst:.0%} "
        f"(above {SPECTRUM_NORM_TOLERANCE:.0%}): its normalized spectrum is not "
        f"given on {int(unresolved.sum())} structure(s); use at least "
        f"{2 * pairs} random elements or an exact grid (O3Grid(degree))"
    )


def _linearized_spectrum(
    blocks: list[dict],
    weights: torch.Tensor,
    channels: list[tuple[int, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The linearized normalized spectrum of one structure on a random grid (see
    :py:func:`_estimated_spectra`).

    :param blocks: the finished blocks of the structure's output
    :param weights: ``(max_lambda + 1, M - 1, M - 1)`` channel weights of the
        pairs after the first
    :param channels: the ``(lambda, sigma)`` of the ``n_irreps`` channels
    :return: the ratio ``B / n`` of the U-statistics ``(n_irreps,)``, the kernels
        ``L_ij`` of its linearized error ``(n_irreps, M - 1, M - 1)``, and the joint
        covariance of these kernels and of the norm's own kernel (last),
        ``(n_irreps + 1, n_irreps + 1)``
    """
    grams = {
        parity: sum(block["grams"][parity] for block in blocks)[1:, 1:]
        for parity in (1, -1)
    }
    centred = sum(block["centred_gram"] for block in blocks)
    pair_norms = sum(block["pair_norms"] for block in blocks)[1:]
    norm = float(pair_norms.mean())
    norm = norm if norm > 0 else 1.0
    kernels = torch.stack(
        [
            weights[o3_lambda]
            * (
                centred
                if is_centred(o3_lambda, sigma)
                else grams[sigma * (-1) ** o3_lambda]
            )
            for o3_lambda, sigma in channels
        ]
    )
    norm_kernel = (pair_norms.unsqueeze(0) + pair_norms.unsqueeze(1)) / 2
    raw, _ = pair_u_covariance(kernels)
    ratio = raw / norm
    linear = (kernels - ratio.view(-1, 1, 1) * norm_kernel) / norm
    _, joint = pair_u_covariance(torch.cat([linear, (norm_kernel / norm).unsqueeze(0)]))
    return ratio, linear, joint


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
