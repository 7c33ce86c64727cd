"""Registration of the ``equivariance`` loss type in metatrain: the only module of
metatrain-symmetry that patches metatrain.

metatrain (2026.4) has no plugin mechanism for loss types, and its loss functions
see predictions and targets but neither the model nor the systems. Five functions
are wrapped, each right after metatrain defines it (so that modules importing it
by name get the wrapper):

- ``metatrain.utils.loss.create_loss``: builds
  :py:class:`~metatrain_symmetry.losses.EquivarianceLoss` for ``type:
  equivariance`` and defers to metatrain otherwise;
- ``metatrain.utils.loss.LossAggregator.__init__``: gives the equivariance losses
  of one aggregator a shared :py:class:`~metatrain_symmetry.losses.PenaltyContext`;
- ``metatrain.utils.evaluate_model.evaluate_model``: records the model, systems
  and targets of every training step (``is_training=True`` with gradients enabled)
  and clears them for other evaluations, e.g. validation; a training step
  evaluates the targets the losses ask for (a strain gradient, see
  :py:meth:`~metatrain_symmetry.losses.PenaltyContext.evaluated_targets`);
- ``metatrain.utils.per_atom.average_by_num_atoms``: records which targets of
  that step are not divided by the number of atoms;
- ``metatrain.utils.architectures.check_architecture_options``: validates the
  ``equivariance`` entries of ``training.loss`` when the options are read, before
  any data is loaded;

and ``metatrain.utils.logging.MetricLogger.log`` adds ``L_sigma(<target>)`` to the
training metrics, and ``L_lie(<target>)`` of monitored targets to the validation
metrics (log line and ``train.csv``).

With the package installed, an import hook set up at interpreter start-up (see
``_metatrain_symmetry_autoload``) applies these patches when metatrain imports the
modules, unless ``METATRAIN_SYMMETRY_AUTOLOAD=0``. :py:func:`register` applies
them explicitly.
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
import weakref
from types import ModuleType

import _metatrain_symmetry_autoload as _autoload


__all__ = [
    "AUTOLOAD_VARIABLE",
    "PATCHED_MODULES",
    "SUPPORTED_METATRAIN",
    "MetatrainVersionError",
    "is_registered",
    "patch_module",
    "register",
]


SUPPORTED_METATRAIN = "2026.4.x"
"""metatrain versions whose internals these patches were written for."""

AUTOLOAD_VARIABLE = _autoload.VARIABLE
"""Environment variable switching automatic registration off when ``0``."""

PATCHED_MODULES = _autoload.MODULES
"""metatrain modules patched, in the order :py:func:`register` imports them (the
start-up hook watches the same list)."""

_MARK = "_metatrain_symmetry_patched"
_CONTEXTS: weakref.WeakSet = weakref.WeakSet()
_OPEN_CONTEXTS: list = []
_ORIGINALS: dict[str, object] = {}


class MetatrainVersionError(RuntimeError):
    """metatrain's internals differ from those these patches were written for."""


def _incompatible(what: str) -> MetatrainVersionError:
    try:
        from metatrain import __version__ as version
    except Exception:  # pragma: no cover - metatrain without a version
        version = "unknown"
    return MetatrainVersionError(
        f"metatrain-symmetry supports metatrain {SUPPORTED_METATRAIN}, but the "
        f"installed metatrain {version} differs: {what}. Install a supported "
        f"metatrain (pip install 'metatrain>=2026.4,<2026.5'), or set "
        f"{AUTOLOAD_VARIABLE}=0 to use metatrain without the 'equivariance' loss"
    )


def _require_parameters(function, names: tuple[str, ...], what: str) -> None:
    if not callable(function):
        raise _incompatible(f"{what} is missing")
    try:
        parameters = list(inspect.signature(function).parameters)
    except (TypeError, ValueError) as error:
        raise _incompatible(f"the signature of {what} cannot be read") from error
    if parameters[: len(names)] != list(names):
        raise _incompatible(
            f"{what} takes ({', '.join(parameters)}), expected ({', '.join(names)})"
        )


def _check_version() -> None:
    from metatrain import __version__ as version

    if not version.startswith("2026.4."):
        warnings.warn(
            f"metatrain-symmetry was written for metatrain {SUPPORTED_METATRAIN}; "
            f"metatrain {version} is installed. Its internals look compatible, but "
            "check the equivariance loss before relying on it",
            stacklevel=3,
        )


