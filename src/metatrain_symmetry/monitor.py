"""The validation monitor of the equivariance loss: the squared Lie derivatives
of a model's predictions on the first validation structures of every epoch, as
``validation L_lie(<target>)`` in metatrain's log and ``train.csv``.

The quantity is the ``L_sigma`` of ``method: generators`` (see
:py:mod:`metatrain_symmetry.penalties`), in the units of the loss, evaluated
without gradients at the parameters the validation saw: it follows how symmetry
is learned, epoch by epoch, at the cost of three forward-mode evaluations of a
few structures.
"""

from __future__ import annotations

from typing import Optional

import torch

from .lie_predictions import evaluate_lie_derivatives
from .penalties import generator_penalty
from .rotated_predictions import TrainingStep


__all__ = ["MONITOR_STRUCTURES", "ValidationMonitor"]


MONITOR_STRUCTURES = 16
"""validation structures monitored per epoch with ``monitor: true``"""


class ValidationMonitor:
    """Collects the first ``n_structures`` structures that a model is evaluated
    on outside training steps (the validation), and evaluates the squared Lie
    derivatives of ``targets`` on them when the epoch is logged.

    :param targets: the monitored targets
    :param n_structures: structures per epoch, at least one
    """

    def __init__(self, targets: list[str], n_structures: int):
        self.targets = sorted(set(targets))
        self.n_structures = n_structures
        self._model: Optional[torch.nn.Module] = None
        self._systems: list = []
        self._infos: dict = {}
        self._per_structure: set[str] = set()
        self._batches: list = []

    def observe(self, model: torch.nn.Module, systems: list, infos: dict) -> None:
        """Keep the structures of one evaluation, while fewer than
        ``n_structures`` are kept, with the model and its target infos."""
        wanted = [name for name in self.targets if name in infos]
        # metatrain evaluates exported (scripted) models too, e.g. on the test
        # set: they cannot be evaluated as in a training step
        scripted = isinstance(model, torch.jit.ScriptModule)
        if scripted or not wanted or len(self._systems) >= self.n_structures:
            return
        self._model = model
        self._infos.update({name: infos[name] for name in wanted})
        self._systems.extend(systems[: self.n_structures - len(self._systems)])
        self._batches.append(systems)

    def per_structure_targets(self, systems: list, keys) -> None:
        """Record the targets metatrain does not divide by the number of atoms,
        when ``systems`` is one of the observed evaluations."""
        if any(batch is systems for batch in self._batches):
            self._per_structure.update(keys)

    def pop(self) -> dict[str, float]:
        """``L_lie(<target>)`` of every monitored target on the structures kept
        since the previous call (none if no structure was kept), then forget
        them."""
        if self._model is None or not self._systems:
            return {}
        model = getattr(self._model, "module", self._model)
        step = TrainingStep(
            model, self._systems, dict(self._infos), sorted(self._per_structure)
        )
        targets = list(self._infos)
        training = model.training
        # evaluated as in a training step (raw predictions, then the loss's
        # scaling), without gradients
        model.train()
        try:
            derivatives = evaluate_lie_derivatives(
                step, {name: {None} for name in targets}, create_graph=False
            )
            values = {
                f"L_lie({name})": float(generator_penalty(derivatives, name))
                for name in targets
            }
        finally:
            model.train(training)
        self._model, self._systems, self._infos, self._batches = None, [], {}, []
        self._per_structure = set()
        return values
