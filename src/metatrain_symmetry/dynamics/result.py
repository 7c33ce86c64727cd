"""The spectra of a training run: :py:class:`TrainingDynamics`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from metatensor.torch import TensorMap

from ..diagnostics import AnalysisResult
from ..grid import O3Grid


EPOCH_SOURCES = ("checkpoint", "file name", "order")
"""where the epochs of a dynamics come from: stored in the checkpoints, the numbers
ending their file names, or the order given"""
WEIGHTS = ("epoch", "best")
"""weights a checkpoint is analysed with: those saved at its epoch, or the best so
far (as ``mtt export`` uses)"""


@dataclass
class TrainingDynamics:
    """Spectra of outputs and internal features across the checkpoints of a
    training run, one entry per output or feature name.

    Checkpoints are sorted by epoch when their epochs are known.
    """

    checkpoints: list[str]
    """paths of the checkpoints, in epoch order"""
    epochs: list[int]
    """epoch of each checkpoint (metatrain counts epochs from 0)"""
    epoch_source: str
    """where the epochs come from: ``"checkpoint"`` (the ``epoch`` that metatrain
    stores in the checkpoint), ``"file name"`` (``model_<epoch>.ckpt``) or
    ``"order"`` (position in the list of checkpoints given)"""
    names: list[str]
    """analysed outputs, then internal features in the order the model computes
    them"""
    spectrum: dict[str, TensorMap]
    """dataset-mean normalized spectrum: one block, samples ``["epoch"]``,
    properties ``["chi_lambda", "chi_sigma"]``"""
    structure_spectrum: dict[str, TensorMap]
    """per-structure normalized spectrum: one block, samples
    ``["epoch", "system"]``, properties ``["chi_lambda", "chi_sigma"]``"""
    equivariance_rmse: dict[str, torch.Tensor]
    """per-structure equivariance RMSE, ``(n_checkpoints, n_structures)``, in the
    units of the output"""
    final: AnalysisResult
    """complete analysis of the last checkpoint, with the internal features first
    (in the order the model computes them) and the outputs after them: the
    layer-by-layer view"""
    grid: O3Grid
    """integration grid used for every checkpoint"""
    max_lambda: int
    """largest ``lambda`` of the spectra"""
    weights: str = "epoch"
    """which weights of each checkpoint were analysed: ``"epoch"`` (the weights at
    the end of that epoch) or ``"best"`` (the best weights so far)"""
    spectrum_error: dict[str, torch.Tensor] = field(default_factory=dict)
    """on a random grid, the standard error of each value of ``spectrum``,
    ``(n_checkpoints, n_irreps)`` ordered as its properties; empty on exact
    grids"""

    def spectrum_array(self, name: str) -> torch.Tensor:
        """Dataset-mean spectrum of ``name`` as a ``(n_checkpoints, max_lambda + 1,
        2)`` tensor; the last axis is ``sigma = +1, -1``."""
        values = self.spectrum[name].block().values
        return values.reshape(len(self.epochs), self.max_lambda + 1, 2)
