"""What an audit compares: the model outputs that have dataset targets, the
targets read from the structures, and the predictions on unrotated structures."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from metatomic.torch import ModelOutput

from ..data import reference_value
from ..engine import RotatedEvaluator
from ..grid import O3Grid
from ..models import LoadedModel
from ..quantities import NON_CONSERVATIVE_FORCES, default_label_key
from ..systems import prepare_systems


def force_output(model: LoadedModel) -> str | None:
    """The model output compared with a dataset's forces.

    ``"forces"`` (the conservative ``-dE/dr``) when the model's energy was trained
    with force gradients (metatrain models know), else the declared
    ``non_conservative_force``, else ``"forces"`` when the model has an energy.
    """
    outputs = model.outputs
    energy_target = model.targets.get("energy")
    if energy_target is not None and "positions" in energy_target.gradients:
        return "forces"
    for name in NON_CONSERVATIVE_FORCES:
        if name in outputs:
            return name
    if "energy" in outputs:
        return "forces"
    return None


def default_targets(model: LoadedModel) -> dict[str, str]:
    """Default mapping from output names to dataset keys: ``energy`` from the
    key ``energy``, forces (see :py:func:`force_output`) from the key ``forces``."""
    targets = {}
    if "energy" in model.outputs:
        targets["energy"] = default_label_key("energy")
    forces = force_output(model)
    if forces is not None:
        targets[forces] = default_label_key(forces)
    return targets


def resolve_targets(
    model: LoadedModel,
    frames: Sequence,
    outputs: Sequence[str] | None,
    targets: dict[str, str] | None,
) -> tuple[list[str], dict[str, str]]:
    """The audited outputs and the dataset key of each one that has a target.

    Without ``outputs``, those of ``targets`` or else of
    :py:func:`default_targets`; without ``targets``, the default keys that every
    structure has.

    :return: ``(outputs, targets)``
    """
    if outputs is None:
        outputs = list(targets) if targets is not None else default_targets(model)
        if len(outputs) == 0:
            raise ValueError(
                "the model has neither an energy nor a force output: name the "
                "outputs to audit"
            )
    outputs = list(outputs)
    if targets is None:
        return outputs, {
            name: key
            for name, key in default_targets(model).items()
            if name in outputs and all(has_target(atoms, key) for atoms in frames)
        }
    unknown = [name for name in targets if name not in outputs]
    if unknown:
        raise ValueError(
            f"targets are given for {unknown}, which are not audited outputs {outputs}"
        )
    return outputs, dict(targets)


def has_target(atoms, key: str) -> bool:
    """Whether a structure stores a value under ``key``."""
    return reference_value(atoms, key) is not None


def read_target(atoms, key: str, index: int) -> torch.Tensor:
    """The target ``key`` of the structure at position ``index``, flattened
    (``(n,)`` float64; a Voigt stress as its full 3 x 3 matrix).

    :raise ValueError: when the structure has no such value
    """
    try:
        array = reference_value(atoms, key)
    except ValueError as error:
        raise ValueError(f"structure {index}: {error}") from error
    if array is None:
        raise ValueError(
            f"structure {index} has no target '{key}' (looked in atoms.info, "
            "atoms.arrays and calculator results); name the right key with --targets"
        )
    if array.shape == (6,) and key.endswith("stress"):
        from ase.stress import voigt_6_to_full_3x3_stress

        array = voigt_6_to_full_3x3_stress(array)
    return torch.from_numpy(array.copy()).reshape(-1)


def check_target(
    key: str, name: str, index: int, prediction: torch.Tensor, reference: torch.Tensor
) -> None:
    """Refuse a target whose size differs from the prediction it is compared
    with."""
    if prediction.numel() != reference.numel():
        raise ValueError(
            f"the target '{key}' of structure {index} has {reference.numel()} "
            f"values but the output '{name}' has {prediction.numel()}"
        )


def predict(
    model: LoadedModel, frames: Sequence, outputs: Sequence[str]
) -> dict[str, list[torch.Tensor]]:
    """Predictions of a model on unrotated structures.

    ``"forces"`` (``-dE/dr``) and ``"stress"`` (``1/V dE/d(strain)``) are computed
    from the energy by automatic differentiation.

    :return: per output, for each structure, an ``(n_samples, n)`` float64 tensor
        on the CPU (``n`` values per sample: components times properties)
    """
    systems = prepare_systems(frames, model)
    requests = {
        name: ModelOutput(sample_kind=model.natural_sample_kind(name))
        for name in outputs
    }
    predictions: dict[str, list[torch.Tensor]] = {name: [] for name in outputs}
    evaluator = RotatedEvaluator(model, O3Grid.identity())
    for chunk in evaluator.stream(systems, requests):
        for name, output in chunk.outputs.items():
            if len(output.blocks) != 1:
                raise ValueError(
                    f"output '{name}' has {len(output.blocks)} blocks; only "
                    "single-block outputs can be compared with dataset targets"
                )
            values = output.blocks[0].values[0]
            values = values.to(device="cpu", dtype=torch.float64)
            predictions[name].append(values.reshape(values.shape[0], -1))
    return predictions
