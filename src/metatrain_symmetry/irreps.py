"""(lambda, sigma) bookkeeping: how each output transforms, how to undo a rotation,
and how Cartesian components split into O(3) irreducible representations.

Conventions follow :py:mod:`metatomic.torch.o3`: Cartesian axes are named ``xyz``
(vectors) or ``xyz_1, xyz_2`` (rank-2 tensors), spherical axes ``o3_mu`` with the
block key carrying ``o3_lambda`` and ``o3_sigma``; real spherical vectors order
their components ``(y, z, x)``. Every tensor handled here has the layout
``(n_copies, n_samples, *components, n_properties)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from metatensor.torch import Labels


__all__ = [
    "BlockLayout",
    "Irrep",
    "block_layout",
    "decompose",
    "irrep_keys",
    "irrep_name",
    "is_feature",
    "mu_labels",
    "sigma_index",
    "spectrum_column",
    "spectrum_irreps",
    "undo_rotation",
]


def spectrum_irreps(max_lambda: int) -> list[tuple[int, int]]:
    """The ``(lambda, sigma)`` of a spectrum's columns, in order: for each
    ``lambda`` up to ``max_lambda``, ``sigma = +1`` then ``-1``."""
    return [
        (o3_lambda, sigma) for o3_lambda in range(max_lambda + 1) for sigma in (1, -1)
    ]


def sigma_index(sigma: int) -> int:
    """Position of ``sigma`` among the two columns of one ``lambda``: 0 for
    ``+1``, 1 for ``-1``."""
    return 0 if sigma == 1 else 1


def spectrum_column(o3_lambda: int, sigma: int) -> int:
    """Column of ``(lambda, sigma)`` in a spectrum (see
    :py:func:`spectrum_irreps`)."""
    return 2 * o3_lambda + sigma_index(sigma)


def irrep_name(o3_lambda: int, sigma: int) -> str:
    """Short name of an irrep in tables: ``"(1,+)"``, ``"(2,-)"``."""
    return f"({o3_lambda},{'+' if sigma == 1 else '-'})"


@dataclass(frozen=True)
class Irrep:
    """One irreducible block of a decomposed output."""

    o3_lambda: int | None
    """angular momentum, ``None`` for components that are not decomposed"""
    o3_sigma: int | None
    """parity under inversion relative to ``(-1)^lambda``"""
    components: tuple[str, ...]
    """component axis names of the block (``("o3_mu",)`` or ``()``)"""


@dataclass(frozen=True)
class BlockLayout:
    """How the component axes of one output block transform under O(3)."""

    kind: str
    """``"invariant"``, ``"vector"``, ``"matrix"``, ``"spherical"`` or ``"other"``"""
    o3_lambda: int = 0
    o3_sigma: int = 1
    axes: tuple[str, ...] = ()
    """component axis names, in order"""
    add_scalar_key: bool = True
    """whether a component-less block gets ``(o3_lambda, o3_sigma) = (0, 1)`` keys
    (outputs such as energies) or keeps its keys unchanged (features)"""

    @property
    def irreps(self) -> list[Irrep]:
        """The irreducible blocks this layout decomposes into."""
        if self.kind == "invariant":
            if self.add_scalar_key:
                return [Irrep(0, 1, ("o3_mu",))]
            return [Irrep(None, None, ())]
        if self.kind == "vector":
            return [Irrep(1, 1, ("o3_mu",))]
        if self.kind == "matrix":
            return [
                Irrep(0, 1, ("o3_mu",)),
                Irrep(1, -1, ("o3_mu",)),
                Irrep(2, 1, ("o3_mu",)),
            ]
        if self.kind == "spherical":
            return [Irrep(self.o3_lambda, self.o3_sigma, ("o3_mu",))]
        return [Irrep(None, None, self.axes)]

    @property
    def max_lambda(self) -> int:
        """Largest angular momentum needed to undo a rotation of this block."""
        return self.o3_lambda if self.kind == "spherical" else 0


def is_feature(name: str) -> bool:
    """Whether an output is an internal feature, which should be invariant and is
    therefore not decomposed into irreps."""
    base = name.split("/", 1)[0]
    return (
        name.startswith("mtt::feature::")
        or name.startswith("mtt::aux::")
        or base in ("feature", "features")
    )


def block_layout(
    name: str, key_names: list[str], key_values, components
) -> BlockLayout:
    """Classify one block of output ``name`` from its component axis names."""
    axes = tuple(component.names[0] for component in components)
    if len(axes) == 0:
        return BlockLayout("invariant", add_scalar_key=not is_feature(name))
    if axes == ("xyz",):
        return BlockLayout("vector", 1, 1, axes)
    if axes == ("xyz_1", "xyz_2"):
        return BlockLayout("matrix", 0, 1, axes)
    if axes == ("o3_mu",) and "o3_lambda" in key_names and "o3_sigma" in key_names:
        o3_lambda = int(key_values[key_names.index("o3_lambda")])
        o3_sigma = int(key_values[key_names.index("o3_sigma")])
        return BlockLayout("spherical", o3_lambda, o3_sigma, axes)
    for axis in axes:
        if not (axis.startswith("xyz") or axis.startswith("o3_mu")):
            raise ValueError(
                f"output '{name}' has a component axis '{axis}' that is neither "
                "Cartesian ('xyz', 'xyz_1', ...) nor spherical ('o3_mu'): its "
                "transformation under rotations is unknown"
            )
    if all(axis.startswith("xyz") for axis in axes):
        return BlockLayout("other", axes=axes)
    raise ValueError(
        f"output '{name}' mixes spherical and Cartesian component axes {axes}, "
        "which is not supported"
    )


def undo_rotation(
    values: torch.Tensor,
    layout: BlockLayout,
    rotations: torch.Tensor,
    wigner: list[torch.Tensor],
    improper: torch.Tensor,
) -> torch.Tensor:
    """Back-transform the response to each rotated copy: ``rho(g)^-1 u(g)``.

    :param values: ``(n_copies, n_samples, *components, n_properties)``
    :param rotations: ``(n_copies, 3, 3)`` the matrices ``g`` of each copy
    :param wigner: Wigner matrices of the proper part of each ``g``, per lambda,
        each ``(n_copies, 2 lambda + 1, 2 lambda + 1)``
    :param improper: ``(n_copies,)`` whether ``g`` includes the inversion
    """
    if layout.kind == "invariant":
        return values
    if layout.kind == "spherical":
        result = torch.einsum("cmn,csm...->csn...", wigner[layout.o3_lambda], values)
        if (layout.o3_sigma * (-1) ** layout.o3_lambda) == -1:
            sign = 1.0 - 2.0 * improper.to(values.dtype)
            result = result * sign.view(-1, *([1] * (values.ndim - 1)))
        return result
    # Cartesian axes: z_i = sum_j R_ji u_j on every axis
    result = values
    for axis in range(len(layout.axes)):
        moved = result.movedim(2 + axis, 2)
        moved = torch.einsum("cji,csj...->csi...", rotations, moved)
        result = moved.movedim(2, 2 + axis)
    return result


def decompose(values: torch.Tensor, layout: BlockLayout) -> list[torch.Tensor]:
    """Split a block into its irreducible parts, one tensor per ``layout.irreps``.

    The decomposition is orthonormal: the squared norms of the parts add up to the
    squared norm of ``values``.

    :param values: ``(n_copies, n_samples, *components, n_properties)``
    :return: tensors ``(n_copies, n_samples, 2 lambda + 1, n_properties)`` (or the
        unchanged ``values`` for blocks that are not decomposed)
    """
    if layout.kind == "invariant":
        if layout.add_scalar_key:
            return [values.unsqueeze(2)]
        return [values]
    if layout.kind == "vector":
        return [values.roll(-1, dims=2)]
    if layout.kind == "matrix":
        m = values
        sqrt2 = math.sqrt(2.0)
        l0 = (m[:, :, 0, 0] + m[:, :, 1, 1] + m[:, :, 2, 2]).unsqueeze(2) / math.sqrt(
            3.0
        )
        l1 = torch.stack(
            [
                (m[:, :, 0, 2] - m[:, :, 2, 0]) / sqrt2,
                (m[:, :, 1, 0] - m[:, :, 0, 1]) / sqrt2,
                (m[:, :, 2, 1] - m[:, :, 1, 2]) / sqrt2,
            ],
            dim=2,
        )
        l2 = torch.stack(
            [
                (m[:, :, 0, 1] + m[:, :, 1, 0]) / sqrt2,
                (m[:, :, 1, 2] + m[:, :, 2, 1]) / sqrt2,
                (2.0 * m[:, :, 2, 2] - m[:, :, 0, 0] - m[:, :, 1, 1]) / math.sqrt(6.0),
                (m[:, :, 0, 2] + m[:, :, 2, 0]) / sqrt2,
                (m[:, :, 0, 0] - m[:, :, 1, 1]) / sqrt2,
            ],
            dim=2,
        )
        return [l0, l1, l2]
    return [values]


def irrep_keys(key_names: list[str], key_values: torch.Tensor, irrep: Irrep):
    """Key names and values of one irreducible block derived from a source key.

    A ``"_"`` placeholder key is dropped; ``o3_lambda`` and ``o3_sigma`` are added
    when the irrep is known and the source key does not already carry them.
    """
    names = list(key_names)
    values = [int(v) for v in key_values]
    if names == ["_"]:
        names, values = [], []
    if irrep.o3_lambda is not None and "o3_lambda" not in names:
        names += ["o3_lambda", "o3_sigma"]
        values += [irrep.o3_lambda, irrep.o3_sigma]
    if len(names) == 0:
        return ["_"], [0]
    return names, values


def mu_labels(o3_lambda: int) -> Labels:
    """``o3_mu`` component labels from ``-lambda`` to ``lambda``."""
    return Labels(
        "o3_mu",
        torch.arange(-o3_lambda, o3_lambda + 1, dtype=torch.int32).reshape(-1, 1),
    )