def _wrap(module: ModuleType, name: str, make_wrapper) -> None:
    original = getattr(module, name)
    if getattr(original, _MARK, False):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, _MARK, True)
    if isinstance(module, ModuleType):
        _ORIGINALS[f"{module.__name__}.{name}"] = original
    setattr(module, name, wrapper)


# --- one function per patched module -------------------------------------------------


def _patch_loss(module: ModuleType) -> None:
    _require_parameters(
        getattr(module, "create_loss", None),
        ("loss_type", "name", "gradient", "weight", "reduction"),
        "metatrain.utils.loss.create_loss",
    )
    aggregator = getattr(module, "LossAggregator", None)
    if aggregator is None or not hasattr(module, "LossInterface"):
        raise _incompatible("metatrain.utils.loss.LossAggregator is missing")
    _require_parameters(
        aggregator.__init__,
        ("self", "targets", "config"),
        "metatrain.utils.loss.LossAggregator.__init__",
    )

    def make_create_loss(original):
        def create_loss(loss_type, *, name, gradient, weight, reduction, **extra):
            from .loss_options import LOSS_TYPE
            from .losses import EquivarianceLoss

            if loss_type != LOSS_TYPE:
                return original(
                    loss_type,
                    name=name,
                    gradient=gradient,
                    weight=weight,
                    reduction=reduction,
                    **extra,
                )
            context = _OPEN_CONTEXTS[-1] if _OPEN_CONTEXTS else None
            return EquivarianceLoss(
                name=name,
                gradient=gradient,
                weight=weight,
                reduction=reduction,
                context=context,
                **extra,
            )

        return create_loss

    def make_init(original):
        def __init__(self, targets, config, *args, **kwargs):
            from .losses import PenaltyContext

            context = PenaltyContext()
            _OPEN_CONTEXTS.append(context)
            try:
                original(self, targets, config, *args, **kwargs)
            finally:
                _OPEN_CONTEXTS.pop()
            if context.losses:
                self.equivariance_context = context
                _CONTEXTS.add(context)

        return __init__

    _wrap(module, "create_loss", make_create_loss)
    _wrap(aggregator, "__init__", make_init)


def _patch_evaluate_model(module: ModuleType) -> None:
    _require_parameters(
        getattr(module, "evaluate_model", None),
        ("model", "systems", "targets", "is_training"),
        "metatrain.utils.evaluate_model.evaluate_model",
    )

    def make_wrapper(original):
        def evaluate_model(model, systems, targets, is_training, *args, **kwargs):
            import torch

            training = is_training and torch.is_grad_enabled()
            evaluated = targets
            for context in list(_CONTEXTS) if training else []:
                evaluated = context.evaluated_targets(systems, evaluated)
            result = original(model, systems, evaluated, is_training, *args, **kwargs)
            if _CONTEXTS:
                step = None
                if training:
                    from .rotated_predictions import TrainingStep

                    # keep the trainer's list object: average_by_num_atoms
                    # recognises the step by it
                    step = TrainingStep(model, systems, dict(targets))
                for context in list(_CONTEXTS):
                    context.step = step
                    # metatrain also evaluates other models outside training
                    # steps (the composition baseline): monitor the trained one
                    if (
                        step is None
                        and context.monitor is not None
                        and context.trains(model)
                    ):
                        context.monitor.observe(model, systems, dict(targets))
            return result

        return evaluate_model

    _wrap(module, "evaluate_model", make_wrapper)


def _patch_per_atom(module: ModuleType) -> None:
    _require_parameters(
        getattr(module, "average_by_num_atoms", None),
        ("tensor_map_dict", "systems", "per_structure_keys"),
        "metatrain.utils.per_atom.average_by_num_atoms",
    )

    def make_wrapper(original):
        def average_by_num_atoms(tensor_map_dict, systems, per_structure_keys):
            for context in list(_CONTEXTS):
                step = context.step
                if step is not None and step.systems is systems:
                    step.per_structure_targets = list(per_structure_keys)
                if context.monitor is not None:
                    context.monitor.per_structure_targets(systems, per_structure_keys)
            return original(tensor_map_dict, systems, per_structure_keys)

        return average_by_num_atoms

    _wrap(module, "average_by_num_atoms", make_wrapper)


