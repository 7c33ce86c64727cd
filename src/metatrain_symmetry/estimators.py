"""Unbiased Monte-Carlo estimates over random O(3) grids, with their variances.

A random grid (:py:meth:`O3Grid.random`) holds ``M`` Haar-distributed proper
rotations ``R_i``, each paired with its improper partner ``-R_i``. The ``M``
pairs are the independent samples: the two halves of a pair are not independent
of each other. Every quantity of the analysis is an integral that is either
linear in the response (averages, mean squares) or quadratic in its group mean
(the squared norm of a character coefficient, the squared norm of the
symmetrized prediction). A quadratic one is estimated without bias by a
U-statistic over pairs of distinct pairs,

    U = 1 / (M (M - 1)) sum_{i != j} K_ij,

with a symmetric kernel ``K_ij`` such that ``E[K_ij] = theta`` for ``i != j``.
Its variance, and the covariance of two such estimates built on the same pairs,
are estimated without bias as ``U_a U_b - V_ab``, where ``V_ab`` is the
U-statistic of order four of ``theta_a theta_b`` (the sum of ``K^a_ij K^b_kl``
over distinct ``i, j, k, l``), written here through sums over rows of the
kernels so that it costs ``O(M^2)``.

The functions take the kernel matrices; the diagonal (``i = j``) is ignored.
"""

from __future__ import annotations

import torch


__all__ = [
    "CentredMoments",
    "factored_u_statistic",
    "pair_u_covariance",
    "pair_u_statistic",
    "paired_mean_square_deviation",
]


# entries of the (M, M, batch) kernels materialized at once
_KERNEL_ELEMENTS = 1 << 22


