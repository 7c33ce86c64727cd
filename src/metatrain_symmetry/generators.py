"""The Lie algebra so(3): its generators, how they act on each kind of output
block, and the parity of each block under the inversion.

The generators are ``(G_k)_ij = -epsilon_kij``, so that ``G_k r = e_k x r`` and
``exp(t G_k)`` rotates by the angle ``t`` about the axis ``e_k``. An output block
that transforms with ``rho(R)`` (``R v`` on a Cartesian axis, the real Wigner
matrix ``D^lambda(R)`` on an ``o3_mu`` axis) transforms infinitesimally with
``d rho(G_k) = d/dt rho(exp(t G_k))`` at ``t = 0``.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.linalg
import torch
import torch.autograd.forward_ad as forward_ad
from metatensor.torch import TensorBlock, TensorMap
from metatomic.torch.o3 import O3Transformations

from .irreps import BlockLayout


__all__ = [
    "GENERATOR_NAMES",
    "split_dual",
    "apply_generator",
    "inversion_sign",
    "lacks_forward_mode",
    "so3_generators",
    "spherical_generators",
]


GENERATOR_NAMES = ("x", "y", "z")
"""the axis of each generator, in the order of the ``generator`` component"""


def so3_generators(
    dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The three generators of rotations about ``x``, ``y`` and ``z``.

    :return: ``(3, 3, 3)``: ``[k]`` is ``G_k``, with ``G_k r = e_k x r``
    """
    generators = torch.zeros(3, 3, 3, dtype=torch.float64)
    for k, (i, j) in enumerate([(1, 2), (2, 0), (0, 1)]):
        generators[k, j, i] = 1.0
        generators[k, i, j] = -1.0
    return generators.to(dtype=dtype, device=device)


@functools.cache
def _spherical_generators(o3_lambda: int) -> torch.Tensor:
    # D^lambda(exp(t G)) = exp(t d rho(G)): the matrix logarithm of a finite rotation
    # is exact, and its principal branch is the right one while lambda t < pi
    angle = 1.0 / (o3_lambda + 1)
    rotations = torch.linalg.matrix_exp(angle * so3_generators())
    wigner = O3Transformations(rotations, o3_lambda).wigner_D_matrices(o3_lambda)
    matrices = []
    for matrix in wigner.numpy():
        logarithm = scipy.linalg.logm(matrix) / angle
        antisymmetric = (logarithm.real - logarithm.real.T) / 2
        matrices.append(antisymmetric)
    return torch.from_numpy(np.stack(matrices))


def spherical_generators(
    o3_lambda: int, dtype: torch.dtype = torch.float64, device="cpu"
) -> torch.Tensor:
    """``d rho(G_k)`` on the real spherical harmonics of degree ``o3_lambda``,
    in metatomic's convention (that of its Wigner matrices).

    :return: ``(3, 2 lambda + 1, 2 lambda + 1)`` antisymmetric matrices
    """
    return _spherical_generators(int(o3_lambda)).to(dtype=dtype, device=device)


def apply_generator(
    values: torch.Tensor, layout: BlockLayout, generator: torch.Tensor
) -> torch.Tensor:
    """``d rho(G) f`` for the values ``f`` of one output block.

    :param values: ``(n_samples, *components, n_properties)``
    :param layout: how the block's components transform
    :param generator: ``(3, 3)`` the Cartesian generator ``G``
    :return: same shape as ``values``; zeros for invariant blocks
    """
    if layout.kind == "invariant":
        return torch.zeros_like(values)
    if layout.kind == "spherical":
        matrices = spherical_generators(layout.o3_lambda, values.dtype, values.device)
        # the spherical matrix of G is the combination of the three generators'
        coefficients = torch.stack([generator[2, 1], generator[0, 2], generator[1, 0]])
        matrix = torch.einsum("k,kmn->mn", coefficients, matrices)
        return torch.einsum("mn,sn...->sm...", matrix, values)
    # Cartesian axes: G acts on each of them, the derivative of a product rule
    result = torch.zeros_like(values)
    for axis in range(len(layout.axes)):
        moved = values.movedim(1 + axis, 1)
        moved = torch.einsum("ij,sj...->si...", generator, moved)
        result = result + moved.movedim(1, 1 + axis)
    return result


def inversion_sign(layout: BlockLayout) -> int:
    """``rho(-1)`` of a block: ``sigma (-1)^lambda`` for spherical blocks,
    ``(-1)^rank`` for Cartesian ones (polar vectors change sign, rank-2 tensors
    do not), ``+1`` for invariants."""
    if layout.kind == "spherical":
        return layout.o3_sigma * (-1) ** layout.o3_lambda
    if layout.kind == "invariant":
        return 1
    return (-1) ** len(layout.axes)


def split_dual(tensor: TensorMap) -> tuple[TensorMap, TensorMap]:
    """The primal and the tangent values of a map computed on dual inputs
    (forward-mode differentiation along a generator), as two maps with its
    metadata; the tangent is zero where the values do not depend on the inputs.
    Call it inside the dual level the inputs were made in."""
    primals, tangents = [], []
    for block in tensor.blocks():
        primal, tangent = forward_ad.unpack_dual(block.values)
        if tangent is None:
            tangent = torch.zeros_like(primal)
        for values, kept in ((primal, primals), (tangent, tangents)):
            kept.append(
                TensorBlock(
                    values=values,
                    samples=block.samples,
                    components=block.components,
                    properties=block.properties,
                )
            )
    return TensorMap(tensor.keys, primals), TensorMap(tensor.keys, tangents)


# how PyTorch words the errors of operations without a forward-mode formula
_FORWARD_MODE_MESSAGES = ("forward ad", "forward-mode", "forward mode", "jvp")


def lacks_forward_mode(error: Exception) -> bool:
    """Whether ``error`` says that an operation has no forward-mode derivative
    (a custom ``autograd.Function`` without ``jvp``, a kernel without a forward
    formula)."""
    message = str(error).lower()
    return any(text in message for text in _FORWARD_MODE_MESSAGES)
