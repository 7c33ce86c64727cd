"""The result of an analysis and its reductions (RMSE, spectrum sums)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from metatensor.torch import TensorMap

from ..grid import O3Grid
from ..irreps import (
    spectrum_column,
)


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
    properties ``["chi_lambda", "chi_sigma"]``; NaN on the structures where the
    output is zero (see ``zero_structures``) or, on random grids, where its mean
    square is too noisy to normalize by"""
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
    equivariance_rmse_error: dict[str, torch.Tensor] = field(default_factory=dict)
    """standard error of each structure's :py:meth:`equivariance_rmse`,
    ``(n_structures,)`` (random grids only)"""
    mean_equivariance_rmse_error: dict[str, float] = field(default_factory=dict)
    """standard error of the mean over structures of the equivariance RMSE; the
    structures share the grid's rotations, so their errors are correlated (random
    grids only)"""
    zero_structures: dict[str, torch.Tensor] = field(default_factory=dict)
    """``(n_structures,)`` booleans: the structures where the output is zero to
    round-off, which have no spectrum (see
    :py:data:`~metatrain_symmetry.diagnostics.ZERO_OUTPUT_TOLERANCE`)"""
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
        """Mean of the normalized spectrum of ``name`` over the structures that
        have one, and its standard error (NaN when none has).

        :return: ``(values, errors)``, both ``(n_irreps,)`` ordered as the
            ``spectrum`` properties; ``errors`` is ``None`` on exact grids
        """
        values = self.spectrum[name].block().values.nanmean(dim=0)
        if not self.estimated:
            return values, None
        covariance = self.mean_spectrum_covariance[name]
        return values, torch.diagonal(covariance).clamp(min=0.0).sqrt()

    def mean_spectrum_sum(
        self, name: str, irreps: Sequence[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean of :py:meth:`spectrum_sum` over the structures that have a
        spectrum, and its standard error (``None`` on exact grids), both
        scalars."""
        selection = self._irrep_selection(irreps)
        values = self.spectrum[name].block().values.nanmean(dim=0) @ selection
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
            selection[spectrum_column(o3_lambda, sigma)] = 1.0
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
