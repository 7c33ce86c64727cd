"""The quantities a model was trained to predict, read from metatrain's record
of its training targets (``dataset_info``) in checkpoints and in exported models
of any process."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ._utils import first_line


__all__ = ["ModelTarget", "recorded_targets"]


@dataclass(frozen=True)
class ModelTarget:
    """A quantity a model was trained to predict.

    Read from metatrain's record of its training targets when the model has one
    (checkpoints, exported metatrain models in any process), else from the
    model's declared outputs.
    """

    name: str
    """the output name, e.g. ``"energy"``"""
    quantity: str
    """the physical quantity, e.g. ``"energy"`` (empty when unknown)"""
    unit: str
    """the unit of the values, e.g. ``"eV"`` (empty when unknown)"""
    sample_kind: str
    """``"system"`` (one value per structure), ``"atom"`` or ``"atom_pair"``"""
    gradients: tuple[str, ...] = ()
    """gradients the model was trained on: ``"positions"`` (conservative forces),
    ``"strain"`` (stress)"""
    components: tuple[str, ...] | None = None
    """names of the component axes: ``()`` for a scalar, ``("xyz",)`` for a
    Cartesian vector, ``("xyz_1", "xyz_2")`` for a rank-2 tensor; ``None`` when
    unknown"""
    n_properties: int | None = None
    """number of properties per component, ``None`` when unknown"""


# TorchScript method added to a scripted metatrain model to read its training
# targets: the Python classes of metatrain's DatasetInfo only exist in the process
# that scripted the model, so the record must be read from inside TorchScript
_TARGETS_METHOD = "metatrain_symmetry_training_targets"
_TARGETS_SOURCE = f"""
def {_TARGETS_METHOD}(
    self,
) -> Dict[str, Tuple[str, str, List[str], List[str], List[str], int]]:
    result: Dict[str, Tuple[str, str, List[str], List[str], List[str], int]] = {{}}
    for name, info in self.dataset_info.targets.items():
        block = info.layout.block(0)
        gradients: List[str] = []
        if info.is_scalar:
            gradients = block.gradients_list()
        components: List[str] = []
        for component in block.components:
            components.append(component.names[0])
        result[name] = (
            info.quantity,
            info.unit,
            block.samples.names,
            gradients,
            components,
            len(block.properties),
        )
    return result
"""


def recorded_targets(module: torch.nn.Module) -> dict[str, ModelTarget] | None:
    """metatrain's record of the training targets of ``module`` (its
    ``dataset_info``), or ``None`` for models without one."""
    owner = next((m for m in module.modules() if _has_dataset_info(m)), None)
    if owner is None:
        return None
    if not isinstance(owner, torch.jit.ScriptModule):
        records = {}
        for name, info in owner.dataset_info.targets.items():
            block = info.layout.block(0)
            records[name] = (
                info.quantity,
                info.unit,
                block.samples.names,
                info.gradients,
                [component.names[0] for component in block.components],
                len(block.properties),
            )
        return _model_targets(records)
    try:
        if not owner._c._has_method(_TARGETS_METHOD):
            owner.define(_TARGETS_SOURCE)
        records = getattr(owner, _TARGETS_METHOD)()
    except RuntimeError as error:
        warnings.warn(
            "could not read the training targets of this exported metatrain model "
            f"({first_line(error)}); using its declared outputs",
            stacklevel=4,
        )
        return None
    return _model_targets(records)


def _model_targets(records: dict) -> dict[str, ModelTarget]:
    """The targets of metatrain's records ``(quantity, unit, sample names,
    gradients, component names, number of properties)``, by name."""
    targets = {}
    for name, record in records.items():
        quantity, unit, sample_names, gradients, components, n_properties = record
        targets[name] = ModelTarget(
            name=name,
            quantity=quantity,
            unit=unit,
            sample_kind=_sample_kind_of(sample_names),
            gradients=tuple(sorted(gradients)),
            components=tuple(components),
            n_properties=int(n_properties),
        )
    return targets


def _has_dataset_info(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.jit.ScriptModule):
        # reading the attribute itself fails outside the scripting process
        return module._c.hasattr("dataset_info")
    return hasattr(module, "dataset_info") and hasattr(module.dataset_info, "targets")


def _sample_kind_of(sample_names: list[str]) -> str:
    """The sample kind of a target from its sample names, as metatrain reads it."""
    if "atom" in sample_names:
        return "atom"
    if "first_atom" in sample_names:
        return "atom_pair"
    return "system"
