"""The result of a retraining, and the checkpoints and tables it writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._utils import atomic_directory
from ..grid import O3Grid
from .files import plot_pareto, write_pareto_tables


@dataclass
class RetrainResult:
    """Closed-form retraining of a readout for several values of ``gamma``.

    Training quantities are in metatrain's normalized loss units (residuals divided
    by the per-target scale), validation errors in the model's output units.
    """

    gammas: list[float]
    targets: list[str]
    objective: torch.Tensor
    """``(n_gamma,)`` training objective ``L`` at each solution"""
    training_mse: dict[str, torch.Tensor]
    """per term (see ``terms``), ``(n_gamma,)`` ``L_mu`` on the training
    structures"""
    training_equivariance: dict[str, torch.Tensor]
    """per term, ``(n_gamma,)`` ``L_sigma`` on the training structures"""
    parameters: dict[str, torch.Tensor]
    """per target, ``(n_gamma, n_parameters)`` free readout parameters"""
    undetermined: dict[str, torch.Tensor] = field(default_factory=dict)
    """per target, ``(n_gamma,)`` int64: how many directions of the readout
    parameters the objective leaves undetermined (they keep their trained
    values)"""
    validation_rmse: dict[str, torch.Tensor] = field(default_factory=dict)
    """per term, ``(n_gamma,)`` RMSE against the validation labels"""
    validation_equivariance_rmse: dict[str, torch.Tensor] = field(default_factory=dict)
    """per term, ``(n_gamma,)`` mean over validation structures of the
    per-structure equivariance RMSE (as :py:func:`equivariance_rmse`)"""
    validation_predictions: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    """per term, one ``(n_gamma, n_samples, *components, n_properties)`` tensor per
    validation structure: the solver's predictions on the unrotated structures"""
    checkpoints: list[Path] = field(default_factory=list)
    """the written checkpoints, one per gamma (empty without an output directory)"""
    grid: O3Grid | None = None
    ridge: float = 0.0
    terms: list[str] = field(default_factory=list)
    """the terms of the objective: every target and, for an energy trained with
    forces, ``"<target>/forces"`` (the keys of the per-term dictionaries above;
    ``parameters`` is keyed by target)"""

    def table(self) -> list[dict[str, float]]:
        """One row per gamma: the objective, per target the number of undetermined
        readout directions and, per term, the training ``L_mu`` and ``L_sigma``
        and the validation errors when available."""
        rows = []
        for index, gamma in enumerate(self.gammas):
            row = {"gamma": gamma, "objective": float(self.objective[index])}
            for name, counts in self.undetermined.items():
                row[f"{name} undetermined directions"] = int(counts[index])
            for name in self.terms or self.targets:
                row[f"{name} train L_mu"] = float(self.training_mse[name][index])
                row[f"{name} train L_sigma"] = float(
                    self.training_equivariance[name][index]
                )
                if name in self.validation_rmse:
                    row[f"{name} val RMSE"] = float(self.validation_rmse[name][index])
                    row[f"{name} val equivariance RMSE"] = float(
                        self.validation_equivariance_rmse[name][index]
                    )
            rows.append(row)
        return rows


def checkpoint_name(gamma: float) -> str:
    """File name of the checkpoint retrained with ``gamma``: ``gamma-<value>.ckpt``."""
    return f"gamma-{gamma:g}.ckpt"


def write_checkpoints(
    result: RetrainResult, targets, pet: torch.nn.Module, original: dict, output: Path
) -> None:
    """Write into ``output`` (atomically) one checkpoint per gamma, with the
    solutions assigned to ``pet``'s readout, and the Pareto tables and plot."""
    with atomic_directory(output) as staging:
        for index, gamma in enumerate(result.gammas):
            for target in targets:
                parameters = result.parameters[target.name][index]
                target.readout.assign(target.expand(parameters))
            path = staging / checkpoint_name(gamma)
            torch.save(_checkpoint(pet, original), path)
            result.checkpoints.append(output / path.name)
        write_pareto_tables(result, staging / "pareto.csv", staging / "pareto.md")
        plot_pareto(result, staging / "pareto.png")


def _checkpoint(pet, original: dict) -> dict:
    """A metatrain checkpoint of ``pet`` keeping the training state of ``original``,
    so that ``mtt export``, ``mtt train --restart`` and fine-tuning accept it."""
    checkpoint = pet.get_checkpoint()
    for key in (
        "trainer_ckpt_version",
        "train_hypers",
        "epoch",
        "best_epoch",
        "best_metric",
        "optimizer_state_dict",
        "scheduler_state_dict",
        "best_optimizer_state_dict",
    ):
        if key in original:
            checkpoint[key] = original[key]
    return checkpoint
