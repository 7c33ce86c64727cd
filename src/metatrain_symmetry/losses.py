"""The equivariance-penalty loss for metatrain: ``L = L_mu + gamma * L_sigma``.

``L_mu`` is a built-in pointwise metatrain loss (``mse``, ``mae`` or ``huber``),
computed exactly as metatrain computes it. ``L_sigma`` estimates the equivariance
error of the prediction: every structure of the training batch is copied
``n_rotations`` times, each copy ``g_r x`` with an independent Haar-random element
``g_r`` of O(3) (half of them improper on average); the model's predictions on the
copies are back-transformed, ``z_r = rho(g_r)^-1 t(g_r x)``, and

    L_sigma = mean over samples, components and properties of
              sum_r (z_r - z_bar)^2 / (R - 1),      z_bar = sum_r z_r / R,

an unbiased estimate of the component-averaged equivariance error ``A`` that
:py:func:`metatrain_symmetry.analyze` reports in ``variance``, in the normalized
units of the base loss (after metatrain's removal of the composition baseline and
target scale, division by the number of atoms and per-property scales).

With ``method: generators``, ``L_sigma`` is instead the mean over samples,
components and properties of ``sum_k (L_k z)^2``, the squared Lie derivatives of
the prediction along the three generators of rotations (per radian squared, in
the same normalized units): zero exactly when the prediction is equivariant,
with no random rotation. It applies to the values of any target and to the
forces and stress of an energy; how the derivatives are taken (from the step's
own gradients, a reverse-mode copy or a forward-mode evaluation) is in
:py:func:`metatrain_symmetry.lie_predictions.evaluate_lie_derivatives`. With
``directions: random``, the forward-mode evaluation takes one random direction per
structure and step instead of the three generators, an unbiased estimate; with
``fraction: f``, only a random fraction ``f`` of the steps evaluate it, with the
weight ``1 / f``, and it costs about ``f`` times as much, still unbiased.

The prediction on the training batch itself is *not* one of the copies: it sits in
the frame chosen by metatrain's augmentation, which may be switched off or limited
to inversions, so only the independent copies give an unbiased estimate.

These classes are ordinary :py:class:`metatrain.utils.loss.LossInterface`
subclasses. They find the model and systems of the current training step in a
:py:class:`PenaltyContext`, which :py:mod:`metatrain_symmetry.hooks` fills during
``mtt train`` and tests fill by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from metatensor.torch import TensorMap
from metatrain.utils.loss import LossInterface, LossType

from .lie_energies import with_strain_gradient
from .lie_predictions import (
    LieDerivatives,
    evaluate_lie_derivatives,
    random_directions,
)
from .loss_options import check_options
from .monitor import ValidationMonitor
from .penalties import equivariance_penalty, generator_penalty
from .rotated_predictions import (
    RotatedPredictions,
    TrainingStep,
    evaluate_rotated_copies,
    loss_label,
)


__all__ = ["EquivarianceLoss", "PenaltyContext"]


class PenaltyContext:
    """Shared state of the equivariance losses of one loss aggregator.

    Holds the current :py:class:`TrainingStep` (``None`` outside training steps,
    e.g. during validation, where the losses reduce to their base loss), the random
    number generator of the copies (independent of torch's global generator, so
    that the penalty does not change metatrain's shuffling or augmentation), one
    evaluation of rotated copies per step shared by all losses, and running sums of
    ``L_sigma`` for the training log.

    :param seed: seed of the generator of the rotations
    """

    def __init__(self, seed: Optional[int] = None):
        self.losses: list[EquivarianceLoss] = []
        self.generator = torch.Generator()
        self.generator.manual_seed(torch.initial_seed() if seed is None else seed)
        self._step: Optional[TrainingStep] = None
        self._rotated: Optional[RotatedPredictions] = None
        self._derivatives: Optional[LieDerivatives] = None
        self._monitor: Optional[ValidationMonitor] = None
        self._trained: Optional[torch.nn.Module] = None
        # sums stay tensors on the model's device until logged: converting each
        # step's value to a float would wait for the device in mid-step
        self._log_sums: dict[str, list] = {}

    @property
    def step(self) -> Optional[TrainingStep]:
        return self._step

    @property
    def monitor(self) -> Optional[ValidationMonitor]:
        """The validation monitor of the losses with ``monitor`` set, or ``None``
        when none has."""
        if self._monitor is None:
            monitored = [loss for loss in self.losses if loss.monitor > 0]
            if monitored:
                self._monitor = ValidationMonitor(
                    [loss.target for loss in monitored],
                    max(loss.monitor for loss in monitored),
                )
        return self._monitor

    @step.setter
    def step(self, step: Optional[TrainingStep]) -> None:
        self._step = step
        self._rotated = None
        self._derivatives = None
        if step is not None:
            self._trained = step.model

    def evaluated_targets(
        self, systems: list, targets: Mapping[str, Any]
    ) -> Mapping[str, Any]:
        """The targets a training step on ``systems`` evaluates: ``targets``, with
        the strain gradient added to an energy trained with its forces only when
        a generator penalty on its values (not on its gradients) will take their
        Lie derivatives from the step's gradients and a structure is periodic
        (:py:func:`~metatrain_symmetry.lie_energies.with_strain_gradient`)."""
        if not any(bool(system.pbc.any()) for system in systems):
            return targets
        generators = [
            loss
            for loss in self.losses
            if loss.gamma > 0 and loss.method == "generators" and loss.target in targets
        ]
        values = {loss.target for loss in generators if loss.gradient is None}
        gradients = {loss.target for loss in generators if loss.gradient is not None}
        evaluated = dict(targets)
        for name in values - gradients:
            info = with_strain_gradient(targets[name])
            if info is not None:
                evaluated[name] = info
        return evaluated

    def trains(self, model: torch.nn.Module) -> bool:
        """Whether ``model`` is the model of this context's training steps."""
        return self._trained is not None and model is self._trained

    def rotated_predictions(self, loss: EquivarianceLoss) -> RotatedPredictions:
        """Predictions on rotated copies for the current step, evaluated once for
        every active loss of this context (or again if ``loss`` needs more copies
        or outputs than the cached evaluation has)."""
        step = self._step
        assert step is not None
        cached = self._rotated
        if cached is not None and cached.n_copies >= loss.n_rotations:
            if loss.target in cached.predictions and (
                loss.gradient is None or loss.gradient in cached.gradients[loss.target]
            ):
                return cached
        active = self._active(loss, "rotations")
        n_copies = max(other.n_rotations for other in active)
        gradients: dict[str, set] = {}
        for other in active:
            wanted = gradients.setdefault(other.target, set())
            if other.gradient is not None:
                wanted.add(other.gradient)
        self._rotated = evaluate_rotated_copies(
            step, gradients, n_copies, self.generator
        )
        return self._rotated

    def lie_derivatives(
        self, loss: EquivarianceLoss, predictions: dict[str, TensorMap]
    ) -> LieDerivatives:
        """Lie derivatives of the predictions of the current step, evaluated once
        for every active loss of this context with ``method: generators`` (or
        again if ``loss`` needs another target or gradient).

        :param predictions: the step's predictions, in the units of the loss
        """
        step = self._step
        assert step is not None
        cached = self._derivatives
        if cached is not None and loss.label in cached.values:
            return cached
        wanted: dict[str, set] = {}
        active = self._active(loss, "generators")
        for other in active:
            wanted.setdefault(other.target, set()).add(other.gradient)
        # one evaluation serves every loss: random only when all of them ask,
        # and on the largest fraction any of them asks for
        weight = self._model_weight(max(other.fraction for other in active))
        directions = None
        if all(other.directions == "random" for other in active):
            positions = step.systems[0].positions
            directions = random_directions(
                len(step.systems), self.generator, positions.dtype, positions.device
            )
        self._derivatives = evaluate_lie_derivatives(
            step,
            wanted,
            predictions=predictions,
            directions=directions,
            model_weight=weight,
        )
        return self._derivatives

    def _model_weight(self, fraction: float) -> float:
        """The weight of the model evaluations of this step's penalty: 1 for
        ``fraction`` 1; else ``1 / fraction`` with probability ``fraction`` and 0
        otherwise. (Drawing structures one by one instead would save little: for
        small structures a model evaluation costs mostly per call.)"""
        if fraction >= 1.0:
            return 1.0
        drawn = bool(torch.rand((), generator=self.generator) < fraction)
        return 1.0 / fraction if drawn else 0.0

    def _active(self, loss: EquivarianceLoss, method: str) -> list[EquivarianceLoss]:
        """The losses of this context that penalise the current step with
        ``method``, ``loss`` included."""
        active = [
            other
            for other in self.losses
            if other.gamma > 0
            and other.method == method
            and other.target in self._step.targets
        ]
        if loss not in active:
            active.append(loss)
        return active

    def record(self, label: str, value: torch.Tensor) -> None:
        """Add one step's ``L_sigma`` (a detached scalar tensor) to the log."""
        sums = self._log_sums.setdefault(label, [0.0, 0])
        sums[0] = sums[0] + value
        sums[1] += 1

    def pop_log(self) -> dict[str, float]:
        """Mean ``L_sigma`` of each loss over the training batches since the
        previous call, keyed ``"L_sigma(<target>)"``."""
        means = {
            f"L_sigma({label})": float(total) / count
            for label, (total, count) in self._log_sums.items()
            if count > 0
        }
        self._log_sums = {}
        return means


class EquivarianceLoss(LossInterface):
    """``L = L_mu + gamma * L_sigma`` for one target (or one of its gradients).

    :param name: target name
    :param gradient: ``None``, or the gradient the loss applies to
        (``"positions"`` for conservative forces, ``"strain"`` for stress)
    :param weight: weight of this term in metatrain's sum of losses
    :param reduction: reduction of the base loss
    :param base: ``mse``, ``mae`` or ``huber``
    :param gamma: weight of ``L_sigma``, ``>= 0``; with ``0`` the loss is exactly the
        base loss and no rotated copy is evaluated
    :param n_rotations: rotated copies per structure, ``>= 2``
    :param method: see
        :py:data:`~metatrain_symmetry.loss_options.PENALTY_METHODS`
    :param directions: see
        :py:data:`~metatrain_symmetry.loss_options.GENERATOR_DIRECTIONS`
    :param fraction: with ``method: generators``, the probability with which a
        training step makes the model evaluations of the penalty, whose cost
        scales with it; those penalties then weigh ``1 / fraction`` (an unbiased
        estimate), and are zero at the other steps
    :param delta: threshold of the Huber base loss (default 1)
    :param monitor: log ``L_lie`` of the target on this many validation
        structures per epoch (``True``:
        :py:data:`~metatrain_symmetry.monitor.MONITOR_STRUCTURES`)
    :param context: the :py:class:`PenaltyContext` this loss takes training steps
        from; a new one by default
    """

    def __init__(
        self,
        name: str,
        gradient: Optional[str],
        weight: float,
        reduction: str,
        base: str = "mse",
        gamma: float = 1.0,
        n_rotations: Optional[int] = None,
        method: str = "rotations",
        delta: Optional[float] = None,
        monitor: bool | int = False,
        context: Optional[PenaltyContext] = None,
        directions: Optional[str] = None,
        fraction: Optional[float] = None,
    ):
        options = {"base": base, "gamma": gamma, "method": method, "monitor": monitor}
        if n_rotations is not None:
            options["n_rotations"] = n_rotations
        if directions is not None:
            options["directions"] = directions
        if fraction is not None:
            options["fraction"] = fraction
        if delta is not None:
            options["delta"] = delta
        where = f"training.loss.{name}" + (f".gradients.{gradient}" if gradient else "")
        checked = check_options(options, where, gradient is not None)
        super().__init__(name, gradient, weight, reduction)
        self.base = checked["base"]
        self.gamma = checked["gamma"]
        self.n_rotations = checked["n_rotations"]
        self.method = checked["method"]
        self.directions = checked["directions"]
        self.fraction = checked["fraction"]
        self.monitor: int = checked["monitor"]
        """validation structures on which ``L_lie`` is logged per epoch (0: off)"""
        extra = {"delta": checked["delta"]} if self.base == "huber" else {}
        self.base_loss = LossType.from_key(self.base).cls(
            name=name, gradient=gradient, weight=weight, reduction=reduction, **extra
        )
        self.context = PenaltyContext() if context is None else context
        self.context.losses.append(self)
        self.last_penalty: Optional[torch.Tensor] = None
        """``L_sigma`` of the last training step (detached), ``None`` if none"""

    @property
    def label(self) -> str:
        """Name of this loss in the training log."""
        return loss_label(self.target, self.gradient)

    def compute(
        self,
        predictions: dict[str, TensorMap],
        targets: dict[str, TensorMap],
        extra_data: Optional[Any] = None,
    ) -> torch.Tensor:
        """``L_mu``, plus ``gamma * L_sigma`` during training steps.

        :param predictions: predictions of the step, in the loss's units
        :param targets: reference values
        :param extra_data: passed to the base loss
        """
        loss = self.base_loss.compute(predictions, targets, extra_data)
        step = self.context.step
        if self.gamma == 0.0 or step is None or not torch.is_grad_enabled():
            return loss
        if self.gradient is not None:
            tensor = targets.get(self.target)
            if tensor is None or self.gradient not in tensor[0].gradients_list():
                return loss
        penalty = self.penalty(predictions)
        return loss + self.gamma * penalty

    def penalty(
        self, predictions: Optional[dict[str, TensorMap]] = None
    ) -> torch.Tensor:
        """``L_sigma`` for the current training step of the context (differentiable
        with respect to the model's parameters).

        :param predictions: the step's predictions in the units of the loss; with
            ``method: generators``, the Lie derivatives of an energy come from the
            forces or stress among them, when the step computed those
        """
        if self.method == "generators":
            derivatives = self.context.lie_derivatives(self, predictions or {})
            penalty = generator_penalty(derivatives, self.label)
        else:
            rotated = self.context.rotated_predictions(self)
            penalty = equivariance_penalty(
                rotated, self.target, self.gradient, self.n_rotations
            )
        self.last_penalty = penalty.detach()
        self.context.record(self.label, self.last_penalty)
        return penalty