def _patch_architectures(module: ModuleType) -> None:
    _require_parameters(
        getattr(module, "check_architecture_options", None),
        ("name", "options"),
        "metatrain.utils.architectures.check_architecture_options",
    )

    def make_wrapper(original):
        def check_architecture_options(name, options, *args, **kwargs):
            from .loss_options import check_loss_options

            training = options.get("training") if hasattr(options, "get") else None
            if hasattr(training, "get"):
                check_loss_options(training.get("loss"), "training.loss")
            return original(name, options, *args, **kwargs)

        return check_architecture_options

    _wrap(module, "check_architecture_options", make_wrapper)


def _training(context) -> dict[str, float]:
    return context.pop_log()


def _monitored(context) -> dict[str, float]:
    return {} if context.monitor is None else context.monitor.pop()


def _pop(read) -> dict[str, float]:
    """``read(context)`` of every open context, merged."""
    extra: dict[str, float] = {}
    for context in list(_CONTEXTS):
        extra.update(read(context))
    return extra


def _with_extra(metrics, names: list[str], name: str, extra: dict):
    """``metrics`` with ``extra`` added to the dictionary of ``name``."""
    if not extra:
        return metrics
    if isinstance(metrics, dict):
        metrics = [metrics]
    metrics = list(metrics)
    index = names.index(name)
    if index < len(metrics) and "loss" in metrics[index]:
        metrics[index] = {**metrics[index], **extra}
    return metrics


def _patch_logging(module: ModuleType) -> None:
    logger = getattr(module, "MetricLogger", None)
    if logger is None:
        raise _incompatible("metatrain.utils.logging.MetricLogger is missing")
    _require_parameters(
        logger.log, ("self", "metrics"), "metatrain.utils.logging.MetricLogger.log"
    )

    def make_wrapper(original):
        def log(self, metrics, *args, **kwargs):
            names = list(getattr(self, "names", []))
            if _CONTEXTS and "training" in names:
                metrics = _with_extra(metrics, names, "training", _pop(_training))
            if _CONTEXTS and "validation" in names:
                metrics = _with_extra(metrics, names, "validation", _pop(_monitored))
            return original(self, metrics, *args, **kwargs)

        return log

    _wrap(logger, "log", make_wrapper)


# one patch function per module of PATCHED_MODULES, in the same order
_PATCHERS = dict(
    zip(
        PATCHED_MODULES,
        (
            _patch_loss,
            _patch_evaluate_model,
            _patch_per_atom,
            _patch_architectures,
            _patch_logging,
        ),
        strict=True,
    )
)


def patch_module(module: ModuleType) -> None:
    """Apply the patches of one freshly imported metatrain module (called by the
    import hook right after the module's code ran).

    :raises MetatrainVersionError: if the module is not what the patches expect
    """
    patcher = _PATCHERS.get(module.__name__)
    if patcher is None:
        return
    if module.__name__ == "metatrain.utils.loss":
        _check_version()
    patcher(module)


def register() -> None:
    """Register the ``equivariance`` loss type in metatrain explicitly.

    Imports and patches the metatrain modules listed in
    :py:data:`PATCHED_MODULES`, then updates metatrain modules imported earlier
    that hold the original functions under their own names. Calling it again does
    nothing.

    :raises MetatrainVersionError: if metatrain's internals differ from those of
        the supported versions
    """
    import importlib

    _check_version()
    for name in PATCHED_MODULES:
        _PATCHERS[name](importlib.import_module(name))
    for module in list(sys.modules.values()):
        if not getattr(module, "__name__", "").startswith("metatrain"):
            continue
        for qualified, original in _ORIGINALS.items():
            attribute = qualified.rsplit(".", 1)[1]
            if getattr(module, attribute, None) is original:
                owner = sys.modules[qualified.rsplit(".", 1)[0]]
                setattr(module, attribute, getattr(owner, attribute))


def is_registered() -> bool:
    """Whether the ``equivariance`` loss type is registered in this process."""
    module = sys.modules.get("metatrain.utils.loss")
    return module is not None and getattr(module.create_loss, _MARK, False)
