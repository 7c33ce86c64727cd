"""The data of retraining: structures with their labels, and the per-structure
scales that turn readout parameters into predictions and residuals into loss
units."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from metatomic.torch import ModelOutput, System

from ..data import read_structures, reference_value
from ..models import LoadedModel
from .targets import ForceTerm, Target


def read_frames(data, what: str) -> list:
    if isinstance(data, (str, os.PathLike)):
        frames = read_structures(data, what)
    else:
        frames = list(data)
    if len(frames) == 0:
        raise ValueError(f"the {what} set contains no structures")
    for index, frame in enumerate(frames):
        if not hasattr(frame, "get_positions"):
            raise TypeError(
                f"{what} structure {index} is a {type(frame).__name__}; pass ase.Atoms "
                "with reference labels (info/arrays or a calculator)"
            )
    return frames


def label(frame, key: str, index: int, what: str):
    value = reference_value(frame, key)
    if value is None:
        raise ValueError(
            f"{what} structure {index} has no '{key}' label (looked in info, arrays "
            "and calculator results); name its key with --targets OUTPUT=KEY "
            "(label_keys={target: key} in Python)"
        )
    return torch.as_tensor(value)


def labels(frames, target: Target, what: str) -> list[torch.Tensor]:
    """Reference values shaped like the model output block without its system axis:
    ``(n_samples, *components, n_properties)``."""
    labels = []
    for index, frame in enumerate(frames):
        value = label(frame, target.label_key, index, what)
        n_samples = len(frame) if not target.per_structure else 1
        if target.rank == 2 and value.numel() == 6 * target.n_properties:
            from ase.stress import voigt_6_to_full_3x3_stress

            value = torch.as_tensor(voigt_6_to_full_3x3_stress(value.numpy()))
        shape = (n_samples,) + (3,) * target.rank + (target.n_properties,)
        if value.numel() != math.prod(shape):
            raise ValueError(
                f"{what} structure {index}: label '{target.label_key}' of target "
                f"'{target.name}' has {value.numel()} values, expected "
                f"{math.prod(shape)}"
            )
        if not bool(torch.all(torch.isfinite(value))):
            raise ValueError(
                f"{what} structure {index}: label '{target.label_key}' is not finite"
            )
        labels.append(value.reshape(shape))
    return labels


def read_dataset(data, terms: list[Target | ForceTerm], what: str):
    """The structures of ``data`` (a file or ``ase.Atoms``) and, per term, their
    labels (see :py:func:`labels`)."""
    frames = read_frames(data, what)
    return frames, {term.name: labels(frames, term, what) for term in terms}


@dataclass
class StructureInfo:
    full_scales: dict[str, torch.Tensor]
    """per target, ``(n_samples, n_outputs)`` scale applied to raw predictions"""
    loss_scales: dict[str, torch.Tensor]
    """per target, ``(n_samples, n_outputs)`` metatrain's per-target scale, which
    divides residuals in the loss"""
    volume: float


def structure_infos(model: LoadedModel, systems: list[System], targets) -> list:
    pet = model.module
    infos = []
    for system in systems:
        requests = {
            t.name: ModelOutput(sample_kind="system" if t.per_structure else "atom")
            for t in targets
        }
        # the scaler's target layouts stay on CPU when the model moves to a GPU,
        # and its scales follow the structures' device: ask on a CPU copy
        on_cpu = System(
            types=system.types.cpu(),
            positions=system.positions.detach().cpu(),
            cell=system.cell.detach().cpu(),
            pbc=system.pbc.cpu(),
        )
        full = pet.scaler.get_scales([on_cpu], requests)
        per_target = pet.scaler.get_scales(
            [on_cpu], requests, use_per_property_scales=False
        )
        volume = abs(float(torch.det(system.cell.to(torch.float64))))
        infos.append(
            StructureInfo(
                full_scales=_per_target(full, targets),
                loss_scales=_per_target(per_target, targets),
                volume=volume if volume > 0 else math.inf,
            )
        )
    return infos


def _per_target(scales, targets) -> dict[str, torch.Tensor]:
    """``(n_samples, n_outputs)`` float64 scales of every target, on CPU (where
    the designs are built, whatever the model's device)."""
    return {
        t.name: scales[t.name]
        .block()
        .values.to(device="cpu", dtype=torch.float64)
        .reshape(-1, t.readout.n_outputs)
        for t in targets
    }