def pair_u_statistic(kernel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U-statistic of a symmetric pair kernel and an unbiased estimate of its
    variance.

    :param kernel: ``(M, M, *batch)`` float64, symmetric in its first two
        dimensions; the diagonal is ignored
    :return: ``(estimate, variance)``, both ``(*batch)``. The variance needs
        ``M >= 4`` (NaN otherwise) and, being unbiased, can be slightly negative
        when the true variance is close to zero.
    """
    n = kernel.shape[0]
    off = _off_diagonal(kernel)
    total = off.sum(dim=(0, 1))
    rows = off.sum(dim=1)
    squares = off.square().sum(dim=(0, 1))
    estimate = total / _falling(n, 2)
    fourth = (
        total.square() - 4.0 * rows.square().sum(dim=0) + 2.0 * squares
    ) / _falling(n, 4)
    return estimate, _floored(estimate.square() - fourth, rows, dim=0)


def pair_u_covariance(kernels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U-statistics of several symmetric pair kernels on the same samples and an
    unbiased estimate of their covariance matrix.

    :param kernels: ``(K, M, M)`` float64, each symmetric; diagonals are ignored
    :return: ``(estimates, covariance)``, ``(K,)`` and ``(K, K)``; the covariance
        needs ``M >= 4`` (NaN otherwise)
    """
    n = kernels.shape[1]
    off = _off_diagonal(kernels.movedim(0, -1)).movedim(-1, 0)
    totals = off.sum(dim=(1, 2))
    rows = off.sum(dim=2)  # (K, M)
    flat = off.reshape(off.shape[0], -1)
    cross = flat @ flat.T
    estimates = totals / _falling(n, 2)
    fourth = (
        torch.outer(totals, totals) - 4.0 * rows @ rows.T + 2.0 * cross
    ) / _falling(n, 4)
    covariance = torch.outer(estimates, estimates) - fourth
    floored = _floored(torch.diagonal(covariance), rows, dim=1)
    torch.diagonal(covariance).copy_(floored)
    return estimates, covariance


def factored_u_statistic(
    weights: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:py:func:`pair_u_statistic` of the kernels ``K_ij = A_ij x_i x_j``, for
    several weight matrices ``A`` and every column of ``x``, without
    materializing the kernels.

    :param weights: ``A``, ``(K, M, M)``, each symmetric
    :param values: ``x``, ``(M, E)``
    :return: ``(estimate, variance)``, both ``(K, E)``
    """
    n = weights.shape[1]
    diagonal = torch.diagonal(weights, dim1=1, dim2=2).unsqueeze(2)  # (K, M, 1)
    squared = values.square()
    # sums over j != i of A_ij x_i x_j, and of its square
    rows = values * (weights @ values) - diagonal * squared
    total = rows.sum(dim=1)
    squares = (squared * (weights.square() @ squared)).sum(dim=1) - (
        diagonal.square() * squared.square()
    ).sum(dim=1)
    estimate = total / _falling(n, 2)
    fourth = (
        total.square() - 4.0 * rows.square().sum(dim=1) + 2.0 * squares
    ) / _falling(n, 4)
    return estimate, _floored(estimate.square() - fourth, rows, dim=1)


def paired_mean_square_deviation(
    first: torch.Tensor, second: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased estimate of ``E ||z - E z||^2`` from paired samples, and its
    variance.

    With ``P_i = (z(R_i) + z(-R_i)) / 2`` and ``q_i = (||z(R_i)||^2 +
    ||z(-R_i)||^2) / 2``, the kernel is ``K_ij = (q_i + q_j) / 2 - P_i . P_j``: its
    mean over distinct pairs is ``E ||z||^2 - ||E z||^2``. The estimate is never
    negative: it equals the within-pair spread plus ``M / (M - 1)`` times the
    sample variance of the ``P_i``. It does not depend on the origin of ``z``, so
    callers may centre the samples to keep digits.

    :param first: ``z(R_i)``, ``(M, C, E)``: ``C`` components summed in the norm,
        ``E`` independent entries
    :param second: ``z(-R_i)``, same shape
    :return: ``(estimate, variance)``, both ``(E,)``; the variance needs ``M >= 4``
    """
    n, _, n_entries = first.shape
    pair_mean = (first + second) / 2
    squares = (first.square() + second.square()).sum(dim=1) / 2  # (M, E)
    step = max(1, _KERNEL_ELEMENTS // max(1, n * n))
    estimates, variances = [], []
    for start in range(0, n_entries, step):
        stop = min(start + step, n_entries)
        mean = pair_mean[:, :, start:stop]
        square = squares[:, start:stop]
        kernel = (square.unsqueeze(1) + square.unsqueeze(0)) / 2 - torch.einsum(
            "ice,jce->ije", mean, mean
        )
        estimate, variance = pair_u_statistic(kernel)
        estimates.append(estimate)
        variances.append(variance)
    return torch.cat(estimates), torch.cat(variances)


def _floored(variance: torch.Tensor, rows: torch.Tensor, dim: int) -> torch.Tensor:
    """The unbiased variance of a U-statistic, floored at half its delete-one
    jackknife variance.

    The unbiased estimate is a difference of two sums: with few samples it
    comes out near zero or negative while the estimate itself scatters, which
    would show a standard error of 0. The jackknife variance is never negative;
    for the kernels of the analysis it is between one and about two times the
    true variance (twice where the true value is zero, as in the channels an
    output does not reach), so half of it is a floor that does not inflate an
    honest estimate.

    :param rows: the sums ``sum_{j != i} K_ij`` over the ``M`` samples, along
        ``dim``
    """
    n = rows.shape[dim]
    deviations = rows - rows.mean(dim=dim, keepdim=True)
    # leaving sample i out changes the U-statistic by -2 (rows_i - mean) / ...
    jackknife = (
        4.0 * (n - 1) / n * deviations.square().sum(dim=dim) / _falling(n - 1, 2) ** 2
    )
    return torch.maximum(variance, jackknife / 2)


def _off_diagonal(kernel: torch.Tensor) -> torch.Tensor:
    n = kernel.shape[0]
    mask = ~torch.eye(n, dtype=torch.bool, device=kernel.device)
    shape = (n, n) + (1,) * (kernel.ndim - 2)
    return kernel * mask.reshape(shape)


def _falling(n: int, k: int) -> float:
    """``n (n - 1) ... (n - k + 1)``, NaN when zero (too few samples)."""
    value = 1
    for i in range(k):
        value *= n - i
    return float(value) if value > 0 else float("nan")


class CentredMoments:
    """Weighted first and second moments of a stream of values ``(c, m, k)``
    (``c`` copies at a time), centred on the first copy seen, so that
    ``E[x^2] - E[x]^2`` keeps its digits when the mean is large.

    :param outer: second moments as ``(k, k)`` outer products summed over ``m``
        (else elementwise, ``(m, k)``)
    """

    def __init__(self, outer: bool = False):
        self.outer = outer
        self.reference: torch.Tensor | None = None
        self.first: torch.Tensor | None = None
        self.second: torch.Tensor | None = None
        self.weight = 0.0

    def add(self, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Accumulate ``values`` ``(c, m, k)`` with ``weights`` ``(c,)``; returns
        the centred values."""
        if self.reference is None:
            self.reference = values[0].clone()
            self.first = torch.zeros_like(self.reference)
            size = values.shape[-1]
            self.second = (
                values.new_zeros(size, size)
                if self.outer
                else torch.zeros_like(self.reference)
            )
        centered = values - self.reference
        self.first += torch.einsum("c,cmk->mk", weights, centered)
        if self.outer:
            self.second += torch.einsum("c,cmp,cmq->pq", weights, centered, centered)
        else:
            self.second += torch.einsum("c,cmk->mk", weights, centered.square())
        self.weight += float(weights.sum())
        return centered

    def covariance(self) -> torch.Tensor:
        """``E[x x^T] - E[x] E[x]^T`` summed over ``m`` (outer), or the
        elementwise variance ``(m, k)``."""
        if self.outer:
            return self.second - self.first.T @ self.first
        return self.second - self.first.square()
