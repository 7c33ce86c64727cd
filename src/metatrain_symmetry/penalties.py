"""The two estimates of ``L_sigma`` of the equivariance loss
(:py:mod:`metatrain_symmetry.losses`), from predictions on copies of the
structures of a training step: the variance of back-transformed predictions over
random rotated copies, and the squared Lie derivatives along the generators."""

from __future__ import annotations

from typing import Optional

import torch

from .irreps import block_layout, undo_rotation
from .lie_predictions import LieDerivatives
from .rotated_predictions import RotatedPredictions


__all__ = ["equivariance_penalty", "generator_penalty"]


def equivariance_penalty(
    rotated: RotatedPredictions,
    target: str,
    gradient: Optional[str],
    n_rotations: int,
) -> torch.Tensor:
    """``L_sigma`` of one target (or one of its gradients) from rotated predictions.

    :param rotated: predictions on the rotated copies
    :param target: target name
    :param gradient: ``None`` for the target's values, or a gradient name
        (``"positions"``: forces, ``"strain"``: stress)
    :param n_rotations: number of copies used (the first ``n_rotations``)
    :return: scalar, mean over samples, components and properties of the unbiased
        variance of the back-transformed predictions across copies
    """
    from metatomic.torch.o3 import O3Transformations

    tensor = rotated.predictions[target]
    n_systems = rotated.n_systems
    improper = torch.linalg.det(rotated.rotations) < 0
    deviations = []
    for key, block in tensor.items():
        values_block = block.gradient(gradient) if gradient is not None else block
        samples = values_block.samples
        system_column = list(block.samples.names).index("system")
        if gradient is None:
            system = samples.values[:, system_column]
        else:
            parent = samples.values[:, list(samples.names).index("sample")]
            system = block.samples.values[parent.to(torch.long), system_column]
        system = system.to(torch.long)
        copy = torch.div(system, n_systems, rounding_mode="floor")
        keep = copy < n_rotations
        values = values_block.values[keep]
        system = system[keep]
        copy = copy[keep]

        layout = block_layout(
            target,
            list(tensor.keys.names),
            key.values,
            values_block.components,
        )
        wigner = []
        if layout.kind == "spherical":
            transformations = O3Transformations(
                rotated.rotations[system], layout.o3_lambda
            )
            wigner = [
                transformations.wigner_D_matrices(ell).to(values.dtype)
                for ell in range(layout.o3_lambda + 1)
            ]
        back = undo_rotation(
            values.unsqueeze(1),
            layout,
            rotated.rotations[system].to(values.dtype),
            wigner,
            improper[system],
        ).squeeze(1)

        order = torch.argsort(copy, stable=True)
        counts = torch.bincount(copy, minlength=n_rotations)
        if bool(torch.any(counts != counts[0])):
            raise ValueError(
                f"'{target}' has a different number of samples for different "
                "rotated copies of the same structures"
            )
        back = back[order].reshape(n_rotations, int(counts[0]), *back.shape[1:])
        within = (system[order] % n_systems).reshape(n_rotations, -1)
        if not bool(torch.all(within == within[:1])):
            raise ValueError(
                f"'{target}' orders its samples differently for different rotated "
                "copies of the same structures"
            )
        mean = back.mean(dim=0, keepdim=True)
        variance = (back - mean).square().sum(dim=0) / (n_rotations - 1)
        deviations.append(variance.reshape(-1))
    return torch.cat(deviations).mean()


def generator_penalty(derivatives: LieDerivatives, label: str) -> torch.Tensor:
    """``L_sigma`` of one target (or one of its gradients) with
    ``method: generators``.

    :param derivatives: the Lie derivatives of the step's predictions
    :param label: ``target``, or ``target::gradient``
    :return: scalar, mean over samples, components and properties of
        ``sum_k (L_k z)^2``, times the label's weight (zero at a step that does
        not evaluate it)
    """
    values = derivatives.values[label]
    weight = derivatives.weights.get(label, 1.0)
    if weight == 0:
        return values.sum()
    return weight * values.square().sum(dim=0).mean()
