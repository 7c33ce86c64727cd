"""Assembly of the accumulated moments into the TensorMaps of an analysis."""

from __future__ import annotations

import warnings

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


# relative standard error of a random grid's estimate of <||u||^2> above which the
# linearized normalized spectrum (a ratio of estimates) is not trusted
_NORM_TOLERANCE = 0.1


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


def assemble(
    name,
    keys: Labels,
    finished,
    result: AnalysisResult,
    max_lambda: int,
    integrator: Integrator,
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
                block(_joined(finished, index, "variances", part), [])
            )
            if estimated:
                variance_error_blocks.append(
                    block(_joined(finished, index, "variance_errors", part), [])
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
                values = _joined(finished, index, "projections", part, entry, 2)
                projection_blocks.append(block(values, components))
                if estimated:
                    errors = _joined(
                        finished, index, "projection_errors", part, entry, 2
                    )
                    projection_error_blocks.append(block(errors, components))
                for row, (_, blocks) in enumerate(finished):
                    value = blocks[index]["projections"][part][entry][2].sum()
                    spectrum[row, o3_lambda, sigma_index(sigma)] += value

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
        torch.tensor(spectrum_irreps(max_lambda), dtype=torch.int32),
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

    rmse_errors, mean_rmse_error = _equivariance_rmse_errors(
        [blocks for _, blocks in finished]
    )
    result.equivariance_rmse_error[name] = rmse_errors
    result.mean_equivariance_rmse_error[name] = mean_rmse_error
    values, covariance, mean_covariance = _estimated_spectra(
        name, [blocks for _, blocks in finished], integrator
    )
    result.spectrum[name] = spectrum_map(values)
    errors = torch.diagonal(covariance, dim1=1, dim2=2).clamp(min=0.0).sqrt()
    result.spectrum_error[name] = spectrum_map(errors)
    result.spectrum_covariance[name] = covariance
    result.mean_spectrum_covariance[name] = mean_covariance


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

    :param structures: per structure, the finished blocks of one output
    :param name: the output, for warnings
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
    norm_errors = []
    for row, blocks in enumerate(structures):
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
            stacklevel=5,
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
