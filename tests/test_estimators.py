import itertools

import torch

from metatrain_symmetry.estimators import (
    factored_u_statistic,
    pair_u_covariance,
    pair_u_statistic,
    paired_mean_square_deviation,
)


def symmetric(generator, *shape):
    kernel = torch.randn(*shape, generator=generator, dtype=torch.float64)
    return kernel + kernel.transpose(-1, -2)


def brute_force(first, second):
    """U-statistic of ``first`` and the unbiased estimate of its covariance with
    that of ``second``, summing over every ordered pair and quadruple of
    distinct samples."""
    n = first.shape[0]
    pairs = list(itertools.permutations(range(n), 2))
    estimate = sum(first[i, j] for i, j in pairs) / len(pairs)
    other = sum(second[i, j] for i, j in pairs) / len(pairs)
    quadruples = list(itertools.permutations(range(n), 4))
    fourth = sum(first[i, j] * second[k, m] for i, j, k, m in quadruples) / len(
        quadruples
    )
    return estimate, estimate * other - fourth


def jackknife_variance(kernel):
    """Delete-one jackknife variance of the U-statistic of ``kernel``, from the
    U-statistics of every subset that leaves one sample out."""
    n = kernel.shape[0]
    left_out = []
    for k in range(n):
        kept = [i for i in range(n) if i != k]
        left_out.append(brute_force(kernel[kept][:, kept], kernel[kept][:, kept])[0])
    left_out = torch.stack(left_out)
    return (n - 1) / n * (left_out - left_out.mean()).square().sum()


def floored(kernel):
    """The variance the estimators report: the unbiased one, floored at half the
    jackknife variance."""
    _, variance = brute_force(kernel, kernel)
    return torch.maximum(variance, jackknife_variance(kernel) / 2)


def test_u_statistics_match_sums_over_distinct_samples():
    generator = torch.Generator().manual_seed(0)
    kernels = symmetric(generator, 2, 6, 6)
    estimate, variance = pair_u_statistic(kernels[0].unsqueeze(-1))
    expected, unbiased = brute_force(kernels[0], kernels[0])
    # this sample's unbiased variance estimate is negative: the floor applies
    assert unbiased < 0 < variance[0]
    expected_variance = floored(kernels[0])
    torch.testing.assert_close(estimate[0], expected)
    torch.testing.assert_close(variance[0], expected_variance)

    estimates, covariance = pair_u_covariance(kernels)
    torch.testing.assert_close(estimates[0], expected)
    torch.testing.assert_close(covariance[0, 0], expected_variance)
    torch.testing.assert_close(covariance[1, 1], floored(kernels[1]))
    _, expected_covariance = brute_force(kernels[0], kernels[1])
    torch.testing.assert_close(covariance[0, 1], expected_covariance)
    torch.testing.assert_close(covariance[1, 0], expected_covariance)


def test_factored_and_paired_kernels():
    generator = torch.Generator().manual_seed(1)
    weights = symmetric(generator, 3, 7, 7)
    values = torch.randn(7, 4, generator=generator, dtype=torch.float64)
    estimate, variance = factored_u_statistic(weights, values)
    kernels = weights.unsqueeze(-1) * values.unsqueeze(1) * values.unsqueeze(0)
    for index in range(3):
        expected, expected_variance = pair_u_statistic(kernels[index])
        torch.testing.assert_close(estimate[index], expected)
        torch.testing.assert_close(variance[index], expected_variance)

    first = torch.randn(7, 3, 5, generator=generator, dtype=torch.float64)
    second = torch.randn(7, 3, 5, generator=generator, dtype=torch.float64)
    estimate, variance = paired_mean_square_deviation(first, second)
    mean = (first + second) / 2
    squares = (first.square() + second.square()).sum(dim=1) / 2
    for entry in range(5):
        kernel = (squares[:, entry, None] + squares[None, :, entry]) / 2 - (
            mean[:, :, entry] @ mean[:, :, entry].T
        )
        expected, _ = brute_force(kernel, kernel)
        torch.testing.assert_close(estimate[entry], expected)
        torch.testing.assert_close(variance[entry], floored(kernel))
    # the estimate never depends on the origin of the samples
    shifted, _ = paired_mean_square_deviation(first + 3.0, second + 3.0)
    torch.testing.assert_close(shifted, estimate)
    assert bool((estimate >= 0).all())


def test_too_few_samples_give_nan_variances():
    kernel = torch.ones(3, 3, 1, dtype=torch.float64)
    estimate, variance = pair_u_statistic(kernel)
    assert float(estimate) == 1.0
    assert bool(variance.isnan().all())
