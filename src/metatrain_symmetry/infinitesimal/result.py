"""The result of an infinitesimal analysis."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from metatensor.torch import TensorMap


@dataclass
class InfinitesimalResult:
    """Infinitesimal symmetry metrics of some outputs of a model on some
    structures.

    Every TensorMap has a ``"system"`` sample dimension indexing the input
    structures, followed by the output's own sample dimensions.
    """

    outputs: list[str]
    """the analysed outputs and features, in the order requested"""
    lie_derivative: dict[str, TensorMap] = field(default_factory=dict)
    """``L_k f = d/dt [rho(exp(-t G_k)) f(exp(t G_k) x)]`` at ``t = 0``, with the
    output's keys, samples and properties; the components are ``generator``
    (0, 1, 2 for rotations about x, y, z) followed by the output's own. Zero to
    round-off for an equivariant output; in the output's unit per radian"""
    relative_lie_derivative: dict[str, torch.Tensor] = field(default_factory=dict)
    """``(n_structures,)`` ``sqrt(sum_k |L_k f|^2 / |f|^2)`` per structure, sums
    over every entry of the output (per radian); NaN where the output is zero
    (see ``zero_structures``). Averaged over orientations, its square is
    ``sum lambda (lambda + 1) b_{lambda,sigma}`` over the normalized spectrum
    ``b`` of a grid analysis"""
    inversion_error: dict[str, torch.Tensor] = field(default_factory=dict)
    """``(n_structures,)`` ``|rho(-1) f(-x) - f(x)| / |f(x)|`` per structure, the
    inversion that no generator reaches, from one call on the inverted
    structure; NaN where the output is zero"""
    zero_structures: dict[str, torch.Tensor] = field(default_factory=dict)
    """``(n_structures,)`` booleans: where the output is zero to round-off (see
    :py:data:`~metatrain_symmetry.diagnostics.ZERO_OUTPUT_TOLERANCE`)"""
    torque: TensorMap | None = None
    """net torque ``sum_i r_i x F_i`` of the conservative forces of each
    non-periodic structure, in the energy's unit: one block, samples
    ``["system"]`` (the non-periodic structures), one ``xyz`` component; it is
    ``-L_k E`` and vanishes for a rotation-invariant energy. ``None`` when no
    energy, forces or stress were analysed"""
    antisymmetric_virial: TensorMap | None = None
    """``(W - W^T) / 2`` for the virial ``W = -dE/d epsilon`` of each periodic
    structure, in the energy's unit: one block, samples ``["system"]`` (the
    periodic structures), components ``xyz_1, xyz_2``; zero for a
    rotation-invariant energy. ``None`` as for ``torque``"""
    method: str = "forward"
    """how the derivatives of model outputs were taken: ``"forward"`` (forward
    mode) or ``"double-backward"``"""
