"""The options of the ``equivariance`` loss in metatrain's ``training.loss``: their
defaults and their checks, made before metatrain builds its losses so that a bad
option fails with one line naming it.

Adding an option: give its default in :py:data:`DEFAULTS` and check it in
:py:func:`check_options`; :py:class:`~metatrain_symmetry.losses.EquivarianceLoss`
reads the checked options.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ._utils import is_integer


__all__ = [
    "BASE_LOSSES",
    "DEFAULTS",
    "GENERATOR_DIRECTIONS",
    "LOSS_TYPE",
    "PENALTY_METHODS",
    "check_loss_options",
    "check_options",
]

LOSS_TYPE = "equivariance"
"""The ``type`` of the equivariance loss in metatrain options."""

BASE_LOSSES = ("mse", "mae", "huber")
"""Built-in pointwise metatrain losses usable as ``base``."""

DEFAULTS = {
    "base": "mse",
    "gamma": 1.0,
    "n_rotations": 2,
    "method": "rotations",
    "directions": "all",
    "fraction": 1.0,
}

PENALTY_METHODS = ("rotations", "generators")
"""how ``L_sigma`` is estimated: the variance over random rotated copies, or the
squared Lie derivatives along the generators of rotations"""

GENERATOR_DIRECTIONS = ("all", "random")
"""the directions of ``method: generators``: the three generators (exact), or one
random direction per structure and step (an unbiased estimate, from one
forward-mode copy of the batch instead of three, and one second derivative of
an energy instead of three for its forces and stress)"""

# left to metatrain, including its energy shorthands for the gradient entries
_GENERIC_OPTIONS = (
    "type",
    "weight",
    "reduction",
    "gradients",
    "forces",
    "stress",
    "virial",
)
_OPTIONS = (*DEFAULTS, "delta", "monitor")


def check_options(
    options: Mapping[str, Any], where: str, gradient: bool = False
) -> dict[str, Any]:
    """Validate the options of one equivariance loss entry.

    :param options: the entry, as written under ``training.loss`` (``type``,
        ``weight``, ``reduction`` and ``gradients`` are left to metatrain)
    :param where: the option path used in error messages, e.g.
        ``"training.loss.energy"``
    :param gradient: whether the entry is that of a gradient (forces, stress)
    :return: ``base``, ``gamma``, ``n_rotations``, ``method``, ``directions``,
        ``fraction`` and ``delta`` with defaults filled
    :raises ValueError: naming the offending option
    """
    unknown = [
        key for key in options if key not in _OPTIONS and key not in _GENERIC_OPTIONS
    ]
    if unknown:
        raise ValueError(
            f"unknown option {where}.{unknown[0]} for the '{LOSS_TYPE}' loss; "
            f"known options are {', '.join(_OPTIONS)} (and weight, reduction)"
        )
    checked = {**DEFAULTS, **{k: options[k] for k in _OPTIONS if k in options}}

    base = checked["base"]
    if base not in BASE_LOSSES:
        raise ValueError(
            f"{where}.base must be one of {', '.join(BASE_LOSSES)}, got {base!r}"
        )
    gamma = checked["gamma"]
    if (
        isinstance(gamma, bool)
        or not isinstance(gamma, (int, float))
        or not math.isfinite(gamma)
        or gamma < 0
    ):
        raise ValueError(f"{where}.gamma must be a finite number >= 0, got {gamma!r}")
    checked["gamma"] = float(gamma)
    n_rotations = checked["n_rotations"]
    if not is_integer(n_rotations):
        raise ValueError(
            f"{where}.n_rotations must be an integer >= 2, got {n_rotations!r}"
        )
    if n_rotations < 2:
        raise ValueError(
            f"{where}.n_rotations must be at least 2 (the variance needs two "
            f"copies), got {n_rotations}"
        )
    _check_method(options, checked["method"], where)
    if checked["directions"] not in GENERATOR_DIRECTIONS:
        raise ValueError(
            f"{where}.directions must be one of {', '.join(GENERATOR_DIRECTIONS)}, "
            f"got {checked['directions']!r}"
        )
    checked["fraction"] = _checked_fraction(checked["fraction"], where)
    if "monitor" in checked:
        checked["monitor"] = _monitored_structures(checked["monitor"], where, gradient)
    delta = checked.get("delta")
    if delta is not None and base != "huber":
        raise ValueError(f"{where}.delta is only used with base: huber")
    if base == "huber":
        delta = 1.0 if delta is None else delta
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or delta <= 0:
            raise ValueError(f"{where}.delta must be a positive number, got {delta!r}")
        checked["delta"] = float(delta)
    else:
        checked.pop("delta", None)
    return checked


def _checked_fraction(fraction, where: str) -> float:
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0 < fraction <= 1
    ):
        raise ValueError(
            f"{where}.fraction must be a number in (0, 1], the fraction of the "
            f"training steps that evaluate the penalty, got {fraction!r}"
        )
    return float(fraction)


def _monitored_structures(monitor, where: str, gradient: bool) -> int:
    """The validation structures that ``monitor`` asks for (0: none)."""
    from .monitor import MONITOR_STRUCTURES

    if isinstance(monitor, bool):
        monitor = MONITOR_STRUCTURES if monitor else 0
    if not is_integer(monitor) or monitor < 0:
        raise ValueError(
            f"{where}.monitor must be true, false or a number of validation "
            f"structures >= 0, got {monitor!r}"
        )
    if monitor and gradient:
        raise ValueError(
            f"{where}.monitor follows the values of a target, not its gradients: "
            "set it on the target's own entry"
        )
    return int(monitor)


def _check_method(options, method, where: str) -> None:
    if method not in PENALTY_METHODS:
        raise ValueError(
            f"{where}.method must be one of {', '.join(PENALTY_METHODS)}, "
            f"got {method!r}"
        )
    if method != "generators":
        for option in ("directions", "fraction"):
            if option in options:
                raise ValueError(
                    f"{where}.{option} applies to method: generators; method: "
                    "rotations draws random rotated copies: remove one of them"
                )
        return
    if "n_rotations" in options:
        raise ValueError(
            f"{where}.n_rotations applies to method: rotations; method: generators "
            "uses no rotated copies: remove one of them"
        )


def check_loss_options(loss: Any, where: str = "training.loss") -> None:
    """Validate every equivariance entry of a ``training.loss`` section (before
    metatrain expands it): target entries, their ``gradients`` and the energy
    shorthands ``forces``, ``stress`` and ``virial``.

    :raises ValueError: naming the offending option
    """
    if not isinstance(loss, Mapping):
        return
    for target, entry in loss.items():
        if not isinstance(entry, Mapping):
            continue
        path = f"{where}.{target}"
        if entry.get("type") == LOSS_TYPE:
            check_options(entry, path)
        subentries = dict(entry.get("gradients") or {})
        for shorthand in ("forces", "stress", "virial"):
            if shorthand in entry:
                subentries[shorthand] = entry[shorthand]
        for name, sub in subentries.items():
            if isinstance(sub, Mapping) and sub.get("type") == LOSS_TYPE:
                prefix = "gradients." if name not in entry else ""
                check_options(sub, f"{path}.{prefix}{name}", gradient=True)
