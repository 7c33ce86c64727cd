"""Validation of the solutions: errors against labels and equivariance errors of
every ``gamma`` at once, from the designs of one pass."""

from __future__ import annotations

import torch

from ..estimators import paired_mean_square_deviation
from ..grid import O3Grid
from .designs import back_rotate
from .result import RetrainResult
from .solve import PerStructure
from .targets import ForceTerm, Target


class Evaluation(PerStructure):
    """Errors of several parameter sets of one target, in model units: squared
    errors against the labels on the unrotated structures, and per-structure
    equivariance RMSEs over the grid (the same reduction and, on random grids,
    the same unbiased estimate over pairs of rotations as
    :py:func:`~metatrain_symmetry.analyze`)."""

    def __init__(
        self, target: Target | ForceTerm, labels, parameters: torch.Tensor, grid: O3Grid
    ):
        super().__init__()
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

    def add(self, structure, info, indices, rotations, design, offset) -> None:
        target = self.target
        self._enter(structure)
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
        back = back_rotate(prediction, target.rank, rotations[~identity])
        back = back.reshape(back.shape[0], -1, back.shape[-1])
        centered = self._moments.add(weights, back)
        if self.n_pairs >= 2:
            self._stored.append((indices[~identity] - 1, centered))

    def finish(self) -> None:
        moments = self._started()
        if moments is None:
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
            variance = estimate.clamp(min=0.0).reshape(moments.first.shape)
        else:
            variance = moments.covariance().clamp(min=0.0)
        self.equivariance.append(variance.mean(dim=0).sqrt())
        self._done()

    def rmse(self) -> torch.Tensor:
        return (self.squared_error / self.count).sqrt()

    def equivariance_rmse(self) -> torch.Tensor:
        """``(n_structures, G)``"""
        self.finish()
        return torch.stack(self.equivariance)

    def record(self, result: RetrainResult, name: str) -> None:
        """Store the validation errors and predictions of term ``name`` in
        ``result``."""
        result.validation_rmse[name] = self.rmse()
        result.validation_equivariance_rmse[name] = self.equivariance_rmse().mean(dim=0)
        result.validation_predictions[name] = self.predictions
