"""The result of an audit: its numbers, complete with the summary written to
``audit.json``, and per-structure measures."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..diagnostics import AnalysisResult
from ..quantities import expected_irreps
from .summary import audit_summary, leakage
from .viewer import ChemiscopeViews


SCREEN_MEASURES = ("relative_lie_derivative", "inversion_error")
"""the per-structure infinitesimal measures of an audit's screen (see
:py:class:`~metatrain_symmetry.infinitesimal.InfinitesimalResult`)"""


@dataclass
class AuditResult(ChemiscopeViews):
    """The audit of a model on a dataset.

    Per-structure quantities are indexed like the audited structures. The
    ``summary`` is made with the result, from its numbers and the identities of
    the model and the dataset.
    """

    analysis: AnalysisResult
    """rotational analysis of the audited outputs and features"""
    outputs: list[str]
    """audited model outputs, in the order requested"""
    descriptions: dict[str, dict]
    """per audited output, its ``unit`` and ``sample_kind`` (see
    :py:func:`~metatrain_symmetry.audit.describe_outputs`)"""
    features: list[str]
    """audited internal features, in the order the model computes them"""
    targets: dict[str, str]
    """dataset key compared with each output that has a target"""
    predictions: dict[str, list[torch.Tensor]] = field(repr=False)
    """per output, the prediction on each unrotated structure, ``(n_samples, n)``
    float64 (``n`` values per sample: components times properties)"""
    references: dict[str, list[torch.Tensor]] = field(repr=False)
    """per output with a target, the dataset values, shaped as the predictions"""
    model: dict
    """identity of the audited model (see
    :py:func:`~metatrain_symmetry.identity.model_identity`)"""
    dataset: dict
    """identity of the dataset (see
    :py:func:`~metatrain_symmetry.identity.dataset_identity`)"""
    frames: list = field(default_factory=list, repr=False)
    """the audited structures (``ase.Atoms``), in order"""
    screen: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    """per screened output, each of :py:data:`SCREEN_MEASURES` per structure,
    ``(n_structures,)`` (NaN where the output is zero); empty without a screen"""
    summary: dict = field(init=False, repr=False)
    """JSON-ready summary, as written to ``audit.json``"""

    def __post_init__(self):
        comparisons = {
            name: (key, self.predictions[name], self.references[name])
            for name, key in self.targets.items()
        }
        screens = {
            name: (measures, self.relative_equivariance_errors(name))
            for name, measures in self.screen.items()
        }
        self.summary = audit_summary(
            self.analysis,
            self.model,
            self.dataset,
            {name: self.descriptions[name] for name in self.outputs},
            self.features,
            comparisons,
            screens,
        )

    @property
    def n_structures(self) -> int:
        return len(next(iter(self.predictions.values())))

    def is_force(self, name: str) -> bool:
        """Whether ``name`` is a per-atom Cartesian vector (a force)."""
        return expected_irreps(name) == [(1, 1)]

    def leakage(self, name: str) -> torch.Tensor | None:
        """Per-structure symmetry leakage ``1 - b`` at the expected irreps of
        ``name``, ``(n_structures,)``; ``None`` when no irrep is expected."""
        leaked = leakage(self.analysis, name)
        return None if leaked is None else leaked[0]

    def leakage_error(self, name: str) -> torch.Tensor | None:
        """Standard error of :py:meth:`leakage`, ``(n_structures,)``; ``None`` on
        exact grids or when no irrep is expected."""
        leaked = leakage(self.analysis, name)
        return None if leaked is None else leaked[1]

    def relative_equivariance_errors(self, name: str) -> torch.Tensor:
        """Per-structure equivariance RMSE of ``name`` over the RMS of its
        unrotated prediction, ``(n_structures,)``: the grid's counterpart of the
        screen's relative Lie derivative (NaN where the output is zero)."""
        scale = torch.stack(
            [prediction.square().mean().sqrt() for prediction in self.predictions[name]]
        )
        relative = self.analysis.equivariance_rmse(name).to(torch.float64) / scale
        return relative.masked_fill(self.analysis.zero_structures[name], math.nan)

    def structure_errors(self, name: str) -> torch.Tensor | None:
        """Per-structure RMSE of the unrotated prediction of ``name`` against its
        target, ``(n_structures,)``; ``None`` without a target."""
        if name not in self.references:
            return None
        return torch.stack(
            [
                (prediction - reference).square().mean().sqrt()
                for prediction, reference in zip(
                    self.predictions[name], self.references[name], strict=True
                )
            ]
        )

    def atom_equivariance_errors(self, name: str) -> list[torch.Tensor]:
        """Per-atom equivariance RMSE of a per-atom output: for each structure an
        ``(n_atoms,)`` tensor, the RMS deviation of the atom's components from
        their O(3) average."""
        variance = self.analysis.variance[name]
        sizes = [len(prediction) for prediction in self.predictions[name]]
        offsets = torch.tensor([0] + sizes[:-1]).cumsum(dim=0)
        total = torch.zeros(sum(sizes), dtype=torch.float64)
        count = torch.zeros(sum(sizes), dtype=torch.float64)
        for key, block in variance.items():
            dimension = 1
            if "o3_lambda" in variance.keys.names:
                dimension = 2 * int(key["o3_lambda"]) + 1
            system = block.samples.column("system").to(torch.long)
            row = offsets[system] + block.samples.column("atom").to(torch.long)
            values = block.values.to(torch.float64).reshape(len(system), -1)
            total.index_add_(0, row, dimension * values.sum(dim=1))
            count.index_add_(
                0, row, torch.full_like(total[row], dimension * values.shape[1])
            )
        return list((total / count.clamp(min=1)).sqrt().split(sizes))

    def deviations(self, name: str) -> list[torch.Tensor]:
        """Deviation of the unrotated prediction of a per-atom vector output from
        its O(3) average: for each structure an ``(n_atoms, 3)`` tensor."""
        average = self.analysis.average[name].block()
        system = average.samples.column("system")
        values = average.values.to(torch.float64).reshape(len(system), 3, -1)[..., 0]
        deviations = []
        for index, prediction in enumerate(self.predictions[name]):
            mean = values[system == index]
            deviations.append(prediction.reshape(len(mean), 3, -1)[..., 0] - mean)
        return deviations
